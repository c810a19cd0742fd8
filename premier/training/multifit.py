"""Stage 2 for several users at once: their fits share the forward passes, never their gradients.

A `MultiUserFitter` holds the frozen model and any number of fits ("slots"). Each round draws every
active slot's examples, timesteps and noise from that slot's own generator (seeded by its config,
so a user's draws do not depend on who else is fitting), runs one forward pass over all of them,
each sample with its own user's tokens, and sums the per-user mean losses: user u's gradient is
d(sum)/d(c_u) = d(L_u)/d(c_u), so the users stay independent. Each slot has its own optimizer,
gradient clipping, convergence check and end; a slot may join or leave between rounds without
changing the others' trajectories (up to fp32 reduction order in the batched matmuls).

Against `premier.training.stage2.fit_user` (the reference loop, kept as is) a slot also:
- starts warm (`Stage2Config.warm_start` > 0, `warm_start.py`): from the training users whose
  embeddings give the user's images the lowest loss, instead of the uniform mix;
- stops on convergence for any number of images: on the held-out image's fixed-draw loss with
  `early_stop` and `holdout_min_images`, else on the training images' fixed-draw loss (the
  reference loop runs all `steps` there), once it has not improved by `min_delta` (relative) in
  `patience` evaluations;
- reports progress (step, loss, best monitored loss, expected seconds left) to a callback.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError, TrainingError
from premier.training.config import Stage2Config
from premier.training.fit_loop import rows, split_holdout
from premier.training.objective import FlowObjective, build_optimizer
from premier.training.prepared import Batch
from premier.training.stage2 import FitResult, UserParameters
from premier.training.warm_start import warm_start_value
from premier.user_record import UserRecord
from premier.users import validate_user_id

Progress = Callable[[dict[str, Any]], None]
"""Called after each of a slot's steps with {"step", "max_steps", "loss", "best", "expected_seconds_left"}."""
OBJECTIVE_FIELDS = ("guidance", "precision", "timestep_sampling", "logit_mean", "logit_std")
"""Stage-2 settings the shared forward pass fixes: every slot of a fitter must agree on them."""


@dataclass
class _Slot:
    user_id: str
    config: Stage2Config
    samples: Batch
    files: list[str]
    params: UserParameters
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    train: list[int]
    held: list[int]
    monitor: Batch  # fixed examples whose loss at fixed draws decides convergence
    monitor_t: torch.Tensor
    monitor_noise: torch.Tensor
    on_progress: Progress | None
    warm: dict[str, Any]
    started: float = field(default_factory=time.perf_counter)
    step: int = 0
    bad: int = 0
    best_loss: float = math.inf
    initial_loss: float | None = None
    best_value: torch.Tensor | None = None
    recent: list[float] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    peers: int = 1  # the most slots that shared a round with this one


