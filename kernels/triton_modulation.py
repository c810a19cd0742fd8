"""Triton kernels for AdaLN modulation and the gated residual, one program per (token row, sample).

Importing this module imports triton, which reads `TRITON_INTERPRET` when the kernels are
decorated; `kernels.modulation` therefore imports it lazily, on the first fused call, and the
CPU interpreter (tests only) must be switched on before that.

Layout contract (checked by the callers in `kernels.modulation`): every tensor is viewed as
(B, rows, D) with a unit stride along D and arbitrary sample/row strides, so chunked views
of the (B, T, 6D) AdaLN embedding and slices such as `out[:, :T]` are read in place without a
copy. A per-sample parameter (B, D) is the same view with row stride 0. All arithmetic is in
fp32; each output is rounded to its dtype once.

The AdaLN kernel comes in two variants (the `LOADS_FIRST` constexpr, chosen by the callers from
`kernels.modulation`'s AdaLN variant): scale and shift loaded before the row's reductions, so
that all three loads are in flight at once, or after them (the original order). They compute
the same values; `benchmarks/gpu_suite.py` times both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_FUSED_D = 16384
"""Rows wider than this are not held in one block; the callers fall back to PyTorch."""


@triton.jit
def _adaln_row(x_ptrs, scale_ptrs, shift_ptrs, mask, D, eps):
    """The original order: scale and shift are loaded after the two reductions over x."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptrs, mask=mask, other=0.0).to(tl.float32)
    return xc * rstd * (1.0 + scale) + shift


@triton.jit
def _adaln_row_loads_first(x_ptrs, scale_ptrs, shift_ptrs, mask, D, eps):
    """The reordered variant: all three loads are issued before the reductions, so the row's
    x, scale and shift are in flight together (one DRAM round trip instead of two)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptrs, mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    return xc * rstd * (1.0 + scale) + shift


@triton.jit
def _adaln_kernel(
    out_ptr,
    a_ptr,
    a_scale_ptr,
    a_shift_ptr,
    b_ptr,
    b_scale_ptr,
    b_shift_ptr,
    rows_a,
    D,
    eps,
    so_b,
    so_t,
    sa_b,
    sa_t,
    sas_b,
    sas_t,
    sah_b,
    sah_t,
    sb_b,
    sb_t,
    sbs_b,
    sbs_t,
    sbh_b,
    sbh_t,
    BLOCK_D: tl.constexpr,
    LOADS_FIRST: tl.constexpr,
):
    """out[b, r] = LN(src[b, r]) * (1 + scale[b, r]) + shift[b, r]; rows < rows_a come from
    segment a, the rest from segment b, so one launch writes the
    concatenated [text; image] rows of a single-stream block."""
    row = tl.program_id(0).to(tl.int64)
    sample = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    out_ptrs = out_ptr + sample * so_b + row * so_t + cols
    # Row pointers of segment a, or of segment b for rows >= rows_a (a single-segment launch
    # passes rows_a = all rows, so it never takes the b branch).
    if row < rows_a:
        x_ptrs = a_ptr + sample * sa_b + row * sa_t + cols
        scale_ptrs = a_scale_ptr + sample * sas_b + row * sas_t + cols
        shift_ptrs = a_shift_ptr + sample * sah_b + row * sah_t + cols
    else:
        r = row - rows_a
        x_ptrs = b_ptr + sample * sb_b + r * sb_t + cols
        scale_ptrs = b_scale_ptr + sample * sbs_b + r * sbs_t + cols
        shift_ptrs = b_shift_ptr + sample * sbh_b + r * sbh_t + cols
    if LOADS_FIRST:
        y = _adaln_row_loads_first(x_ptrs, scale_ptrs, shift_ptrs, mask, D, eps)
    else:
        y = _adaln_row(x_ptrs, scale_ptrs, shift_ptrs, mask, D, eps)
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
    out_ptr,
    x_ptr,
    gate_ptr,
    y_ptr,
    D,
    so_b,
    so_t,
    sx_b,
    sx_t,
    sg_b,
    sg_t,
    sy_b,
    sy_t,
    BLOCK_D: tl.constexpr,
):
    """out[b, r] = x[b, r] + gate[b, r] * y[b, r] (gate row stride 0 for a per-sample gate)."""
    row = tl.program_id(0).to(tl.int64)
    sample = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + sample * sx_b + row * sx_t + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + sample * sg_b + row * sg_t + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + sample * sy_b + row * sy_t + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + sample * so_b + row * so_t + cols, (x + g * y).to(out_ptr.dtype.element_ty), mask=mask)


def _launch_config(d: int) -> tuple[int, int]:
    block = triton.next_power_of_2(d)
    warps = 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, warps


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    """(sample stride, row stride) of a (B, D) or (B, rows, D) tensor; 0 rows stride for (B, D)."""
    if t.dim() == 2:
        return t.stride(0), 0
    return t.stride(0), (0 if t.shape[1] == 1 else t.stride(1))


def adaln_modulate(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    a_shift: torch.Tensor,
    eps: float,
    b: torch.Tensor | None = None,
    b_scale: torch.Tensor | None = None,
    b_shift: torch.Tensor | None = None,
    loads_first: bool = True,
) -> torch.Tensor:
    """LN-modulate `a` (B, Ta, D), or `cat([a, b], 1)` when `b` (B, Tb, D) is given, in one launch.

    `loads_first` picks the kernel variant: scale/shift loaded before the reductions (the
    default) or after them (the original order); both compute the same values.
    """
    batch, rows_a, d = a.shape
    rows_b = 0 if b is None else b.shape[1]
    out = torch.empty((batch, rows_a + rows_b, d), dtype=a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if b is None:
        b, b_scale, b_shift = a, a_scale, a_shift
    block, warps = _launch_config(d)
    _adaln_kernel[(rows_a + rows_b, batch)](
        out,
        a,
        a_scale,
        a_shift,
        b,
        b_scale,
        b_shift,
        rows_a,
        d,
        eps,
        out.stride(0),
        out.stride(1),
        a.stride(0),
        a.stride(1),
        *_row_strides(a_scale),
        *_row_strides(a_shift),
        b.stride(0),
        b.stride(1),
        *_row_strides(b_scale),
        *_row_strides(b_shift),
        BLOCK_D=block,
        LOADS_FIRST=loads_first,
        num_warps=warps,
    )
    return out


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y for x, y (B, T, D) and gate (B, D) or (B, T, D); returns a new contiguous tensor."""
    batch, rows, d = x.shape
    out = torch.empty((batch, rows, d), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block, warps = _launch_config(d)
    _gated_residual_kernel[(rows, batch)](
        out,
        x,
        gate,
        y,
        d,
        out.stride(0),
        out.stride(1),
        x.stride(0),
        x.stride(1),
        *_row_strides(gate),
        y.stride(0),
        y.stride(1),
        BLOCK_D=block,
        num_warps=warps,
    )
    return out
