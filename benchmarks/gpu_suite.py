"""The GPU suite: one script, one JSON, under 8 minutes on one H100. Nothing is downloaded.

Builds a FLUX.1-dev-sized transformer (19 double + 38 single blocks, D = 3072) and the reference
Premier adapters with random bf16 weights, then measures, with a different user per sample:
  step        one denoising step (transformer forward) at 1024x1024 and 512x512, batch 1, 4, 8;
  generation  a 28-step transformer-only generation (adapters once per request + 28 forwards +
              Euler updates; no text encoders, no VAE), timed for real, never extrapolated;
for the variants
  plain_eager, premier_eager           diffusers FLUX / Premier, eager;
  plain_compiled, premier_compiled     regional torch.compile (per repeated block, static shapes);
  premier_float8                       premier_compiled with torchao float8 weight-only block linears
                                       (`--quantize` picks another mode; the variant is named after it);
plus peak GPU memory per measurement, compile time per bucket, the fused-kernel check of
`kernel_bench` at (B=8, T=512, D=3072), correctness checks at full size (the model on the fused
kernels vs the PyTorch reference ops, compiled vs eager, quantized vs bf16), and the issue's
targets with pass/fail.

Work runs in priority order under a time budget (default 420 s including model building);
whatever does not fit is listed under "skipped" instead of blowing the budget. Results go to
benchmarks/results/<card>/gpu_suite.json. `--tiny` runs the same code on a CPU in seconds with a
tiny model (fp32, compile backend "eager": dynamo only, 3 steps): the suite's own test.
Run: `python benchmarks/gpu_suite.py` on the GPU machine, then commit the JSON.

One module on purpose: the run order in `run`, the time budget and the `Suite` measurements it schedules
are one plan that is read (and tuned) top to bottom, and the model builder and timers serve nothing else.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from diffusers import FluxTransformer2DModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: E402
from benchmarks import kernel_bench  # noqa: E402
from benchmarks.common import write_result  # noqa: E402
from premier.adapters import PremierAdapters  # noqa: E402
from premier.compile import compile_transformer, compiled_graphs  # noqa: E402
from premier.config import PremierConfig  # noqa: E402
from premier.quantize import quantize_flux, weight_bytes  # noqa: E402
from premier.transformer import PremierTransformer  # noqa: E402

FULL = dict(
    flux=dict(guidance_embeds=True),  # diffusers' defaults are FLUX.1-dev's sizes
    premier={},  # the reference release: 19 double blocks, 30 x 1024 users, adapter width 3072
    resolutions=[1024, 512],
    batches=[1, 4, 8],
    text_len=512,
    steps=28,
    repeats=3,
    budget_s=420.0,
    compile_backend="inductor",
    quantize="float8",
    compile_estimate_s=60.0,
    float8_reserve_s=120.0,
    extra_buckets=True,
)
TINY = dict(
    flux=dict(
        num_layers=2,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=16,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ),
    premier=dict(num_user_tokens=4, user_dim=16, adapter_width=32, adapter_heads=2),
    resolutions=[48, 32],
    batches=[1, 4, 8],
    text_len=8,
    steps=3,
    repeats=1,
    budget_s=50.0,
    compile_backend="eager",
    quantize="float8",
    compile_estimate_s=1.0,
    float8_reserve_s=1.0,
    extra_buckets=False,
)
TARGETS = {
    "premier_compiled_over_plain_compiled_max": 1.03,  # step, batch 1, 1024x1024
    "batch8_over_batch1_images_per_s_min": 2.5,  # premier, 8 different users, 512x512
    "fused_kernel_speedup_vs_eager_min": 2.0,  # (B=8, T=512, D=3072)
    "fused_kernel_peak_bandwidth_fraction_min": 0.70,
}


class Suite:
    def __init__(self, spec: dict, device: torch.device, dtype: torch.dtype, budget_s: float):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.cuda = device.type == "cuda"
        self.results: list[dict] = []
        self.skipped: list[str] = []
        self.compile_s: dict[str, float] = {}
        self.step_s: dict[tuple[str, int, int], float] = {}

    # ------------------------------------------------------------------ plumbing
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def fits(self, what: str, estimate_s: float, reserve_s: float = 0.0) -> bool:
        """Whether `what` fits in the budget, keeping `reserve_s` for later, higher-priority work."""
        if self.elapsed() + estimate_s + reserve_s > self.budget_s:
            self.skipped.append(
                f"{what} (estimated {estimate_s:.0f} s; {self.elapsed():.0f} s of {self.budget_s:.0f} s used)"
            )
            print(f"skip {what}: over the time budget")
            return False
        return True

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    def timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ model and inputs
    def build(self) -> None:
        t0 = time.perf_counter()
        with torch.device("meta"):
            flux = FluxTransformer2DModel(**self.spec["flux"])
        flux = flux.to(self.dtype).to_empty(device=self.device).eval().requires_grad_(False)
        g = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in flux.named_parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
                elif name.endswith("weight"):
                    p.fill_(1.0)  # norm scales
                else:
                    p.zero_()
        self.flux = flux
        self.config = PremierConfig.for_transformer(flux.config, **self.spec["premier"])
        with torch.device(self.device):
            torch.manual_seed(0)
            self.adapters = PremierAdapters(self.config).to(self.dtype).eval().requires_grad_(False)
        self.premier = PremierTransformer(flux, self.config)
        self.sync()
        self.build_s = time.perf_counter() - t0
        self.weights_gb = weight_bytes(flux) / 2**30
        print(
            f"built FLUX-sized transformer ({sum(p.numel() for p in flux.parameters()) / 1e9:.2f} B params, "
            f"{self.weights_gb:.1f} GiB) and adapters in {self.build_s:.1f} s"
        )

    def inputs(self, res: int, batch: int) -> dict[str, Any]:
        """Random step inputs for `batch` samples at res x res, each with its own user's deltas."""
        c, t = self.flux.config, self.spec["text_len"]
        side = res // 16  # VAE downsamples 8x, then 2x2 latents are packed into one token
        g = torch.Generator(self.device).manual_seed(res * 100 + batch)

        def r(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=self.device, dtype=self.dtype) * scale

        ids = torch.zeros(side, side, 3, device=self.device, dtype=self.dtype)
        ids[..., 1] = torch.arange(side, device=self.device)[:, None]
        ids[..., 2] = torch.arange(side, device=self.device)[None, :]
        users = (torch.rand(batch, *self.config.user_shape, generator=g, device=self.device) * 0.2 - 0.1).to(self.dtype)
        return dict(
            latents=r(batch, side * side, c.in_channels),
            text=r(batch, t, c.joint_attention_dim),
            pooled=r(batch, c.pooled_projection_dim),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(t, 3, device=self.device, dtype=self.dtype),
            guidance=torch.full((batch,), 3.5, device=self.device, dtype=self.dtype),
            users=users,
        )

    def forward_fn(
        self, variant: str, x: dict[str, Any]
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
        common = dict(
            encoder_hidden_states=x["text"],
            pooled_projections=x["pooled"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        )
        if variant.startswith("plain"):
            return lambda latents, t, deltas: self.flux(hidden_states=latents, timestep=t, **common, return_dict=False)[
                0
            ]
        return lambda latents, t, deltas: self.premier(hidden_states=latents, timestep=t, text_deltas=deltas, **common)

    def deltas(self, variant: str, x: dict[str, Any]) -> torch.Tensor | None:
        return None if variant.startswith("plain") else self.adapters.text_deltas(x["text"], x["users"])

    def output(self, variant: str, res: int, batch: int) -> torch.Tensor:
        """One forward on fixed inputs, for the correctness checks (fp32 copy)."""
        with torch.inference_mode():
            x = self.inputs(res, batch)
            t = torch.full((batch,), 0.5, device=self.device, dtype=self.dtype)
            return self.forward_fn(variant, x)(x["latents"], t, self.deltas(variant, x)).float()

    # ------------------------------------------------------------------ measurements
    def step(self, variant: str, res: int, batch: int, reserve_s: float = 0.0) -> None:
        key = (variant, res, batch)
        compile_estimate = 0.0 if "eager" in variant else self.compile_s.get(variant, self.spec["compile_estimate_s"])
        estimate = (1 + self.spec["repeats"]) * self.step_s.get(("premier_eager", res, batch), 0.0) + compile_estimate
        if not self.fits(f"step {variant} {res}px batch {batch}", estimate, reserve_s):
            return
        with torch.inference_mode():
            x = self.inputs(res, batch)
            fn = self.forward_fn(variant, x)
            deltas = self.deltas(variant, x)
            t = torch.full((batch,), 0.5, device=self.device, dtype=self.dtype)
            graphs = compiled_graphs()
            self.reset_peak()
            first = self.timed(lambda: fn(x["latents"], t, deltas))
            new_graphs = compiled_graphs() - graphs
            times = [self.timed(lambda: fn(x["latents"], t, deltas)) for _ in range(self.spec["repeats"])]
        step_s = sorted(times)[len(times) // 2]
        self.step_s[key] = step_s
        row = {
            "kind": "step",
            "variant": variant,
            "resolution": res,
            "batch": batch,
            "step_s": step_s,
            "min_s": min(times),
            "images_per_s_per_step": batch / step_s,
            "first_call_s": first,
            "new_graphs": new_graphs,
            "compile_s": max(first - step_s, 0.0) if new_graphs else 0.0,
            "peak_gpu_memory_gb": self.peak_gb(),
        }
        if new_graphs:
            self.compile_s[variant] = row["compile_s"]
        self.results.append(row)
        print(
            f"step {variant:17s} {res:4d}px B={batch}: {step_s * 1e3:9.1f} ms"
            + (f" (compiled {new_graphs} graphs in {row['compile_s']:.1f} s)" if new_graphs else "")
            + (f", peak {row['peak_gpu_memory_gb']:.1f} GiB" if self.cuda else "")
        )

    def generation(self, variant: str, res: int, batch: int, reserve_s: float = 0.0) -> None:
        steps = self.spec["steps"]
        per_step = self.step_s.get((variant, res, batch))
        if per_step is None:
            self.skipped.append(f"generation {variant} {res}px batch {batch} (its step was not measured)")
            return
        if not self.fits(f"generation {variant} {res}px batch {batch}", (steps + 1) * per_step, reserve_s):
            return
        with torch.inference_mode():
            x = self.inputs(res, batch)
            fn = self.forward_fn(variant, x)
            sigmas = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
            timesteps = [sigmas[i].expand(batch).to(self.dtype) for i in range(steps)]

            def run() -> None:
                deltas = self.deltas(variant, x)  # once per request, not per step
                latents = x["latents"].clone()
                for i in range(steps):
                    v = fn(latents, timesteps[i], deltas)
                    latents = latents + (sigmas[i + 1] - sigmas[i]).to(self.dtype) * v

            self.reset_peak()
            total = self.timed(run)
        self.results.append(
            {
                "kind": "generation",
                "variant": variant,
                "resolution": res,
                "batch": batch,
                "steps": steps,
                "total_s": total,
                "images_per_s": batch / total,
                "peak_gpu_memory_gb": self.peak_gb(),
            }
        )
        print(
            f"gen  {variant:17s} {res:4d}px B={batch}: {total:7.2f} s for {steps} steps ({batch / total:.3f} images/s)"
        )


def _find(results: list[dict], kind: str, variant: str, res: int, batch: int) -> dict | None:
    return next(
        (
            r
            for r in results
            if r["kind"] == kind and r["variant"] == variant and r["resolution"] == res and r["batch"] == batch
        ),
        None,
    )


def _compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Relative L2 error and max abs error of `out` against `ref` (random weights: only agreement matters)."""
    finite = bool(torch.isfinite(out).all() and torch.isfinite(ref).all())
    rel = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if finite else None
    return {
        "relative_l2": rel,
        "max_abs": (out - ref).abs().max().item() if finite else None,
        "finite": finite,
        "ref_rms": ref.pow(2).mean().sqrt().item() if finite else None,
    }


def evaluate_targets(suite: Suite, kernel: dict | None) -> dict[str, Any]:
    res_hi, res_lo = suite.spec["resolutions"]
    out: dict[str, Any] = {"thresholds": TARGETS}
    plain, premier = (
        _find(suite.results, "step", "plain_compiled", res_hi, 1),
        _find(suite.results, "step", "premier_compiled", res_hi, 1),
    )
    if plain and premier:
        ratio = premier["step_s"] / plain["step_s"]
        out["premier_compiled_over_plain_compiled"] = {
            "value": ratio,
            "pass": ratio <= TARGETS["premier_compiled_over_plain_compiled_max"],
            "resolution": res_hi,
            "batch": 1,
        }
    for variant in ("premier_compiled", "premier_eager"):
        one, eight = (_find(suite.results, "generation", variant, res_lo, b) for b in (1, 8))
        key, source = "images_per_s", "generation"
        if not (one and eight):
            one, eight = (_find(suite.results, "step", variant, res_lo, b) for b in (1, 8))
            key, source = "images_per_s_per_step", "step"
        if one and eight:
            ratio = eight[key] / one[key]
            out["batch8_over_batch1_images_per_s"] = {
                "value": ratio,
                "pass": ratio >= TARGETS["batch8_over_batch1_images_per_s_min"],
                "variant": variant,
                "resolution": res_lo,
                "from": source,
            }
            break
    if kernel:
        out["fused_kernel_speedup_vs_eager"] = {
            "value": kernel["fused_speedup_vs_eager"],
            "pass": kernel["speedup_pass"],
        }
        out["fused_kernel_peak_bandwidth_fraction"] = {
            "value": kernel["fused_peak_fraction"],
            "pass": kernel["bandwidth_pass"],
        }
    return out


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.tiny:  # a tiny model gains nothing from threads, and on a shared CPU they wait for each other
        torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny model on the CPU: the same code path in seconds (a test)")
    ap.add_argument("--budget-s", type=float, help="stop starting new measurements after this many seconds")
    ap.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; --tiny: eager, i.e. dynamo only)"
    )
    ap.add_argument(
        "--quantize", choices=["int8", "float8", "float8-dynamic"], help="the quantized variant (default float8)"
    )
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<card>/gpu_suite.json)")
    return ap


def run(args: argparse.Namespace) -> dict:
    spec = TINY if args.tiny else FULL
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_suite: no CUDA GPU: the full suite needs one (use --tiny for the CPU smoke run)")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    suite = Suite(spec, device, dtype, args.budget_s or spec["budget_s"])
    backend = args.compile_backend or spec["compile_backend"]
    quant = args.quantize or spec["quantize"]
    torch._dynamo.reset()
    suite.build()
    his, los = spec["resolutions"]
    batches = spec["batches"]

    # Fused kernels at the target shape first: seconds, and independent of everything else.
    kernel_rows, kernel_target = [], None
    if suite.cuda:
        kernel_rows = kernel_bench.run(dict(batches=[8], text=512, image=4096, dim=3072), dtype, device, repeats=25)
        kernel_target = kernel_bench.targets(kernel_rows)

    # 1. Eager steps everywhere, then eager generations at batch 1 (before compiling: regional
    #    compilation changes the blocks in place).
    for res in (his, los):
        for b in batches:
            for variant in ("plain_eager", "premier_eager"):
                suite.step(variant, res, b)
    for res in (his, los):
        for variant in ("plain_eager", "premier_eager"):
            suite.generation(variant, res, 1)
    eager_kernel_backend = kernels.backend_for(torch.empty(1, 1, 8, device=device, dtype=dtype))
    # Correctness at full size: the model on the fused kernels against the PyTorch reference ops.
    reference = suite.output("premier_eager", los, 1)
    with kernels.use_backend("inline"):
        inline = suite.output("premier_eager", los, 1)
    checks = {"kernels_vs_inline_reference": _compare(reference, inline)}

    # 2. Regional compilation, static shapes: one compile per bucket, measured by the first call.
    compile_transformer(suite.premier, "regional", backend=backend, dynamic=False)
    order = [(his, 1), (los, 1), (los, 8), (los, 4), (his, 4), (his, 8)]
    for res, b in order[:3]:
        for variant in ("plain_compiled", "premier_compiled"):
            suite.step(variant, res, b)
    checks["compiled_vs_eager"] = _compare(suite.output("premier_compiled", los, 1), reference)  # a compiled bucket
    reserve = spec["float8_reserve_s"]
    for res, b in ((his, 1), (los, 1), (los, 8)):
        for variant in ("premier_compiled", "plain_compiled"):
            suite.generation(variant, res, b, reserve_s=reserve)
    if spec["extra_buckets"]:  # the other buckets, if they fit before the quantized variant's share
        for res, b in order[3:]:
            suite.step("premier_compiled", res, b, reserve_s=reserve)

    # 3. Quantized weights (in place, so last), compiled.
    try:
        n = quantize_flux(suite.flux, quant)
        quant_info: dict[str, Any] = {"mode": quant, "linears": n, "weights_gb": weight_bytes(suite.flux) / 2**30}
        quant_variant = "premier_" + quant.replace("-", "_")
        for res, b in ((his, 1), (los, 1), (los, 8)):
            suite.step(quant_variant, res, b)
        checks[f"{quant_variant}_vs_eager"] = _compare(suite.output(quant_variant, los, 1), reference)
        suite.generation(quant_variant, his, 1)
    except Exception as e:  # e.g. float8-dynamic on a card without float8 tensor cores: record, go on
        quant_info = {"mode": quant, "error": f"{type(e).__name__}: {e}"}
        print(f"quantized variant failed: {quant_info['error']}")

    payload = {
        "card": torch.cuda.get_device_name(device) if suite.cuda else None,
        "tiny": args.tiny,
        "config": {
            "flux": spec["flux"],
            "premier": spec["premier"] or "reference (PremierConfig defaults)",
            "text_len": spec["text_len"],
            "steps": spec["steps"],
            "repeats": spec["repeats"],
            "dtype": str(dtype),
            "compile": {"mode": "regional", "backend": backend, "dynamic": False},
            "budget_s": suite.budget_s,
            "kernel_backend_eager": eager_kernel_backend,
        },
        "build_s": suite.build_s,
        "weights_gb": suite.weights_gb,
        "quantization": quant_info,
        "compile_s_total": sum(r.get("compile_s", 0.0) for r in suite.results),
        "checks": checks,
        "targets": evaluate_targets(suite, kernel_target),
        "results": suite.results,
        "kernel_bench": kernel_rows,
        "skipped": suite.skipped,
        "wall_s": suite.elapsed(),
    }
    path = write_result("gpu_suite" + ("_tiny" if args.tiny else ""), payload, args.out)
    print(
        f"wrote {path} after {suite.elapsed():.0f} s; targets: "
        + ", ".join(
            f"{k}={'pass' if v.get('pass') else 'FAIL'}"
            for k, v in payload["targets"].items()
            if isinstance(v, dict) and "pass" in v
        )
    )
    return payload


if __name__ == "__main__":
    main()
