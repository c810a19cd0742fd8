"""Stage 2: fit a new user from a few images; FLUX, the adapters and the stage-1 basis stay frozen.

Linear-combination mode (the default) learns K coefficients over the stage-1 users,
E_new = sum_k c_k E_k, starting from the uniform mix c_k = 1/K (the centre of the training
users). Direct mode learns E_new itself, which the paper finds better from about 16 images up;
as the paper's baseline it starts from scratch (drawn as a stage-1 user was), or with
`init="mean"` from the mean training embedding (the point linear combination starts from).

As in the paper, a fit runs `steps` steps. With `early_stop` and `holdout_min_images` or more
images one image (chosen by the seed) is held out; its flow-matching loss at fixed (t, noise)
draws is evaluated every `eval_every` steps, the best parameters are kept and fitting stops
after `patience` evaluations without improvement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from diffusers import FluxTransformer2DModel

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.training.config import Stage2Config
from premier.training.fit_loop import fit_summary, rows, run_fit_loop, split_holdout
from premier.training.objective import FixedDrawLoss, FlowObjective
from premier.training.prepared import Batch
from premier.user_record import UserRecord
from premier.users import validate_user_id


@dataclass
class FitResult:
    record: UserRecord
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"} and {"step", "held_out"}


class UserParameters(nn.Module):
    """The only trainable tensor of stage 2, and how it becomes user tokens (N, U)."""

    def __init__(self, basis: torch.Tensor, config: Stage2Config, init_range: float):
        super().__init__()
        self.mode = config.mode
        self.register_buffer("basis", basis.detach(), persistent=False)
        k = basis.shape[0]
        if self.mode == "coefficients":
            init = torch.full((k,), 1.0 / k)
        elif config.direct_init == "mean":
            init = basis.float().mean(0)
        else:  # scratch: what UserEmbeddingTable draws for a stage-1 user, from the fit's seed
            g = torch.Generator("cpu").manual_seed(config.seed)
            init = (torch.rand(basis.shape[1:], generator=g) * 2 - 1) * init_range
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
    params = UserParameters(premier.users.weight.to(device), config, premier.config.user_init_range)
    g = torch.Generator("cpu").manual_seed(config.seed)
    train, held = split_holdout(n, config, g)
    evaluator = FixedDrawLoss(objective, rows(samples, held), config.eval_samples, config.seed + 1) if held else None

    def loss_of(batch: Batch, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        tokens = params.tokens().unsqueeze(0).expand(batch.latents.shape[0], -1, -1)
        return objective.loss(batch.latents, batch.text, batch.pooled, tokens, t, noise)

    loop = run_fit_loop(
        parameters=[params.value],
        loss_of=loss_of,
        held_out=(lambda: evaluator(params.tokens())) if evaluator is not None else None,
        snapshot=lambda: params.value.detach().clone(),
        objective=objective,
        samples=samples,
        train=train,
        generator=g,
        config=config,
        desc=f"fit {user_id}",
        progress=progress,
    )
    value = loop.best
    fit = {
        "mode": config.mode,
        **({"init": config.direct_init} if config.mode == "direct" else {}),
        **fit_summary(loop, n, train, config),
        "held_out_image": (files[held[0]] if files else held[0]) if held else None,
        "files": files or [],
    }
    vector = value.cpu() if config.mode == "coefficients" else value.cpu().reshape(premier.config.user_shape)
    record = UserRecord(user_id, config.mode, vector, checkpoint_id, fit)  # type: ignore[arg-type]
    return FitResult(record, loop.history)
