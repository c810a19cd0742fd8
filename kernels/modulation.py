"""AdaLN modulation and gated residual with per-sample or per-token parameters.

FLUX modulates every token of a sample with the same (B, D) shift/scale/gate; Premier's
text stream needs one per token, (B, T, D). Both shapes go through the same ops, and each op
has three implementations, chosen per call by `backend_for` (inspectable, and counted by
`kernel_calls` when it runs):

- ``"triton"``: a fused Triton kernel (`kernels.triton_modulation`) behind a torch custom
  operator (``torch.ops.premier.*``, with a fake implementation and autograd), so that
  `torch.compile(fullgraph=True)` traces through it and training still gets gradients. Used
  for CUDA tensors when triton is installed, and for CPU tensors when ``TRITON_INTERPRET=1``
  was set before this package was imported (correctness tests only: ~10,000x slower).
- ``"torch"``: the same custom operator running the PyTorch reference (opaque to the
  compiler, like the kernel); for checking the operator plumbing, or if a kernel misbehaves.
- ``"inline"``: the PyTorch reference as ordinary ops, so the compiler can fuse them itself.
  The CPU fallback: what ``"auto"`` picks when the fused kernel cannot run.

`set_backend` / the ``PREMIER_KERNELS`` environment variable choose the policy
(``auto`` | ``triton`` | ``torch`` | ``inline``); ``auto`` is the default.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F

Backend = Literal["triton", "torch", "inline"]
POLICIES = ("auto", "triton", "torch", "inline")
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Read once, at import: triton decides interpreter mode when the kernels are decorated, so a
# later change of the environment could not take effect consistently anyway.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
MAX_FUSED_D = 16384  # mirrors kernels.triton_modulation.MAX_FUSED_D without importing triton

_policy: str = os.environ.get("PREMIER_KERNELS", "auto")
if _policy not in POLICIES:
    raise ValueError(f"PREMIER_KERNELS={_policy!r}; expected one of {', '.join(POLICIES)}")
_calls: Counter[tuple[str, str]] = Counter()


# ----------------------------------------------------------------------------- backend choice
def set_backend(policy: str) -> None:
    """Choose the implementation policy for all ops: 'auto', 'triton', 'torch' or 'inline'."""
    global _policy
    if policy not in POLICIES:
        raise ValueError(f"unknown kernel backend {policy!r}; expected one of {', '.join(POLICIES)}")
    _policy = policy


def get_backend() -> str:
    return _policy


@contextlib.contextmanager
def use_backend(policy: str) -> Iterator[None]:
    """Temporarily switch the policy (tests, benchmarks)."""
    previous = _policy
    set_backend(policy)
    try:
        yield
    finally:
        set_backend(previous)


def fused_unsupported(*tensors: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot run on these tensors, or None if it can."""
    x = tensors[0]
    if not TRITON_INSTALLED:
        return "triton is not installed"
    if x.device.type != "cuda" and not (INTERPRET and x.device.type == "cpu"):
        return f"no Triton backend for {x.device.type} tensors (set TRITON_INTERPRET=1 to interpret on CPU)"
    if any(t.dtype != x.dtype for t in tensors) or x.dtype not in FUSED_DTYPES:
        return f"dtypes {sorted({str(t.dtype) for t in tensors})}: the kernel needs one of fp32/bf16/fp16 for all inputs"
    if any(t.device != x.device for t in tensors):
        return "inputs on different devices"
    if x.shape[-1] > MAX_FUSED_D:
        return f"D = {x.shape[-1]} > {MAX_FUSED_D}"
    return None


def backend_for(*tensors: torch.Tensor) -> Backend:
    """The implementation the ops will use for these inputs under the current policy."""
    if _policy == "auto":
        return "inline" if fused_unsupported(*tensors) else "triton"
    if _policy == "triton":
        reason = fused_unsupported(*tensors)
        if reason:
            raise RuntimeError(f"kernel backend 'triton' was requested, but {reason}")
    return _policy  # type: ignore[return-value]


def kernel_calls() -> dict[tuple[str, str], int]:
    """How often each (op, backend) ran through the custom operators since the last reset."""
    return dict(_calls)


def reset_kernel_calls() -> None:
    _calls.clear()


