"""The few-image fitting loop that stage 2 and the per-user LoRA baseline share.

Both fit a small set of parameters on one user's images with the frozen model's flow-matching
loss; they differ only in what the parameters are (an embedding or coefficients; LoRA matrices)
and how they enter the forward. Sharing the loop keeps the comparison fair: the same batches,
timestep and noise draws, optimizer, step budget and held-out early stopping (DESIGN section 1).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from premier.errors import TrainingError
from premier.training.config import Stage2Config
from premier.training.objective import FlowObjective, build_optimizer
from premier.training.prepared import Batch


@dataclass
class LoopResult:
    best: Any  # the snapshot kept: the best held-out loss's, else the last step's
    steps: int
    stopped_early: bool
    final_loss: float | None  # mean of the last 50 training losses
    held_out_loss: float | None
    initial_held_out_loss: float | None
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "loss"} and {"step", "held_out"}


def fit_summary(loop: LoopResult, n: int, train: list[int], config: Stage2Config) -> dict[str, Any]:
    """The fit facts a user record (or a LoRA's) keeps, whatever was fitted."""
    return {
        "images": n,
        "train_images": len(train),
        "steps": loop.steps,
        "stopped_early": loop.stopped_early,
        "final_loss": loop.final_loss,
        "held_out_loss": loop.held_out_loss,
        "initial_held_out_loss": loop.initial_held_out_loss,
        "seconds": loop.seconds,
        "seed": config.seed,
        "optimizer": config.optim.optimizer,
        "lr": config.optim.lr,
    }


def split_holdout(n: int, config: Stage2Config, generator: torch.Generator) -> tuple[list[int], list[int]]:
    """(training rows, held-out rows): with `early_stop`, one image, chosen by the seed, is held out from
    `holdout_min_images` up. The permutation is drawn either way, so the step draws that follow are the same."""
    order = torch.randperm(n, generator=generator).tolist()
    held = [order[0]] if config.early_stop and n >= config.holdout_min_images else []
    return sorted(order[1:] if held else order), held


def rows(samples: Batch, idx: list[int]) -> Batch:
    return Batch(samples.latents[idx], samples.text[idx], samples.pooled[idx], samples.users[idx])


def run_fit_loop(
    *,
    parameters: list[torch.nn.Parameter],
    loss_of: Callable[[Batch, torch.Tensor, torch.Tensor], torch.Tensor],
    held_out: Callable[[], float] | None,
    snapshot: Callable[[], Any],
    objective: FlowObjective,
    samples: Batch,
    train: list[int],
    generator: torch.Generator,
    config: Stage2Config,
    desc: str,
    progress: bool = False,
) -> LoopResult:
    """Up to `config.steps` optimizer steps on batches drawn from `train`; with `held_out`, evaluated every
    `eval_every` steps, the best snapshot kept and a stop after `patience` evaluations without improvement.

    `loss_of(batch, t, noise)` is the flow-matching loss of the current parameters; `snapshot()` copies them.
    """
    from tqdm.auto import tqdm

    o = config.optim
    optimizer = build_optimizer(parameters, o.optimizer, o.lr, o.weight_decay, o.betas)
    started = time.perf_counter()
    history: list[dict[str, Any]] = []
    best, best_loss, initial_held, bad = snapshot(), math.inf, None, 0
    if held_out is not None:
        best_loss = initial_held = held_out()
        history.append({"step": 0, "held_out": best_loss})
    recent: list[float] = []
    bar = tqdm(total=config.steps, disable=not progress, desc=desc, unit="step")
    step, stopped_early = 0, False
    try:
        while step < config.steps:
            pick = torch.randint(len(train), (config.batch_size,), generator=generator)
            batch = rows(samples, [train[i] for i in pick.tolist()])
            t, noise = objective.draw(batch.latents, generator)
            loss = loss_of(batch, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, o.grad_clip)
            value = float(loss.detach())
            if not (math.isfinite(value) and math.isfinite(float(grad_norm))):
                raise TrainingError(f"non-finite loss ({value}) at fitting step {step + 1}; nothing was written")
            optimizer.step()
            step += 1
            recent = (recent + [value])[-50:]
            history.append({"step": step, "loss": value})
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if held_out is not None and step % config.eval_every == 0:
                held_loss = held_out()
                history.append({"step": step, "held_out": held_loss})
                if held_loss < best_loss:
                    best_loss, best, bad = held_loss, snapshot(), 0
                else:
                    bad += 1
                    if bad >= config.patience:
                        stopped_early = True
                        break
    finally:
        bar.close()
    return LoopResult(
        best=best if held_out is not None else snapshot(),
        steps=step,
        stopped_early=stopped_early,
        final_loss=sum(recent) / len(recent) if recent else None,
        held_out_loss=best_loss if held_out is not None else None,
        initial_held_out_loss=initial_held,
        seconds=time.perf_counter() - started,
        history=history,
    )


__all__ = ["LoopResult", "fit_summary", "rows", "run_fit_loop", "split_holdout"]
