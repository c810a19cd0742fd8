"""The modulation ops: dispatch, the custom operators (schema, fake, autograd) and the CPU fallback.

The Triton kernels themselves run in `test_kernels_interpreted.py`, which needs
TRITON_INTERPRET=1 before triton is imported; `test_triton_kernels_in_the_interpreter` below
runs it in a subprocess so that nothing else in this session is affected.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_premier_config

import kernels
from kernels import (
    adaln_modulate,
    adaln_modulate_cat,
    adaln_modulate_reference,
    backend_for,
    gated_residual,
    gated_residual_reference,
    kernel_calls,
    reset_kernel_calls,
    use_backend,
)
from premier.transformer import PremierTransformer

ROOT = Path(__file__).resolve().parents[2]


def _params(b: int, t: int, d: int, per_token: bool, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, t, d) if per_token else (b, d)
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2)]


def test_reference_is_flux_adaln():
    """The reference is FLUX's AdaLN-Zero arithmetic: LayerNorm without affine, then scale and shift."""
    x = torch.randn(2, 5, 24)
    scale, shift = _params(2, 5, 24, per_token=False)
    ln = torch.nn.LayerNorm(24, elementwise_affine=False, eps=1e-6)
    expected = ln(x) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(adaln_modulate_reference(x, scale, shift), expected, rtol=0, atol=0)
    gate = torch.randn(2, 24)
    y = torch.randn(2, 5, 24)
    torch.testing.assert_close(gated_residual_reference(x, gate, y), x + gate[:, None] * y, rtol=0, atol=0)


def test_cpu_picks_the_inline_fallback_and_says_why():
    x = torch.randn(2, 3, 8)
    assert kernels.get_backend() == "auto"
    assert backend_for(x) == "inline"
    assert "no Triton backend for cpu" in kernels.fused_unsupported(x)
    with use_backend("triton"), pytest.raises(RuntimeError, match="'triton' was requested, but no Triton backend"):
        adaln_modulate(x, torch.zeros(2, 8), torch.zeros(2, 8))
    with use_backend("torch"):
        assert backend_for(x) == "torch"
    assert kernels.get_backend() == "auto"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        kernels.set_backend("cuda")


@pytest.mark.parametrize("backend", ["inline", "torch"])
@pytest.mark.parametrize("b, t, d", [(1, 1, 1), (2, 7, 33), (3, 1, 64), (1, 17, 5)])
@pytest.mark.parametrize("per_token", [False, True])
def test_backends_equal_reference(backend, b, t, d, per_token):
    x = torch.randn(b, t, d, dtype=torch.float64).float()
    scale, shift = _params(b, t, d, per_token)
    gate, _ = _params(b, t, d, per_token, seed=1)
    y = torch.randn(b, t, d)
    image = torch.randn(b, t + 3, d)
    i_scale, i_shift = _params(b, t + 3, d, per_token=False, seed=2)
    reset_kernel_calls()
    with use_backend(backend):
        out = adaln_modulate(x, scale, shift, eps=1e-6)
        res = gated_residual(x, gate, y)
        cat = adaln_modulate_cat(x, image, scale, shift, i_scale, i_shift, eps=1e-6)
    torch.testing.assert_close(out, adaln_modulate_reference(x, scale, shift, 1e-6), rtol=0, atol=1e-6)
    torch.testing.assert_close(res, gated_residual_reference(x, gate, y), rtol=0, atol=1e-6)
    expected_cat = torch.cat(
        [adaln_modulate_reference(x, scale, shift, 1e-6), adaln_modulate_reference(image, i_scale, i_shift, 1e-6)], 1
    )
    torch.testing.assert_close(cat, expected_cat, rtol=0, atol=1e-6)
    expected_calls = (
        {}
        if backend == "inline"
        else {(op, "torch"): 1 for op in ("adaln_modulate", "gated_residual", "adaln_modulate_cat")}
    )
    assert kernel_calls() == expected_calls


