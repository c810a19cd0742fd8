"""The modulation ops defined in PyTorch: the reference the fused kernels are checked against, and the shape rules.

`adaln_modulate_reference` and `gated_residual_reference` are what the ``"inline"`` backend runs
(the CPU fallback) and what the custom operators run under the ``"torch"`` backend; `broadcastable`
and `check_x` are the shape checks every public op applies before choosing an implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def broadcastable(param: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, D) -> (B, 1, D); (B, 1, D) and (B, T, D) stay. Anything else is a programming error."""
    if param.dim() == 2:
        param = param.unsqueeze(1)
    if param.dim() != 3 or param.shape[0] != x.shape[0] or param.shape[-1] != x.shape[-1]:
        raise ValueError(f"{name} has shape {tuple(param.shape)}; expected (B, D) or (B, T, D) for x {tuple(x.shape)}")
    if param.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{name} has {param.shape[1]} tokens; x has {x.shape[1]}")
    return param


def check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B, T, D)")


def adaln_modulate_reference(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6
) -> torch.Tensor:
    """The definition: `LayerNorm(x) * (1 + scale) + shift` (no affine weights), in x's dtype as FLUX does it."""
    scale = broadcastable(scale, x, "scale")
    shift = broadcastable(shift, x, "shift")
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The definition: `x + gate * y`."""
    return x + broadcastable(gate, x, "gate") * y


__all__ = ["adaln_modulate_reference", "gated_residual_reference", "broadcastable", "check_x"]
