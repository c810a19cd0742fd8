"""Where a new user's stage-2 fit starts: near the training users whose taste its images already show.

The reference loop starts every user at the uniform mix of the K training users (their centre), far
from most users, and spends most of its steps walking out. Here each training user's embedding is
scored by the flow-matching loss it gives the new user's training images at fixed draws, in a few
batched no-grad passes (K x `warm_examples` samples, `chunk` at a time; (image, draw) pairs cycle
through the images), and the fit starts from the
mean of the `warm_start` best: coefficients 1/m on them (0 elsewhere), or their mean embedding in
direct mode. The uniform mix is scored too and kept when it beats the best training users' mix.
"""

from __future__ import annotations

from typing import Any

import torch

from premier.training.config import Stage2Config
from premier.training.objective import FlowObjective
from premier.training.prepared import Batch


@torch.no_grad()
def score_candidates(
    objective: FlowObjective, samples: Batch, candidates: torch.Tensor, examples: int, seed: int, chunk: int
) -> torch.Tensor:
    """Loss of `examples` (image, fixed draw) pairs of `samples`, cycling through the images, under each
    candidate embedding (C, N, U), every candidate at the same draws: (C,)."""
    g = torch.Generator("cpu").manual_seed(seed)
    n = samples.latents.shape[0]
    idx = torch.arange(examples) % n
    latents, text, pooled = samples.latents[idx], samples.text[idx], samples.pooled[idx]
    t, noise = objective.draw(latents, g)
    m, c = idx.numel(), candidates.shape[0]
    losses = torch.empty(c * m)
    per_pass = max(1, chunk // m)  # candidates per pass: every candidate sees the same m examples
    for start in range(0, c, per_pass):
        cand = candidates[start : start + per_pass]
        k = cand.shape[0]
        tokens = cand.repeat_interleave(m, dim=0)
        out = objective.loss(
            latents.repeat(k, 1, 1, 1),
            text.repeat(k, 1, 1),
            pooled.repeat(k, 1),
            tokens,
            t.repeat(k),
            noise.repeat(k, 1, 1, 1),
            reduction="none",
        )
        losses[start * m : (start + k) * m] = out.float().cpu()
    return losses.view(c, m).mean(1)


def warm_start_value(
    objective: FlowObjective, train: Batch, basis: torch.Tensor, config: Stage2Config, chunk: int = 64
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The starting value of the trainable tensor (coefficients (K,) or embedding (N, U)) and what chose it."""
    k = basis.shape[0]
    ids = torch.arange(k)
    if k > config.warm_candidates:  # the cost grows with K x examples: a strided subset of a large basis
        ids = torch.linspace(0, k - 1, config.warm_candidates).long()
    uniform = basis.float().mean(0, keepdim=True)
    candidates = torch.cat([basis[ids].float(), uniform])
    scores = score_candidates(objective, train, candidates, config.warm_examples, config.seed + 2, chunk)
    m = min(config.warm_start, ids.numel())
    best = scores[:-1].topk(m, largest=False).indices
    chosen = ids[best]
    mix = torch.zeros(k)
    mix[chosen] = 1.0 / m
    mixed = torch.einsum("k,knu->nu", mix.to(basis), basis.float()).unsqueeze(0)
    mixed_score = float(score_candidates(objective, train, mixed, config.warm_examples, config.seed + 2, chunk)[0])
    uniform_score = float(scores[-1])
    use_uniform = uniform_score <= mixed_score
    if use_uniform:
        mix = torch.full((k,), 1.0 / k)
    info = {
        "users": [] if use_uniform else chosen.tolist(),
        "start_loss": min(mixed_score, uniform_score),
        "uniform_loss": uniform_score,
        "scored": int(ids.numel()),
    }
    value = mix if config.mode == "coefficients" else (uniform if use_uniform else mixed)[0].cpu()
    return value, info


__all__ = ["warm_start_value", "score_candidates"]
