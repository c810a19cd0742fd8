"""The flow-matching step both stages share: prepared latents + text + user tokens -> loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from diffusers import FluxPipeline

from premier.adapters import PremierAdapters
from premier.training.losses import flow_matching_loss, noisy_latents, sample_timesteps
from premier.transformer import PremierTransformer

if TYPE_CHECKING:
    from premier.training.prepared import Batch


class FlowObjective:
    """v_theta(x_t, t, prompt, user) vs eps - x0, with the adapters run on (prompt, user) once per sample.

    FLUX is frozen; gradients reach whatever produced `user_tokens` (table rows, coefficients or a
    direct embedding) and, in stage 1, the adapters. Without adapters (and user tokens None) it is
    plain FLUX's loss, which reaches whatever the transformer carries (the per-user LoRA baseline).
    """

    def __init__(
        self,
        transformer: PremierTransformer,
        adapters: PremierAdapters | None,
        guidance: float = 1.0,
        precision: str = "fp32",
        timestep_sampling: str = "logit_normal",
        logit_mean: float = 1.0,
        logit_std: float = 1.0,
    ):
        self.transformer = transformer
        self.adapters = adapters
        self.guidance = guidance
        self.precision = precision
        self.scheme, self.logit_mean, self.logit_std = timestep_sampling, logit_mean, logit_std
        flux = transformer.flux
        self.device = flux.device
        self.compute_dtype = flux.dtype
        self.uses_guidance = bool(flux.config.guidance_embeds)

    @classmethod
    def for_fit(cls, flux, premier, config) -> FlowObjective:
        """Stage 2's objective (single-user and multi-user fits alike): frozen FLUX and adapters, the config's
        guidance, precision and timestep sampling."""
        return cls(
            PremierTransformer(flux, premier.config),
            premier.adapters,
            config.guidance,
            config.precision,
            config.timestep_sampling,
            config.logit_mean,
            config.logit_std,
        )

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            yield

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Timesteps (B,) and noise like `latents`, from the training generator (CPU, so runs reproduce)."""
        return self.draw_shape(tuple(latents.shape), generator)

    def draw_shape(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`draw` for a batch of this shape that need not be loaded (every rank draws the global batch's)."""
        t = sample_timesteps(shape[0], generator, self.scheme, self.logit_mean, self.logit_std)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return t, noise

    def loss(
        self,
        latents: torch.Tensor,
        text: torch.Tensor,
        pooled: torch.Tensor,
        user_tokens: torch.Tensor | None,
        t: torch.Tensor,
        noise: torch.Tensor,
        reduction: str = "mean",
    ) -> torch.Tensor:
        dev = self.device
        x0 = latents.to(dev, torch.float32)
        b, c, h, w = x0.shape
        xt, target = noisy_latents(x0, noise.to(dev), t.to(dev))
        packed = FluxPipeline._pack_latents(xt, b, c, h, w).to(self.compute_dtype)
        target = FluxPipeline._pack_latents(target, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, dev, self.compute_dtype)
        text = text.to(dev, self.compute_dtype)
        txt_ids = torch.zeros(text.shape[1], 3, device=dev, dtype=self.compute_dtype)
        guidance = torch.full((b,), self.guidance, device=dev, dtype=torch.float32) if self.uses_guidance else None
        with self.autocast():
            deltas = None
            if self.adapters is not None and user_tokens is not None:
                deltas = self.adapters.text_deltas(
                    text.to(self._adapter_dtype()), user_tokens.to(dev, self._adapter_dtype())
                )
            pred = self.transformer(
                hidden_states=packed,
                encoder_hidden_states=text,
                pooled_projections=pooled.to(dev, self.compute_dtype),
                timestep=t.to(dev, self.compute_dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=guidance,
                text_deltas=deltas,
            )
        return flow_matching_loss(pred, target, reduction)

    def _adapter_dtype(self) -> torch.dtype:
        return next(self.adapters.parameters()).dtype


class FixedDrawLoss:
    """Flow-matching loss of fixed examples at fixed (t, noise) draws, so evaluations are comparable
    across steps (held-out early stopping, "did the loss fall" checks)."""

    def __init__(self, objective: FlowObjective, samples: Batch, draws: int, seed: int):
        from premier.training.prepared import Batch

        g = torch.Generator("cpu").manual_seed(seed)
        idx = torch.arange(samples.latents.shape[0]).repeat_interleave(draws)
        self.batch = Batch(samples.latents[idx], samples.text[idx], samples.pooled[idx], samples.users[idx])
        self.t, self.noise = objective.draw(self.batch.latents, g)
        self.objective, self.draws = objective, draws

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor | None) -> float:
        """tokens: one user (N, U) for every example, one per example before repetition (B, N, U), or None
        (plain FLUX, with whatever weights it carries)."""
        b = self.batch
        if tokens is None:
            pass
        elif tokens.dim() == 2:
            tokens = tokens.unsqueeze(0).expand(b.latents.shape[0], -1, -1)
        else:
            tokens = tokens.repeat_interleave(self.draws, dim=0)
        return float(self.objective.loss(b.latents, b.text, b.pooled, tokens, self.t, self.noise))


def build_optimizer(
    params: list[torch.nn.Parameter], optimizer: str, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    if optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(
            params,
            lr=lr,
            betas=betas,
            weight_decay=weight_decay,
            use_bias_correction=True,
            safeguard_warmup=True,
            decouple=True,
        )
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The effective step size: Prodigy's d * lr, AdamW's lr."""
    g = optimizer.param_groups[0]
    return float(g.get("d", 1.0) * g["lr"])