# ----------------------------------------------------------------------------- reference
def _broadcastable(param: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """(B, D) -> (B, 1, D); (B, 1, D) and (B, T, D) stay. Anything else is a programming error."""
    if param.dim() == 2:
        param = param.unsqueeze(1)
    if param.dim() != 3 or param.shape[0] != x.shape[0] or param.shape[-1] != x.shape[-1]:
        raise ValueError(f"{name} has shape {tuple(param.shape)}; expected (B, D) or (B, T, D) for x {tuple(x.shape)}")
    if param.shape[1] not in (1, x.shape[1]):
        raise ValueError(f"{name} has {param.shape[1]} tokens; x has {x.shape[1]}")
    return param


def _check_x(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B, T, D)")


def adaln_modulate_reference(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The definition: `LayerNorm(x) * (1 + scale) + shift` (no affine weights), in x's dtype as FLUX does it."""
    scale = _broadcastable(scale, x, "scale")
    shift = _broadcastable(shift, x, "shift")
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def gated_residual_reference(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The definition: `x + gate * y`."""
    return x + _broadcastable(gate, x, "gate") * y


# ----------------------------------------------------------------------------- custom operators
def _triton() -> Any:
    from kernels import triton_modulation  # imports triton: only on the first fused call

    return triton_modulation


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any sample/row strides (views are read in place) but need unit stride along D."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("premier::adaln_modulate", mutates_args=())
def _adaln_op(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    _calls[("adaln_modulate", backend)] += 1
    if backend == "triton":
        return _triton().adaln_modulate(_unit_stride(x), _unit_stride(scale), _unit_stride(shift), eps)
    return adaln_modulate_reference(x, scale, shift, eps).contiguous()


@_adaln_op.register_fake
def _(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    return x.new_empty(x.shape)


@torch.library.custom_op("premier::adaln_modulate_cat", mutates_args=())
def _adaln_cat_op(
    text: torch.Tensor,
    image: torch.Tensor,
    text_scale: torch.Tensor,
    text_shift: torch.Tensor,
    image_scale: torch.Tensor,
    image_shift: torch.Tensor,
    eps: float,
    backend: str,
) -> torch.Tensor:
    _calls[("adaln_modulate_cat", backend)] += 1
    if backend == "triton":
        return _triton().adaln_modulate(
            _unit_stride(text), _unit_stride(text_scale), _unit_stride(text_shift), eps,
            _unit_stride(image), _unit_stride(image_scale), _unit_stride(image_shift),
        )  # fmt: skip
    return torch.cat(
        [adaln_modulate_reference(text, text_scale, text_shift, eps), adaln_modulate_reference(image, image_scale, image_shift, eps)],
        dim=1,
    )


@_adaln_cat_op.register_fake
def _(text, image, text_scale, text_shift, image_scale, image_shift, eps, backend):  # noqa: ANN001, ANN202
    return text.new_empty((text.shape[0], text.shape[1] + image.shape[1], text.shape[2]))


@torch.library.custom_op("premier::gated_residual", mutates_args=())
def _gated_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    _calls[("gated_residual", backend)] += 1
    if backend == "triton":
        return _triton().gated_residual(_unit_stride(x), _unit_stride(gate), _unit_stride(y))
    return gated_residual_reference(x, gate, y).contiguous()


@_gated_op.register_fake
def _(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    return x.new_empty(x.shape)


# Backward in PyTorch ops (fp32 math): training runs the same forward kernels, and under
# torch.compile AOTAutograd traces these formulas like any other.
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
        gn = g * (1 + _broadcastable(scale, x, "scale").float())
        grad_x = (rstd * (gn - gn.mean(-1, keepdim=True) - n * (gn * n).mean(-1, keepdim=True))).to(x.dtype)
    if needs[1]:
        grad_scale = _reduce_to(g * n, scale)
    if needs[2]:
        grad_shift = g
    return grad_x, grad_scale, grad_shift


def _adaln_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
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


def _adaln_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    x, scale = ctx.saved_tensors
    gx, gs, gh = _adaln_backward(grad, x, scale, ctx.eps, tuple(ctx.needs_input_grad[:3]))
    return gx, gs, _shift_grad(gh, ctx.shift_meta), None, None


_adaln_op.register_autograd(_adaln_bwd, setup_context=_adaln_setup)


def _adaln_cat_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    text, image, text_scale, text_shift, image_scale, image_shift, eps, _ = inputs
    ctx.save_for_backward(text, image, text_scale, image_scale)
    ctx.eps = eps
    ctx.shift_meta = [(t.dim(), t.shape, t.dtype) for t in (text_shift, image_shift)]


def _adaln_cat_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    text, image, text_scale, image_scale = ctx.saved_tensors
    needs = ctx.needs_input_grad
    g_text, g_image = grad[:, : text.shape[1]], grad[:, text.shape[1] :]
    tx, ts, th = _adaln_backward(g_text, text, text_scale, ctx.eps, (needs[0], needs[2], needs[3]))
    ix, is_, ih = _adaln_backward(g_image, image, image_scale, ctx.eps, (needs[1], needs[4], needs[5]))
    return tx, ix, ts, _shift_grad(th, ctx.shift_meta[0]), is_, _shift_grad(ih, ctx.shift_meta[1]), None, None


_adaln_cat_op.register_autograd(_adaln_cat_bwd, setup_context=_adaln_cat_setup)


def _gated_setup(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    x, gate, y, _ = inputs
    ctx.save_for_backward(gate, y)
    ctx.x_dtype = x.dtype


def _gated_bwd(ctx: Any, grad: torch.Tensor) -> tuple:
    gate, y = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_x = grad.to(ctx.x_dtype) if needs[0] else None
    g3 = _broadcastable(gate, grad, "gate")
    grad_gate = _reduce_to(grad.float() * y.float(), gate) if needs[1] else None
    grad_y = (grad.float() * g3.float()).to(y.dtype) if needs[2] else None
    return grad_x, grad_gate, grad_y, None


_gated_op.register_autograd(_gated_bwd, setup_context=_gated_setup)


# ----------------------------------------------------------------------------- public ops
def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` without affine weights, as in FLUX's AdaLN-Zero.

    x: (B, T, D); scale, shift: (B, D) per sample or (B, T, D) per token.
    """
    _check_x(x)
    _broadcastable(scale, x, "scale")
    _broadcastable(shift, x, "shift")
    backend = backend_for(x, scale, shift)
    if backend == "inline":
        return adaln_modulate_reference(x, scale, shift, eps)
    return torch.ops.premier.adaln_modulate(x, scale, shift, float(eps), backend)


def adaln_modulate_cat(
    text: torch.Tensor,
    image: torch.Tensor,
    text_scale: torch.Tensor,
    text_shift: torch.Tensor,
    image_scale: torch.Tensor,
    image_shift: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """`cat([adaln(text, text_scale, text_shift), adaln(image, image_scale, image_shift)], 1)` in one launch.

    The single-stream block's input: text rows modulated per token (B, T, D), image rows per
    sample (B, D) (either shape is accepted for each). Returns (B, T + L, D).
    """
    _check_x(text, "text")
    _check_x(image, "image")
    if text.shape[0] != image.shape[0] or text.shape[2] != image.shape[2]:
        raise ValueError(f"text {tuple(text.shape)} and image {tuple(image.shape)} differ in batch or width")
    for name, param, rows in (("text_scale", text_scale, text), ("text_shift", text_shift, text),
                              ("image_scale", image_scale, image), ("image_shift", image_shift, image)):  # fmt: skip
        _broadcastable(param, rows, name)
    backend = backend_for(text, image, text_scale, text_shift, image_scale, image_shift)
    if backend == "inline":
        return torch.cat(
            [adaln_modulate_reference(text, text_scale, text_shift, eps), adaln_modulate_reference(image, image_scale, image_shift, eps)],
            dim=1,
        )
    return torch.ops.premier.adaln_modulate_cat(text, image, text_scale, text_shift, image_scale, image_shift, float(eps), backend)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` with a (B, D) or (B, T, D) gate; x and y (B, T, D)."""
    _check_x(x)
    _broadcastable(gate, x, "gate")
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}; x has {tuple(x.shape)}")
    backend = backend_for(x, gate, y)
    if backend == "inline":
        return gated_residual_reference(x, gate, y)
    return torch.ops.premier.gated_residual(x, gate, y, backend)