def test_bad_shapes_are_refused():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="scale has 4 tokens"):
        adaln_modulate(x, torch.zeros(2, 4, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="expected \\(B, D\\) or \\(B, T, D\\)"):
        gated_residual(x, torch.zeros(3, 8), x)
    with pytest.raises(ValueError, match="expected \\(B, T, D\\)"):
        adaln_modulate(x[0], torch.zeros(2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="differ in batch or width"):
        adaln_modulate_cat(
            x, torch.randn(2, 4, 9), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(2, 9), torch.zeros(2, 9)
        )


def _op_args(per_token: bool, dtype=torch.float32, requires_grad: bool = False):
    b, t, d, l = 2, 3, 9, 4
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    p = (b, t, d) if per_token else (b, d)
    return {
        "adaln_modulate": (r(b, t, d), r(*p), r(*p), 1e-6, "torch"),
        "adaln_modulate_cat": (r(b, t, d), r(b, l, d), r(*p), r(*p), r(b, d), r(b, 1, d), 1e-6, "torch"),
        "gated_residual": (r(b, t, d), r(*p), r(b, t, d), "torch"),
    }


@pytest.mark.parametrize("per_token", [False, True])
def test_custom_ops_pass_opcheck(per_token):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch checks them."""
    for name, args in _op_args(per_token, requires_grad=True).items():
        torch.library.opcheck(getattr(torch.ops.premier, name).default, args)


@pytest.mark.parametrize("per_token", [False, True])
def test_custom_op_backward_is_exact(per_token):
    """The hand-written backward formulas against numerical gradients, in float64."""
    for name, args in _op_args(per_token, dtype=torch.float64, requires_grad=True).items():
        op = getattr(torch.ops.premier, name).default
        assert torch.autograd.gradcheck(
            lambda *a, op=op, args=args: op(*a, *args[len(a) :]), [a for a in args if isinstance(a, torch.Tensor)]
        )


def _transformer_run(backend: str, checkpointing: bool = False):
    flux = tiny_flux()
    if checkpointing:
        flux.enable_gradient_checkpointing()
    cfg = tiny_premier_config(flux, single_blocks=(0,))
    model = PremierTransformer(flux, cfg)
    inputs = flux_inputs(flux, batch=2)
    deltas = (
        0.5 * torch.randn(2, cfg.num_modulated_blocks, 7, cfg.inner_dim, generator=torch.Generator().manual_seed(3))
    ).requires_grad_()
    with use_backend(backend):
        out = model(**inputs, text_deltas=deltas)
        out.pow(2).mean().backward()
    return out.detach(), deltas.grad


@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformer_through_custom_ops_matches_inline_with_gradients(checkpointing):
    """Training runs the custom operators' autograd: outputs and gradients w.r.t. the deltas agree."""
    reset_kernel_calls()
    out_op, grad_op = _transformer_run("torch", checkpointing)
    assert kernel_calls()[("adaln_modulate_cat", "torch")] >= 1
    out_ref, grad_ref = _transformer_run("inline", checkpointing)
    torch.testing.assert_close(out_op, out_ref, rtol=1e-5, atol=1e-6)
    assert grad_ref.abs().sum() > 0
    torch.testing.assert_close(grad_op, grad_ref, rtol=1e-4, atol=1e-8)


def test_triton_kernels_in_the_interpreter():
    """Runs test_kernels_interpreted.py with TRITON_INTERPRET=1 set before anything imports triton."""
    env = dict(os.environ, TRITON_INTERPRET="1", PREMIER_KERNELS="auto")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "kernels" / "test_kernels_interpreted.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def test_kernel_bench_quick(tmp_path):
    from benchmarks import kernel_bench

    out = tmp_path / "kb.json"
    kernel_bench.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "kernel_bench_quick" and data["device"] == "cpu"
    rows = data["results"]
    assert {r["op"] for r in rows} == {
        "adaln_per_token",
        "adaln_per_sample",
        "adaln_cat_single_stream",
        "gated_residual_per_token",
    }
    for r in rows:
        assert r["bytes"] > 0 and r["eager_s"] > 0 and r["compiled_s"] > 0 and r["fallback_s"] > 0
        assert r["fused_s"] is None and r["fallback_backend"] == "inline"
        assert abs(r["compiled_speedup_vs_eager"] - r["eager_s"] / r["compiled_s"]) < 1e-9
