"""Backward of the modulation custom operators, in PyTorch ops (fp32 math).

Training runs the same forward kernels, and under torch.compile AOTAutograd traces these formulas
like any other. `kernels.modulation` registers each (setup_context, backward) pair on its operator:
`adaln_setup`/`adaln_bwd`, `adaln_cat_setup`/`adaln_cat_bwd`, `gated_setup`/`gated_bwd`.
"""

from __future__ import annotations

from typing import Any

import torch

from kernels.reference import broadcastable


def _reduce_to(grad: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Sum a (B, T, D) gradient over the tokens a per-sample parameter was broadcast to."""
    if param.dim() == 2:
        grad = grad.sum(1)
    elif param.shape[1] == 1 and grad.shape[1] != 1:
        grad = grad.sum(1, keepdim=True)
    return grad.to(param.dtype)


def _adaln_backward(
    grad: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, eps: float, needs: tuple[bool, bool, bool]
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    g = grad.float()
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    xc = xf - mean
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    n = xc * rstd
    grad_x = grad_scale = grad_shift = None
    if needs[0]:
        gn = g * (1 + broadcastable(scale, x, "scale").float())
        grad_x = (rstd * (gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
    if needs[1]:
        grad_scale = _reduce_to(g * n, scale)
    if needs[2]:
        grad_shift = g
    return grad_x, grad_scale, grad_shift


def adaln_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, scale, shift, eps, _ = inputs
    ctx.save_for_backward(x, scale)
    ctx.eps = eps
    ctx.shift_meta = (shift.dim(), shift.shape, shift.dtype)


def _shift_grad(g: torch.Tensor | None, meta: tuple) -> torch.Tensor | None:
    if g is None:
        return None
    dim, shape, dtype = meta
    if dim == 2:
        g = g.sum(1)
    elif shape[1] == 1 and g.shape[1] != 1:
        g = g.sum(1, keepdim=True)
    return g.to(dtype)


def adaln_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    x, scale = ctx.saved_tensors
    gx, gs, gh = _adaln_backward(grad, x, scale, ctx.eps, tuple(ctx.needs_input_grad[:3]))
    return gx, gs, _shift_grad(gh, ctx.shift_meta), None, None


def adaln_cat_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    text, image, text_scale, text_shift, image_scale, image_shift, eps, _ = inputs
    ctx.save_for_backward(text, image, text_scale, image_scale)
    ctx.eps = eps
    ctx.shift_meta = [(t.dim(), t.shape, t.dtype) for t in (text_shift, image_shift)]


def adaln_cat_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    text, image, text_scale, image_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_text, g_image = grad[:, : text.shape[1]], grad[:, text.shape[1] :]
    tx, ts, th = _adaln_backward(g_text, text, text_scale, ctx.eps, (needs[0], needs[2], needs[3]))
    ix, is_, ih = _adaln_backward(g_image, image, image_scale, ctx.eps, (needs[1], needs[4], needs[5]))
    return tx, ix, ts, _shift_grad(th, ctx.shift_meta[0]), is_, _shift_grad(ih, ctx.shift_meta[1]), None, None


def gated_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, gate, y, _ = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def gated_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    gate, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x = grad.to(ctx.x_dtype) if needs[0] else None
    g3 = broadcastable(gate, grad, "gate")
    grad_gate = _reduce_to(grad.float() * y.float(), gate) if needs[1] else None
    grad_y = (grad.float() * g3.float()).to(y.dtype) if needs[2] else None
    return grad_x, grad_gate, grad_y, None


__all__ = ["adaln_setup", "adaln_bwd", "adaln_cat_setup", "adaln_cat_bwd", "gated_setup", "gated_bwd"]
