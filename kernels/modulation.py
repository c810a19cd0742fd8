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

The AdaLN kernel has two variants with the same results: ``"reordered"`` (the default) issues
the scale/shift loads before the mean/variance reductions, ``"original"`` after them.
`set_adaln_variant` / ``PREMIER_ADALN_VARIANT`` choose one; `benchmarks/gpu_suite.py` times both.

This module holds the policy, the custom operators and the public ops; the PyTorch definitions
and shape checks are in `kernels.reference`, the operators' backward formulas in `kernels.backward`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, Literal

import torch

from kernels import backward
from kernels.reference import adaln_modulate_reference, broadcastable, check_x, gated_residual_reference

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

ADALN_VARIANTS = ("reordered", "original")
_adaln_variant: str = os.environ.get("PREMIER_ADALN_VARIANT", "reordered")
if _adaln_variant not in ADALN_VARIANTS:
    raise ValueError(f"PREMIER_ADALN_VARIANT={_adaln_variant!r}; expected one of {', '.join(ADALN_VARIANTS)}")


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
        return (
            f"dtypes {sorted({str(t.dtype) for t in tensors})}: the kernel needs one of fp32/bf16/fp16 for all inputs"
        )
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


def set_adaln_variant(variant: str) -> None:
    """Choose the AdaLN Triton kernel's variant: 'reordered' (loads before the reductions) or 'original'."""
    global _adaln_variant
    if variant not in ADALN_VARIANTS:
        raise ValueError(f"unknown AdaLN kernel variant {variant!r}; expected one of {', '.join(ADALN_VARIANTS)}")
    _adaln_variant = variant


def get_adaln_variant() -> str:
    return _adaln_variant


@contextlib.contextmanager
def use_adaln_variant(variant: str) -> Iterator[None]:
    """Temporarily switch the AdaLN kernel variant (read when the kernel launches, so never traced)."""
    previous = _adaln_variant
    set_adaln_variant(variant)
    try:
        yield
    finally:
        set_adaln_variant(previous)


def kernel_calls() -> dict[tuple[str, str], int]:
    """How often each (op, backend) ran through the custom operators since the last reset."""
    return dict(_calls)


def reset_kernel_calls() -> None:
    _calls.clear()


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
        return _triton().adaln_modulate(
            _unit_stride(x),
            _unit_stride(scale),
            _unit_stride(shift),
            eps,
            loads_first=_adaln_variant == "reordered",
        )
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
            _unit_stride(text),
            _unit_stride(text_scale),
            _unit_stride(text_shift),
            eps,
            _unit_stride(image),
            _unit_stride(image_scale),
            _unit_stride(image_shift),
            loads_first=_adaln_variant == "reordered",
        )
    return torch.cat(
        [
            adaln_modulate_reference(text, text_scale, text_shift, eps),
            adaln_modulate_reference(image, image_scale, image_shift, eps),
        ],
        dim=1,
    )


@_adaln_cat_op.register_fake
def _(text, image, text_scale, text_shift, image_scale, image_shift, eps, backend):
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


# Backward in PyTorch ops (fp32 math), in kernels.backward.
_adaln_op.register_autograd(backward.adaln_bwd, setup_context=backward.adaln_setup)
_adaln_cat_op.register_autograd(backward.adaln_cat_bwd, setup_context=backward.adaln_cat_setup)
_gated_op.register_autograd(backward.gated_bwd, setup_context=backward.gated_setup)


# ----------------------------------------------------------------------------- public ops
def adaln_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale) + shift` without affine weights, as in FLUX's AdaLN-Zero.

    x: (B, T, D); scale, shift: (B, D) per sample or (B, T, D) per token.
    """
    check_x(x)
    broadcastable(scale, x, "scale")
    broadcastable(shift, x, "shift")
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
    check_x(text, "text")
    check_x(image, "image")
    if text.shape[0] != image.shape[0] or text.shape[2] != image.shape[2]:
        raise ValueError(f"text {tuple(text.shape)} and image {tuple(image.shape)} differ in batch or width")
    for name, param, rows in (
        ("text_scale", text_scale, text),
        ("text_shift", text_shift, text),
        ("image_scale", image_scale, image),
        ("image_shift", image_shift, image),
    ):
        broadcastable(param, rows, name)
    backend = backend_for(text, image, text_scale, text_shift, image_scale, image_shift)
    if backend == "inline":
        return torch.cat(
            [
                adaln_modulate_reference(text, text_scale, text_shift, eps),
                adaln_modulate_reference(image, image_scale, image_shift, eps),
            ],
            dim=1,
        )
    return torch.ops.premier.adaln_modulate_cat(
        text, image, text_scale, text_shift, image_scale, image_shift, float(eps), backend
    )


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`x + gate * y` with a (B, D) or (B, T, D) gate; x and y (B, T, D)."""
    check_x(x)
    broadcastable(gate, x, "gate")
    if y.shape != x.shape:
        raise ValueError(f"y has shape {tuple(y.shape)}; x has {tuple(x.shape)}")
    backend = backend_for(x, gate, y)
    if backend == "inline":
        return gated_residual_reference(x, gate, y)
    return torch.ops.premier.gated_residual(x, gate, y, backend)