class MultiUserFitter:
    """Fits several users' stage 2 in shared batched passes; FLUX, the adapters and the basis stay frozen."""

    def __init__(
        self,
        flux: FluxTransformer2DModel,
        premier: PremierModel,
        checkpoint_id: str,
        config: Stage2Config = Stage2Config.fast(),
    ):
        config.check()
        flux.requires_grad_(False).eval()
        premier.requires_grad_(False).eval()
        if config.precision == "bf16":
            flux.to(torch.bfloat16)
        self.flux, self.premier, self.checkpoint_id, self.config = flux, premier, checkpoint_id, config
        self.objective = FlowObjective.for_fit(flux, premier, config)
        self.basis = premier.users.weight.to(flux.device)
        self.slots: dict[str, _Slot] = {}

    @property
    def active(self) -> list[str]:
        return list(self.slots)

    def add(
        self,
        user_id: str,
        samples: Batch,
        config: Stage2Config | None = None,
        files: list[str] | None = None,
        on_progress: Progress | None = None,
    ) -> None:
        """Start fitting `user_id` on its encoded `samples` (it joins the next round); scores the warm start now."""
        validate_user_id(user_id)
        config = config or self.config
        config.check()
        if any(getattr(config, f) != getattr(self.config, f) for f in OBJECTIVE_FIELDS):
            raise InvalidRequestError("config", f"a fit sharing this fitter must use its {', '.join(OBJECTIVE_FIELDS)}")
        if user_id in self.slots:
            raise InvalidRequestError("user_id", f"user {user_id!r} is already being fitted here")
        n = samples.latents.shape[0]
        if n == 0:
            raise InvalidRequestError("images", "no usable images to fit the user on")
        g = torch.Generator("cpu").manual_seed(config.seed)
        train, held = split_holdout(n, config, g)  # the reference loop's split, from the same seed
        params = UserParameters(self.basis, config, self.premier.config.user_init_range)
        warm: dict[str, Any] = {}
        if config.warm_start > 0:
            value, warm = warm_start_value(self.objective, rows(samples, train), self.basis, config, chunk=64)
            with torch.no_grad():
                params.value.copy_(value.to(params.value))
        o = config.optim
        optimizer = build_optimizer([params.value], o.optimizer, o.lr, o.weight_decay, o.betas)
        mg = torch.Generator("cpu").manual_seed(config.seed + 1)
        idx = torch.tensor(held or train).repeat_interleave(config.eval_samples)
        monitor = rows(samples, idx.tolist())
        t, noise = self.objective.draw(monitor.latents, mg)
        self.slots[user_id] = _Slot(
            user_id, config, samples, list(files or []), params, optimizer, g, train, held, monitor, t, noise,
            on_progress, warm, best_value=params.value.detach().clone(),
        )  # fmt: skip

    def remove(self, user_id: str) -> bool:
        """Drop a fit (cancelled): nothing of it is returned; True if it was here."""
        return self.slots.pop(user_id, None) is not None

    def run(self) -> dict[str, FitResult | Exception]:
        """Rounds until every slot has ended; each user's result (or the error that ended its fit)."""
        out: dict[str, FitResult | Exception] = {}
        while self.slots:
            out.update(self.round())
        return out

    def round(self, only: list[str] | None = None) -> dict[str, FitResult | Exception]:
        """One step for every active slot (or the `only` ones: a failed shared round is retried one by one), one
        forward and backward pass, then their evaluations; the slots that ended in this round, with their results
        (or errors), are removed and returned."""
        slots = [self.slots[u] for u in only if u in self.slots] if only is not None else list(self.slots.values())
        if not slots:
            return {}
        for s in slots:
            if s.step == 0 and math.isinf(s.best_loss):  # the starting point's monitored loss
                s.best_loss = s.initial_loss = self._monitor([s])[s.user_id]
                s.history.append({"step": 0, "monitor": s.best_loss})
        ended: dict[str, FitResult | Exception] = {}
        losses = self._train_step(slots, ended)
        due = [s for s in slots if s.user_id not in ended and s.step % s.config.eval_every == 0]
        monitored = self._monitor(due) if due else {}
        for s in slots:
            if s.user_id in ended:
                continue
            s.peers = max(s.peers, len(slots))
            if s.user_id in monitored:
                value = monitored[s.user_id]
                s.history.append({"step": s.step, "monitor": value})
                if value < s.best_loss - s.config.min_delta * abs(s.best_loss):
                    s.best_loss, s.best_value, s.bad = value, s.params.value.detach().clone(), 0
                else:
                    if value < s.best_loss:  # better, but not by enough to count as progress
                        s.best_loss, s.best_value = value, s.params.value.detach().clone()
                    s.bad += 1
                    s.stopped_early = s.bad >= s.config.patience
            self._report(s, losses[s.user_id])
            if s.stopped_early or s.step >= s.config.steps:
                ended[s.user_id] = self._result(s)
        for user_id in ended:
            self.slots.pop(user_id, None)
        return ended

    # ------------------------------------------------------------------ internals
    def _train_step(self, slots: list[_Slot], ended: dict[str, FitResult | Exception]) -> dict[str, float]:
        parts, sizes = [], []
        for s in slots:
            pick = torch.randint(len(s.train), (s.config.batch_size,), generator=s.generator)
            batch = rows(s.samples, [s.train[i] for i in pick.tolist()])
            t, noise = self.objective.draw(batch.latents, s.generator)
            tokens = s.params.tokens().unsqueeze(0).expand(len(pick), -1, -1)
            parts.append((batch, tokens, t, noise))
            sizes.append(len(pick))
        per_example = self._loss([(b.latents, b.text, b.pooled, tok, t, n) for b, tok, t, n in parts])
        per_user = [chunk.mean() for chunk in per_example.split(sizes)]
        for s in slots:
            s.optimizer.zero_grad(set_to_none=True)
        torch.stack(per_user).sum().backward()  # d(sum)/d(c_u) = d(L_u)/d(c_u): the users' gradients stay apart
        losses = {}
        for s, loss in zip(slots, per_user):
            value = float(loss.detach())
            grad_norm = torch.nn.utils.clip_grad_norm_([s.params.value], s.config.optim.grad_clip)
            if not (math.isfinite(value) and math.isfinite(float(grad_norm))):
                ended[s.user_id] = TrainingError(
                    f"non-finite loss ({value}) at fitting step {s.step + 1}; nothing was written"
                )
                continue
            s.optimizer.step()
            s.step += 1
            s.recent = (s.recent + [value])[-50:]
            s.history.append({"step": s.step, "loss": value})
            losses[s.user_id] = value
        return losses

    @torch.no_grad()
    def _monitor(self, slots: list[_Slot]) -> dict[str, float]:
        """Each slot's monitored loss (its fixed examples at its fixed draws), in one batched pass."""
        sizes = [s.monitor.latents.shape[0] for s in slots]
        tokens = [s.params.tokens().unsqueeze(0).expand(n, -1, -1) for s, n in zip(slots, sizes)]
        per_example = self._loss(
            [
                (s.monitor.latents, s.monitor.text, s.monitor.pooled, tok, s.monitor_t, s.monitor_noise)
                for s, tok in zip(slots, tokens)
            ]
        )
        return {s.user_id: float(chunk.mean()) for s, chunk in zip(slots, per_example.split(sizes))}

    def _loss(self, parts: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Per-example losses of every slot's part, in order: one forward per tensor shape (users whose uploads
        encode to different shapes, e.g. text lengths, cannot share a concatenation)."""
        groups: dict[tuple, list[int]] = {}
        for i, part in enumerate(parts):
            groups.setdefault(tuple(tuple(x.shape[1:]) for x in part), []).append(i)
        out: list[torch.Tensor | None] = [None] * len(parts)
        for members in groups.values():
            cols = [torch.cat([parts[i][k] for i in members]) for k in range(6)]
            losses = self.objective.loss(*cols, reduction="none")
            for i, chunk in zip(members, losses.split([parts[i][0].shape[0] for i in members])):
                out[i] = chunk
        return torch.cat(out)  # type: ignore[arg-type]

    def _report(self, s: _Slot, loss: float) -> None:
        if s.on_progress is None:
            return
        per_step = (time.perf_counter() - s.started) / max(1, s.step)
        # if the monitored loss stops improving now, the fit ends after the evaluations its patience has left
        left_steps = min(
            s.config.steps - s.step, (s.config.patience - s.bad) * s.config.eval_every - s.step % s.config.eval_every
        )
        s.on_progress(
            {
                "step": s.step,
                "max_steps": s.config.steps,
                "loss": loss,
                "best": s.best_loss,
                "expected_seconds_left": max(0, left_steps) * per_step,
            }
        )

    def _result(self, s: _Slot) -> FitResult:
        value = s.best_value if s.best_value is not None else s.params.value.detach().clone()
        c = s.config
        fit = {
            "mode": c.mode,
            **({"init": c.direct_init} if c.mode == "direct" and not s.warm else {}),
            "images": int(s.samples.latents.shape[0]),
            "train_images": len(s.train),
            "held_out_image": (s.files[s.held[0]] if s.files else s.held[0]) if s.held else None,
            "files": s.files,
            "steps": s.step,
            "stopped_early": s.stopped_early,
            "final_loss": sum(s.recent) / len(s.recent) if s.recent else None,
            "held_out_loss": s.best_loss if s.held else None,
            "initial_held_out_loss": s.initial_loss if s.held else None,
            "monitored_loss": s.best_loss,
            "initial_monitored_loss": s.initial_loss,
            "seconds": time.perf_counter() - s.started,
            "seed": c.seed,
            "optimizer": c.optim.optimizer,
            "lr": c.optim.lr,
            "fitter": "multi-user",
            "shared_with": s.peers - 1,
            **({"warm_start": s.warm} if s.warm else {}),
        }
        vector = value.cpu() if c.mode == "coefficients" else value.cpu().reshape(self.premier.config.user_shape)
        return FitResult(UserRecord(s.user_id, c.mode, vector, self.checkpoint_id, fit), s.history)  # type: ignore[arg-type]


def fit_users(
    flux: FluxTransformer2DModel,
    premier: PremierModel,
    checkpoint_id: str,
    samples: dict[str, Batch],
    config: Stage2Config = Stage2Config.fast(),
) -> dict[str, FitResult | Exception]:
    """Fit every user of `samples` together (one fitter, shared passes) with the same settings."""
    fitter = MultiUserFitter(flux, premier, checkpoint_id, config)
    for user_id, batch in samples.items():
        fitter.add(user_id, batch, replace(config))
    return fitter.run()


__all__ = ["MultiUserFitter", "fit_users", "Progress"]
