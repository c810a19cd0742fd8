"""Denoising one step at a time for a changing set of requests: the engine of step-level batching.

Each request carries its own state (packed latents, text states, user delta, sigma schedule, step
index), so requests with different step counts, guidance values, prompts and users share one
transformer forward: FLUX's transformer takes a per-sample timestep and guidance, Premier's a
per-sample text delta, and each sample's latents advance with its own flow-match Euler update
(diffusers' `FlowMatchEulerDiscreteScheduler.step`, element for element, with a per-sample step).
`PremierPipeline.__call__` runs this same engine for a fixed batch, so the request-level and the
step-level paths compute the same numbers.

A running batch can be padded to one of a few sizes (`pad_sizes`) so a compiled transformer sees
the same shapes however requests come and go; the padding rows repeat the last sample and are
dropped.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from premier.requests import GenerationRequest, GenerationSettings, PreparedBatch

Bucket = tuple[int, int]
"""(height, width): requests of one resolution share a forward."""


@dataclass
class DenoiseState:
    """One request between its admission and its decode."""

    request: GenerationRequest
    settings: GenerationSettings
    latents: torch.Tensor  # (L, C) packed, in the pipeline's dtype
    image_ids: torch.Tensor  # (L, 3)
    text_states: torch.Tensor  # (T, C)
    pooled: torch.Tensor  # (P,)
    delta: torch.Tensor | None  # (n_blocks, T, D) or None: no user
    timesteps: torch.Tensor  # (steps,) as the scheduler gives them (sigma x 1000)
    sigmas: torch.Tensor  # (steps + 1,) float32, the last one 0
    step: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.settings.steps

    @property
    def done(self) -> bool:
        return self.step >= self.settings.steps

    @property
    def bucket(self) -> Bucket:
        return (self.settings.height, self.settings.width)


class StepEngine:
    """Admits prepared requests, advances any set of same-resolution states by one step, decodes them."""

    def __init__(self, pipe: Any, pad_sizes: Sequence[int] | None = None, always_deltas: bool = False):
        """`pipe`: a `premier.pipeline.PremierPipeline` (not imported: the pipeline runs this engine).

        `always_deltas`: give the transformer a delta tensor (zeros for requests without a user) even when no
        request in a step has a user, so a compiled graph never switches between the two forms."""
        self.pipe = pipe
        self.pad_sizes = tuple(sorted(pad_sizes)) if pad_sizes else None
        self.always_deltas = always_deltas and pipe.premier is not None
        self._schedules: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._zero_delta: torch.Tensor | None = None

    # ----------------------------------------------------------------- admission
    def schedule(self, steps: int, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps, sigmas) exactly as FluxPipeline sets them: linear sigmas, resolution-dependent shift."""
        key = (steps, image_seq_len)
        if key not in self._schedules:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.flux_pipe.scheduler.config)
            c = scheduler.config
            mu = calculate_shift(
                image_seq_len,
                c.get("base_image_seq_len", 256),
                c.get("max_image_seq_len", 4096),
                c.get("base_shift", 0.5),
                c.get("max_shift", 1.15),
            )
            sigmas = np.linspace(1.0, 1 / steps, steps)
            timesteps, _ = retrieve_timesteps(scheduler, steps, self.pipe.device, sigmas=sigmas, mu=mu)
            self._schedules[key] = (timesteps, scheduler.sigmas.to(self.pipe.device, torch.float32))
        return self._schedules[key]

    @torch.inference_mode()
    def start(self, batch: PreparedBatch) -> list[DenoiseState]:
        """Encode prompts (cached), run the adapters once per request, draw each request's noise from its seed."""
        pipe = self.pipe
        requests, settings = batch.requests, batch.settings
        clock = Clock(pipe.device)
        text_states, pooled, _ = pipe.encode_prompts([r.prompt for r in requests])
        encode_s = clock.lap()
        deltas = pipe.compute_deltas(text_states, batch.user_tokens)
        adapters_s = clock.lap()
        generators = [torch.Generator("cpu").manual_seed(r.seed) for r in requests]
        flux = pipe.flux_pipe
        latents, image_ids = flux.prepare_latents(
            len(requests),
            flux.transformer.config.in_channels // 4,
            settings.height,
            settings.width,
            torch.float32,
            pipe.device,
            generators,
        )
        latents = latents.to(pipe.dtype)
        timesteps, sigmas = self.schedule(settings.steps, latents.shape[1])
        states = []
        for i, req in enumerate(requests):
            has_user = batch.user_tokens[i] is not None
            states.append(
                DenoiseState(
                    request=req,
                    settings=settings,
                    latents=latents[i],
                    image_ids=image_ids,
                    text_states=text_states[i],
                    pooled=pooled[i],
                    delta=deltas[i] if deltas is not None and has_user else None,
                    timesteps=timesteps,
                    sigmas=sigmas,
                    timings={"encode_s": encode_s, "adapters_s": adapters_s},
                )
            )
        return states

    # ----------------------------------------------------------------- one step
    def padded_size(self, n: int) -> int:
        if self.pad_sizes is None:
            return n
        for size in self.pad_sizes:
            if size >= n:
                return size
        return n  # more than the largest size: unpadded (the caller's cap should prevent it)

    @torch.inference_mode()
    def step(self, states: Sequence[DenoiseState]) -> None:
        """One transformer forward for `states` (one resolution, any steps, guidance and users); each advances
        by its own Euler step. Raises if the forward does; then no state has moved."""
        if not states:
            return
        if len({s.bucket for s in states}) != 1:
            raise ValueError("a step takes states of one resolution")
        if any(s.done for s in states):
            raise ValueError("a finished request cannot step")
        pipe = self.pipe
        n = len(states)
        rows = list(range(n)) + [n - 1] * (self.padded_size(n) - n)
        picked = [states[i] for i in rows]
        latents = torch.stack([s.latents for s in picked])
        text_states = torch.stack([s.text_states for s in picked])
        pooled = torch.stack([s.pooled for s in picked])
        timestep = torch.stack([s.timesteps[s.step] for s in picked]).to(latents.dtype) / 1000
        deltas = None
        if self.always_deltas or any(s.delta is not None for s in picked):
            zero = self._zero(picked)
            deltas = torch.stack([zero if s.delta is None else s.delta for s in picked])
        guidance = None
        if pipe.flux_pipe.transformer.config.guidance_embeds:
            guidance = torch.tensor([s.settings.guidance for s in picked], device=pipe.device, dtype=torch.float32)
        noise_pred = pipe.transformer(
            hidden_states=latents,
            encoder_hidden_states=text_states,
            pooled_projections=pooled,
            timestep=timestep,
            img_ids=picked[0].image_ids,
            txt_ids=torch.zeros(text_states.shape[1], 3, device=pipe.device, dtype=pipe.dtype),
            guidance=guidance,
            text_deltas=deltas,
        )[:n]
        # FlowMatchEulerDiscreteScheduler.step, per sample: x + (sigma_next - sigma) * v, in float32.
        dt = torch.stack([s.sigmas[s.step + 1] - s.sigmas[s.step] for s in states]).view(n, 1, 1)
        advanced = (latents[:n].to(torch.float32) + dt * noise_pred).to(noise_pred.dtype)
        for s, lat in zip(states, advanced.unbind(0)):
            s.latents = lat
            s.step += 1

    def _zero(self, states: Sequence[DenoiseState]) -> torch.Tensor:
        """A zero delta of the right shape (a request without a user adds nothing)."""
        like = next((s.delta for s in states if s.delta is not None), None)
        if like is not None:
            return torch.zeros_like(like)
        if self._zero_delta is None or self._zero_delta.shape[1] != states[0].text_states.shape[0]:
            pipe = self.pipe
            user = torch.zeros(1, pipe.premier.config.num_user_tokens, pipe.premier.config.user_dim)
            self._zero_delta = torch.zeros_like(
                pipe.compute_deltas(states[0].text_states[None], [user.to(pipe.device, pipe.dtype)[0]])[0]
            )
        return self._zero_delta

    # ----------------------------------------------------------------- decode
    @torch.inference_mode()
    def finish(self, states: Sequence[DenoiseState]) -> np.ndarray:
        """Decode finished states of one resolution: (B, H, W, 3) uint8."""
        if any(not s.done for s in states):
            raise ValueError("only finished requests are decoded")
        height, width = states[0].bucket
        return self.pipe.decode(torch.stack([s.latents for s in states]), height, width)


class Clock:
    """Wall time that waits for the GPU's queued work before reading."""

    def __init__(self, device: torch.device):
        self.sync = device.type == "cuda"
        self.start = self.last = self._now()

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        dt, self.last = now - self.last, now
        return dt

    def total(self) -> float:
        return self.last - self.start


__all__ = ["Bucket", "Clock", "DenoiseState", "StepEngine"]
