"""AdaLN modulation and gated residual with per-sample or per-token parameters.

FLUX modulates every token of a sample with the same (B, D) shift/scale/gate; Premier's
text stream needs one per token, (B, T, D). Both shapes go through the same two ops so
that a fused kernel can replace them in one place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _broadcastable(param: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, D) -> (B, 1, D); (B, T, D) stays. Anything else is a programming error."""
    if param.dim() == 2:
        param = param.unsqueeze(1)
    if param.dim() != 3 or param.shape[0] != x.shape[0] or param.shape[-1] != x.shape[-1]:
        raise ValueError(f"{name} has shape {tuple(param.shape)}; expected (B, D) or (B, T, D) for x {tuple(x.shape)}")
    if param.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{name} has {param.shape[1]} tokens; x has {x.shape[1]}")
    return param


def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` without affine weights, as in FLUX's AdaLN-Zero.

    x: (B, T, D); scale, shift: (B, D) per sample or (B, T, D) per token.
    """
    scale = _broadcastable(scale, x, "scale")
    shift = _broadcastable(shift, x, "shift")
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` with a (B, D) or (B, T, D) gate."""
    return x + _broadcastable(gate, x, "gate") * y
