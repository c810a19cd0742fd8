"""The preflight: correctness before any timing, on the device the run measures (<= 60 s on a GPU).

  fused ops         every fused op against the PyTorch reference (computed in fp32 from the same
                    rounded inputs), in fp32, bf16 and fp16, both AdaLN kernel variants, at FLUX
                    shapes (CUDA only: the interpreter would take minutes) and odd shapes, with the
                    per-token parameters as strided chunks of a (B, T, 6D) embedding;
  zero delta        the Premier transformer with all-zero deltas equals stock diffusers FLUX (a small
                    config: fp32 within 1e-5, bf16 within the kernels' bf16 tolerance);
  compiled          regional torch.compile equals eager (fp32, 1e-5), and new users and new
                    timesteps compile nothing new.

A check that cannot run here (no fused kernel on this device, diffusers missing) is listed with
`passed: null` and the reason; a check that runs and disagrees fails the preflight, which stops
the run. The tolerances are the CPU tests': `tests/benchmarks/test_gpu_suite.py` checks that
they match `tests/kernels/test_kernels_interpreted.py` and `tests/premier/test_transformer.py`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import kernels
from kernels import adaln_modulate_reference, gated_residual_reference, modulation

TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 3e-2), torch.float16: (2e-3, 4e-3)}
"""(rtol, atol) of a fused op against the fp32 reference, as in the interpreted kernel tests."""
ZERO_DELTA_FP32_MAX_ABS = 1e-5
COMPILED_TOL = (1e-5, 1e-5)
SMALL_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    pooled_projection_dim=20,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
"""The CPU tests' tiny FLUX (tests/conftest.py), so that their tolerances apply unchanged."""
SMALL_PREMIER = dict(num_user_tokens=5, user_dim=12, adapter_width=32, adapter_heads=2, single_blocks=(1,))
FLUX_SHAPES = [(2, 512, 4096, 3072)]
"""(B, T text rows, L image rows, D): a FLUX.1-dev double block's text stream, a single block's input."""
ODD_SHAPES = [(1, 1, 1, 1), (3, 7, 5, 33), (2, 5, 3, 257), (1, 3, 2, 3073)]
INTERPRETER_SHAPES = [(1, 1, 1, 1), (2, 3, 4, 40), (3, 2, 5, 33)]


def _compare(out: torch.Tensor, ref: torch.Tensor, rtol: float, atol: float) -> dict[str, Any]:
    diff = (out.float() - ref.float()).abs()
    allowed = atol + rtol * ref.float().abs()
    return {
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "worst_over_tolerance": (diff / allowed).max().item() if diff.numel() else 0.0,
        "ok": bool((diff <= allowed).all()),
    }


