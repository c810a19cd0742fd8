"""Stage-1 and stage-2 objectives (DESIGN section 1)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sample_timesteps(
    n: int, generator: torch.Generator, scheme: str = "logit_normal", mean: float = 1.0, std: float = 1.0
) -> torch.Tensor:
    """t in (0, 1); t = 1 is pure noise. The reference release draws t = sigmoid(N(1, 1))."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * std + mean)
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    raise ValueError(f"unknown timestep sampling {scheme!r} (logit_normal or uniform)")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity target v = eps - x0."""
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise, noise - x0


def flow_matching_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean squared error; `reduction="sum"` sums the per-example means instead (stage 1 divides the
    sum by the global batch, so a worker's share of a batch weighs as it would in one process);
    `reduction="none"` returns the per-example means."""
    if reduction == "sum":
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1).sum()
    if reduction == "none":  # one mean per example: batched multi-user fitting splits the batch by user
        return (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return F.mse_loss(pred.float(), target.float())


DISPERSION_SCALES = ("dim", "mean", "none")


def dispersion_loss(z: torch.Tensor, tau: float = 1.0, scale: str = "dim") -> torch.Tensor:
    """InfoNCE-L2 dispersion ("Diffuse and Disperse") over M >= 2 rows of z (M, ...):

        log( 1/(M(M-1)) * sum_{i != j} exp(-||z_i - z_j||^2 / (s * tau)) )

    computed with logsumexp. Minimising it pushes users apart; it is <= 0 and reaches 0 when every
    row is equal. The scale s of the squared distances:

    - `dim`: the feature dimension, as the Diffuse-and-Disperse code does, so tau means the same for
      the small shared adapter output and the n_blocks-times larger distinct one. The loss is
      unbounded below: scaling every output up lowers it without making users any more different,
      and in the synthetic world that inflated the adapters' deltas until they hurt the flow-matching
      loss (docs/world.md);
    - `mean`: the mean squared distance over the pairs (not detached), which makes the loss invariant
      to a common scale of the outputs, so it can only spread users relative to each other; bounded;
    - `none`: raw squared distances.
    """
    if scale not in DISPERSION_SCALES:
        raise ValueError(f"scale must be one of {', '.join(DISPERSION_SCALES)}, got {scale!r}")
    m = z.shape[0]
    if m < 2:
        raise ValueError("the dispersion loss needs at least two users")
    flat = z.reshape(m, -1).float()
    off = ~torch.eye(m, dtype=torch.bool, device=z.device)
    d2 = pairwise_sq_distances(flat)[off]
    if scale == "dim":
        d2 = d2 / flat.shape[1]
    elif scale == "mean":
        d2 = d2 / d2.mean().clamp_min(torch.finfo(d2.dtype).tiny)
    return torch.logsumexp(-d2 / tau, dim=0) - math.log(m * (m - 1))


def pairwise_sq_distances(flat: torch.Tensor) -> torch.Tensor:
    """||z_i - z_j||^2 from the Gram matrix: O(M^2) memory, unlike differences (M^2 x F), and no
    square root, so the gradient stays finite where two users coincide (cdist's is not)."""
    sq = flat.pow(2).sum(-1)
    return (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * flat @ flat.T).clamp_min(0)


def mean_pairwise_distance(z: torch.Tensor) -> float:
    """Mean L2 distance between distinct rows, for reports and tests."""
    m = z.shape[0]
    flat = z.reshape(m, -1).float()
    d = torch.cdist(flat, flat)
    return float(d.sum() / (m * (m - 1)))
