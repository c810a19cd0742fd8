"""Stage 2: fit a new user from a few images; FLUX, the adapters and the stage-1 basis stay frozen.

Linear-combination mode (the default) learns K coefficients over the stage-1 users,
E_new = sum_k c_k E_k, starting from the uniform mix c_k = 1/K (the centre of the training
users). Direct mode learns E_new itself, starting from the mean training embedding (the same
point), which the paper finds better from about 16 images up.

With `holdout_min_images` or more images one image (chosen by the seed) is held out; its
flow-matching loss at fixed (t, noise) draws is evaluated every `eval_every` steps, the best
parameters are kept and fitting stops after `patience` evaluations without improvement.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError, TrainingError
from premier.training.config import Stage2Config
from premier.training.objective import FixedDrawLoss, FlowObjective, build_optimizer
from premier.training.prepared import Batch
from premier.user_record import UserRecord
from premier.users import validate_user_id


@dataclass
class FitResult:
    record: UserRecord
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"} and {"step", "held_out"}


class UserParameters(nn.Module):
    """The only trainable tensor of stage 2, and how it becomes user tokens (N, U)."""

    def __init__(self, basis: torch.Tensor, mode: str):
        super().__init__()
        self.mode = mode
        self.register_buffer("basis", basis.detach(), persistent=False)
        k = basis.shape[0]
        init = torch.full((k,), 1.0 / k) if mode == "coefficients" else basis.mean(0)
        self.value = nn.Parameter(init.to(basis.device, torch.float32).clone())

    def tokens(self) -> torch.Tensor:
        if self.mode == "coefficients":
            return torch.einsum("k,knu->nu", self.value, self.basis.float())
        return self.value


def fit_user(
    flux: FluxTransformer2DModel,
    premier: PremierModel,
    checkpoint_id: str,
    samples: Batch,
    user_id: str,
    config: Stage2Config = Stage2Config(),
    files: list[str] | None = None,
    progress: bool = True,
) -> FitResult:
    """Fit `user_id` on the encoded `samples` (one user's images); returns its record and the loss history."""
    validate_user_id(user_id)
    config.check()
    n = samples.latents.shape[0]
    if n == 0:
        raise InvalidRequestError("images", "no usable images to fit the user on")
    device = flux.device
    flux.requires_grad_(False).eval()
    premier.requires_grad_(False).eval()
    if config.precision == "bf16":
        flux.to(torch.bfloat16)
    objective = FlowObjective.for_fit(flux, premier, config)
    params = UserParameters(premier.users.weight.to(device), config.mode)
    o = config.optim
    optimizer = build_optimizer([params.value], o.optimizer, o.lr, o.weight_decay, o.betas)
    g = torch.Generator("cpu").manual_seed(config.seed)

    order = torch.randperm(n, generator=g).tolist()
    held = [order[0]] if n >= config.holdout_min_images else []
    train = sorted(order[1:] if held else order)
    evaluator = FixedDrawLoss(objective, _rows(samples, held), config.eval_samples, config.seed + 1) if held else None

    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    best_value, best_loss, initial_held, bad = params.value.detach().clone(), math.inf, None, 0
    if evaluator is not None:
        best_loss = initial_held = evaluator(params.tokens())
        history.append({"step": 0, "held_out": best_loss})
    recent: list[float] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, disable=not progress, desc=f"fit {user_id}", unit="step")
    step, stopped_early = 0, False
    try:
        while step < config.steps:
            pick = torch.randint(len(train), (config.batch_size,), generator=g)
            batch = _rows(samples, [train[i] for i in pick.tolist()])
            t, noise = objective.draw(batch.latents, g)
            tokens = params.tokens().unsqueeze(0).expand(len(pick), -1, -1)
            loss = objective.loss(batch.latents, batch.text, batch.pooled, tokens, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_([params.value], o.grad_clip)
            if not (math.isfinite(float(loss.detach())) and math.isfinite(float(grad_norm))):
                raise TrainingError(
                    f"non-finite loss ({float(loss.detach())}) at fitting step {step + 1}; nothing was written"
                )
            optimizer.step()
            step += 1
            recent = (recent + [float(loss.detach())])[-50:]
            history.append({"step": step, "loss": float(loss.detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
            if evaluator is not None and step % config.eval_every == 0:
                held_loss = evaluator(params.tokens())
                history.append({"step": step, "held_out": held_loss})
                if held_loss < best_loss:
                    best_loss, best_value, bad = held_loss, params.value.detach().clone(), 0
                else:
                    bad += 1
                    if bad >= config.patience:
                        stopped_early = True
                        break
    finally:
        bar.close()
    value = best_value if evaluator is not None else params.value.detach().clone()
    fit = {
        "mode": config.mode,
        "images": n,
        "train_images": len(train),
        "held_out_image": (files[held[0]] if files else held[0]) if held else None,
        "files": files or [],
        "steps": step,
        "stopped_early": stopped_early,
        "final_loss": sum(recent) / len(recent) if recent else None,
        "held_out_loss": best_loss if evaluator is not None else None,
        "initial_held_out_loss": initial_held,
        "seconds": time.perf_counter() - started,
        "seed": config.seed,
        "optimizer": o.optimizer,
        "lr": o.lr,
    }
    vector = value.cpu() if config.mode == "coefficients" else value.cpu().reshape(premier.config.user_shape)
    record = UserRecord(user_id, config.mode, vector, checkpoint_id, fit)  # type: ignore[arg-type]
    return FitResult(record, history)


def _rows(samples: Batch, idx: list[int]) -> Batch:
    return Batch(samples.latents[idx], samples.text[idx], samples.pooled[idx], samples.users[idx])