def fused_case_errors(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> list[dict]:
    """Every fused op and AdaLN variant at one shape; one entry per op that disagrees (empty: all agree)."""
    b, t, l, d = shape
    g = torch.Generator(device).manual_seed(b * 1000 + t * 10 + d)

    def r(*s):
        return torch.randn(*s, generator=g, device=device, dtype=torch.float32).to(dtype)

    emb = r(b, t, 6 * d)
    shift, scale, gate = emb.chunk(6, dim=-1)[:3]  # strided views, as the modulated block passes them
    x, y, image = r(b, t, d), r(b, t, d), r(b, l, d)
    s_scale, s_shift, i_scale, i_shift = r(b, d), r(b, d), r(b, d), r(b, 1, d)
    f = [a.float() for a in (x, y, image, scale, shift, gate, s_scale, s_shift, i_scale, i_shift)]
    fx, fy, fimage, fscale, fshift, fgate, fs_scale, fs_shift, fi_scale, fi_shift = f
    ref_tok = adaln_modulate_reference(fx, fscale, fshift, 1e-6)
    cases: dict[str, tuple[Callable[[], torch.Tensor], torch.Tensor]] = {
        "adaln_per_token": (lambda: kernels.adaln_modulate(x, scale, shift, 1e-6), ref_tok),
        "adaln_per_sample": (
            lambda: kernels.adaln_modulate(x, s_scale, s_shift, 1e-6),
            adaln_modulate_reference(fx, fs_scale, fs_shift, 1e-6),
        ),
        "adaln_cat": (
            lambda: kernels.adaln_modulate_cat(x, image, scale, shift, i_scale, i_shift, 1e-6),
            torch.cat([ref_tok, adaln_modulate_reference(fimage, fi_scale, fi_shift, 1e-6)], 1),
        ),
        "gated_residual_per_token": (
            lambda: kernels.gated_residual(x, gate, y),
            gated_residual_reference(fx, fgate, fy),
        ),
        "gated_residual_per_sample": (
            lambda: kernels.gated_residual(x, s_scale, y),
            gated_residual_reference(fx, fs_scale, fy),
        ),
    }
    rtol, atol = TOL[dtype]
    bad = []
    with kernels.use_backend("triton"):
        for name, (fn, ref) in cases.items():
            for variant in modulation.ADALN_VARIANTS if name.startswith("adaln") else (None,):
                with modulation.use_adaln_variant(variant or modulation.get_adaln_variant()):
                    out = fn()
                c = _compare(out, ref, rtol, atol)
                if not c["ok"] or out.dtype != dtype or out.shape != ref.shape:
                    bad.append({"op": name, "variant": variant, "shape": list(shape), **c, "dtype": str(out.dtype)})
    return bad


class Preflight:
    def __init__(self, report: Any, device: torch.device, backend: str, diffusers_missing: str | None):
        self.report, self.device, self.backend = report, device, backend
        self.diffusers_missing = diffusers_missing
        self.section = report["preflight"]

    def check(self, name: str, fn: Callable[[], dict[str, Any]], unavailable: str | None = None) -> None:
        t0 = time.perf_counter()
        entry: dict[str, Any] = {"name": name, "passed": None, "wall_s": 0.0}
        if unavailable:
            entry["skipped"] = unavailable
            print(f"preflight {name}: skipped ({unavailable})", flush=True)
        else:
            try:
                details = fn()
                entry["passed"] = bool(details.pop("passed"))
                entry["details"] = details
            except Exception as e:
                entry["passed"] = False
                entry["error"] = f"{type(e).__name__}: {e}"
                print(traceback.format_exc(limit=-4), flush=True)
            print(f"preflight {name}: {'ok' if entry['passed'] else 'FAILED'} ({time.perf_counter() - t0:.1f} s)")
        entry["wall_s"] = time.perf_counter() - t0
        self.section["checks"].append(entry)
        self.report.save()

    def run(self) -> bool:
        t0 = time.perf_counter()
        probe = torch.zeros(1, 1, 8, device=self.device)
        no_kernel = kernels.fused_unsupported(probe)
        cuda = self.device.type == "cuda"
        shapes = (FLUX_SHAPES + ODD_SHAPES) if cuda else INTERPRETER_SHAPES
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            name = f"fused ops vs reference, {str(dtype).removeprefix('torch.')}"

            def fused(dtype=dtype) -> dict[str, Any]:
                bad = [e for s in shapes for e in fused_case_errors(s, dtype, self.device)]
                return {"passed": not bad, "shapes": [list(s) for s in shapes], "disagreements": bad[:10]}

            self.check(name, fused, unavailable=f"no fused kernel here: {no_kernel}" if no_kernel else None)
        self.check("zero delta equals stock diffusers", self.zero_delta, self.diffusers_missing)
        self.check("compiled equals eager, no recompiles", self.compiled, self.diffusers_missing)
        self.section["wall_s"] = time.perf_counter() - t0
        self.section["passed"] = all(c["passed"] is not False for c in self.section["checks"])
        self.report.save()
        return self.section["passed"]

    # ------------------------------------------------------------------ the small transformer
    def _small(self, dtype: torch.dtype):
        from diffusers import FluxTransformer2DModel

        from premier.adapters import PremierAdapters
        from premier.config import PremierConfig
        from premier.transformer import PremierTransformer

        torch.manual_seed(0)
        flux = FluxTransformer2DModel(**SMALL_FLUX).eval().requires_grad_(False)
        cfg = PremierConfig.for_transformer(flux.config, **SMALL_PREMIER)
        torch.manual_seed(1)
        adapters = PremierAdapters(cfg).eval().requires_grad_(False)
        flux, adapters = flux.to(self.device, dtype), adapters.to(self.device, dtype)
        return flux, cfg, adapters, PremierTransformer(flux, cfg)

    def _inputs(self, flux, dtype: torch.dtype, batch: int = 2, text_len: int = 7, grid: int = 4, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        c = flux.config
        ids = torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij"), -1
        ).reshape(-1, 3)
        inputs = dict(
            hidden_states=torch.randn(batch, grid * grid, c.in_channels, generator=g),
            encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
            pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
            timestep=torch.rand(batch, generator=g),
            img_ids=ids,
            txt_ids=torch.zeros(text_len, 3),
            guidance=torch.full((batch,), 3.5),
        )
        return {k: v.to(self.device, dtype) for k, v in inputs.items()}

    def zero_delta(self) -> dict[str, Any]:
        out: dict[str, Any] = {"passed": True}
        for dtype in (torch.float32, torch.bfloat16):
            flux, cfg, _, model = self._small(dtype)
            inputs = self._inputs(flux, dtype)
            zeros = torch.zeros(2, cfg.num_modulated_blocks, 7, cfg.inner_dim, device=self.device, dtype=dtype)
            kernels.reset_kernel_calls()
            with torch.inference_mode():
                stock = flux(**inputs, return_dict=False)[0]
                ours = model(**inputs, text_deltas=zeros)
            if dtype == torch.float32:
                c = _compare(ours, stock, 0.0, ZERO_DELTA_FP32_MAX_ABS)
            else:
                c = _compare(ours, stock, *TOL[dtype])
            c["kernel_calls"] = {f"{op}:{backend}": n for (op, backend), n in kernels.kernel_calls().items()}
            c["backend"] = kernels.backend_for(zeros[:, 0])
            out[str(dtype).removeprefix("torch.")] = c
            out["passed"] = out["passed"] and c["ok"]
        return out

    def compiled(self) -> dict[str, Any]:
        from premier.compile import compile_transformer, compiled_graphs, no_recompiles

        dtype = torch.float32
        flux, cfg, adapters, model = self._small(dtype)
        inputs = self._inputs(flux, dtype)
        g = torch.Generator().manual_seed(2)

        def users() -> torch.Tensor:
            return (torch.rand(2, *cfg.user_shape, generator=g) * 0.2 - 0.1).to(self.device)

        with torch.inference_mode():
            deltas = adapters.text_deltas(inputs["encoder_hidden_states"], users())
            eager = model(**inputs, text_deltas=deltas)  # before compiling: regional compilation is in place
            compile_transformer(model, "regional", backend=self.backend, dynamic=False)
            before = compiled_graphs()
            t0 = time.perf_counter()
            compiled = model(**inputs, text_deltas=deltas)
            compile_s = time.perf_counter() - t0
            graphs = compiled_graphs() - before
            c = _compare(compiled, eager, *COMPILED_TOL)
            after = compiled_graphs()
            with no_recompiles():  # raises on any recompilation
                for step in range(3):  # new users (one sample without a user), new timesteps
                    new = adapters.text_deltas(inputs["encoder_hidden_states"], users())
                    if step == 1:
                        new[1] = 0
                    t = torch.rand(2, generator=g).to(self.device, dtype)
                    model(**dict(inputs, timestep=t), text_deltas=new)
            recompiled = compiled_graphs() - after
        return {
            "passed": c["ok"] and recompiled == 0 and graphs > 0,
            "compiled_vs_eager": c,
            "graphs": graphs,
            "first_call_s": compile_s,
            "new_graphs_for_new_users_and_timesteps": recompiled,
            "backend": self.backend,
        }
