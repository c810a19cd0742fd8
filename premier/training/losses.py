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


DISPERSION_SCALES = ("dim", "diag", "mean", "none")
"""The dispersion forms (`Stage1Config.dispersion_scale`); see `dispersion_loss` for each formula."""


def dispersion_loss(z: torch.Tensor, tau: float = 1.0, scale: str = "dim") -> torch.Tensor:
    """InfoNCE-L2 dispersion ("Diffuse and Disperse") over M >= 2 rows z_i of z (M, ...), D features each.
    Minimising it pushes users apart; computed with logsumexp. The forms:

    - `dim`, the paper's (DESIGN section 1):
          log( 1/(M(M-1)) * sum_{i != j} exp(-||z_i - z_j||^2 / (D tau)) )
      <= 0, and 0 when every row is equal. Unbounded below: scaling every output up lowers it without
      making users any more different; in the synthetic world that inflated the adapters' deltas until
      they hurt the flow-matching loss (docs/world.md);
    - `diag`, the Diffuse-and-Disperse release's: the same over all M^2 pairs, the diagonal's zero
      distances included,
          log( 1/M^2 * sum_{i, j} exp(-||z_i - z_j||^2 / (D tau)) )
      so the sum is at least M and the loss at least -log M: pushing users apart pays less and less
      once they are a few sqrt(D tau) apart;
    - `mean`: the `dim` form with the squared distances divided by their mean over the pairs (not
      detached) instead of D. Invariant to a common scale of the outputs and bounded, but so is its
      minimum: any configuration with equal pairwise distances reaches it, at any scale, including
      users that differ by almost nothing. A substitute, not the paper's term;
    - `none`: the `dim` form on raw squared distances.
    """
    if scale not in DISPERSION_SCALES:
        raise ValueError(f"scale must be one of {', '.join(DISPERSION_SCALES)}, got {scale!r}")
    m = z.shape[0]
    if m < 2:
        raise ValueError("the dispersion loss needs at least two users")
    flat = z.reshape(m, -1).float()
    d2 = pairwise_sq_distances(flat)
    if scale == "diag":
        return torch.logsumexp((-d2 / (flat.shape[1] * tau)).flatten(), dim=0) - 2 * math.log(m)
    d2 = d2[~torch.eye(m, dtype=torch.bool, device=z.device)]
    if scale == "dim":
        d2 = d2 / flat.shape[1]
    elif scale == "mean":
        d2 = d2 / d2.mean().clamp_min(torch.finfo(d2.dtype).tiny)
    return torch.logsumexp(-d2 / tau, dim=0) - math.log(m * (m - 1))


def pairwise_sq_distances(flat: torch.Tensor) -> torch.Tensor:
    """||z_i - z_j||^2 from the Gram matrix: O(M^2) memory, unlike differences (M^2 x F), and no
    square root, so the gradient stays finite where two users coincide (cdist's is not)."""
    sq = flat.pow(2).sum(-1)
    d2 = (sq.unsqueeze(0) + sq.unsqueeze(1) - 2 * flat @ flat.T).clamp_min(0)
    return d2.masked_fill(torch.eye(len(flat), dtype=torch.bool, device=flat.device), 0.0)  # exact, not rounded


def mean_pairwise_distance(z: torch.Tensor) -> float:
    """Mean L2 distance between distinct rows, for reports and tests."""
    m = z.shape[0]
    flat = z.reshape(m, -1).float()
    d = torch.cdist(flat, flat)
    return float(d.sum() / (m * (m - 1)))
