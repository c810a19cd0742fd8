"""FLUX.1-dev-sized steps and generations: random weights from the reference config, nothing downloaded.

Variants (a different user per sample; `premier_*` precompute the deltas once per request):
  plain_eager / plain_compiled                       diffusers FLUX;
  premier_eager / premier_compiled                   Premier, deltas precomputed;
  premier_reference_eager / premier_reference_compiled  the reference release's way: both
                                                     adapters re-run inside every step;
  premier_float8_dynamic / premier_int8              Premier compiled on torchao float8
                                                     (dynamic activations) / int8 weight-only
                                                     block linears.
"compiled" is regional torch.compile (per repeated block, static shapes: one compilation per
bucket, measured by the bucket's first call). Compilation and quantization change the model in
place, so the model moves through states eager -> compiled, and each quantized variant gets a
freshly built model; the plan runs rows in that order. Quantization never touches inductor's
global settings (`set_inductor_config=False`), so later compilations are the same as without it.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo

import kernels

QUANT_MODES = {"premier_float8_dynamic": "float8-dynamic", "premier_int8": "int8"}


def variant_state(variant: str) -> str:
    """The model state a variant runs in: 'eager', 'compiled' or a quantization mode."""
    if variant in QUANT_MODES:
        return QUANT_MODES[variant]
    return "eager" if variant.endswith("_eager") else "compiled"


def compare(out: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Relative L2 and max abs error of `out` against `ref` (random weights: only agreement matters)."""
    out, ref = out.float(), ref.float()
    finite = bool(torch.isfinite(out).all() and torch.isfinite(ref).all())
    return {
        "relative_l2": ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item() if finite else None,
        "max_abs": (out - ref).abs().max().item() if finite else None,
        "finite": finite,
    }


def quantize_blocks(flux: torch.nn.Module, mode: str) -> dict[str, Any]:
    """`premier.quantize`'s block-linear quantization, with torchao's inductor settings left alone."""
    import torch._inductor.config as inductor_config
    from torchao.quantization import quantize_

    from premier import quantize as pq

    device = next(flux.parameters()).device
    pq.check_supported(mode, device)
    config = pq._config(mode)
    if any(f.name == "set_inductor_config" for f in dataclasses.fields(config)):
        config = dataclasses.replace(config, set_inductor_config=False)
    before = {k: repr(v) for k, v in inductor_config.get_config_copy().items()}
    precision = torch.get_float32_matmul_precision()
    t0 = time.perf_counter()
    n = sum(1 for name, m in flux.named_modules() if pq._is_block_linear(m, name))
    quantize_(flux, config, filter_fn=pq._is_block_linear, device=device)
    after = {k: repr(v) for k, v in inductor_config.get_config_copy().items()}
    changed = sorted(k for k in before if after.get(k) != before[k])
    if torch.get_float32_matmul_precision() != precision:
        changed.append("float32_matmul_precision")
    return {
        "mode": mode,
        "linears": n,
        "quantize_s": time.perf_counter() - t0,
        "weights_gb": pq.weight_bytes(flux) / 2**30,
        "set_inductor_config": False,
        "inductor_settings_changed": changed,
    }


class Models:
    """The transformer under test, its state, and the step/generation measurements on it."""

    def __init__(self, spec: dict, device: torch.device, dtype: torch.dtype, backend: str, report: Any):
        self.spec, self.device, self.dtype, self.backend, self.report = spec, device, dtype, backend, report
        self.cuda = device.type == "cuda"
        self.state: str | None = None
        self.flux = self.premier = self.adapters = self.config = None
        self.build_s: float | None = None
        self.compiled_buckets: set[tuple[str, str, int, int]] = set()
        self.compile_s: list[float] = []
        self.step_s: dict[tuple[str, int, int], float] = {}
        self.reference_out: torch.Tensor | None = None
        self.failed: dict[str, str] = {}

    # ------------------------------------------------------------------ timing helpers
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], Any]) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.cuda else None

    # ------------------------------------------------------------------ model states
    def build(self) -> None:
        from diffusers import FluxTransformer2DModel

        from premier.adapters import PremierAdapters
        from premier.config import PremierConfig
        from premier.quantize import weight_bytes
        from premier.transformer import PremierTransformer

        self.flux = self.premier = self.adapters = None
        gc.collect()
        torch._dynamo.reset()
        if self.cuda:
            torch.cuda.empty_cache()
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
        self.state = "eager"
        params = sum(p.numel() for p in flux.parameters())
        self.report.data["config"]["model"] = {
            "params": params,
            "weights_gb": weight_bytes(flux) / 2**30,
            "build_s": self.build_s,
            "premier": self.config.to_dict(),
        }
        print(f"built the transformer ({params / 1e9:.2f} B params) and adapters in {self.build_s:.1f} s", flush=True)

    def ensure(self, state: str) -> None:
        if state == self.state:
            return
        from premier.compile import compile_transformer

        if state == "eager":
            if self.state is not None:
                raise RuntimeError(f"an eager row after the model became {self.state}: the plan's order is wrong")
            self.build()
        elif state == "compiled":
            if self.state != "eager":
                self.build()
            compile_transformer(self.premier, "regional", backend=self.backend, dynamic=False)
        else:
            if state in self.failed:  # do not rebuild and fail again for the next row of this variant
                raise RuntimeError(f"{state} failed before: {self.failed[state]}")
            self.build()
            try:
                info = quantize_blocks(self.flux, state)
            except Exception as e:
                self.failed[state] = f"{type(e).__name__}: {e}"
                raise
            self.report.data["quantization"][state] = info
            print(f"quantized {info['linears']} block linears to {state} in {info['quantize_s']:.1f} s", flush=True)
            compile_transformer(self.premier, "regional", backend=self.backend, dynamic=False)
        self.state = state

    # ------------------------------------------------------------------ inputs and forwards
    def inputs(self, res: int, batch: int) -> dict[str, Any]:
        """Random step inputs for `batch` samples at res x res, each with its own user."""
        c, t = self.flux.config, self.spec["text_len"]
        side = res // 16  # the VAE downsamples 8x, then 2x2 latents are packed into one token
        g = torch.Generator(self.device).manual_seed(res * 100 + batch)

        def r(*shape):
            return torch.randn(*shape, generator=g, device=self.device, dtype=self.dtype)

        ids = torch.zeros(side, side, 3, device=self.device, dtype=self.dtype)
        ids[..., 1] = torch.arange(side, device=self.device)[:, None]
        ids[..., 2] = torch.arange(side, device=self.device)[None, :]
        users = torch.rand(batch, *self.config.user_shape, generator=g, device=self.device) * 0.2 - 0.1
        return dict(
            latents=r(batch, side * side, c.in_channels),
            text=r(batch, t, c.joint_attention_dim),
            pooled=r(batch, c.pooled_projection_dim),
            img_ids=ids.reshape(-1, 3),
            txt_ids=torch.zeros(t, 3, device=self.device, dtype=self.dtype),
            guidance=torch.full((batch,), 3.5, device=self.device, dtype=self.dtype),
            users=users.to(self.dtype),
        )

    def forward_fn(self, variant: str, x: dict[str, Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """One step as a function of (latents, timestep); deltas are computed here once, or per call."""
        common = dict(
            encoder_hidden_states=x["text"],
            pooled_projections=x["pooled"],
            img_ids=x["img_ids"],
            txt_ids=x["txt_ids"],
            guidance=x["guidance"],
        )
        if variant.startswith("plain"):
            return lambda latents, t: self.flux(hidden_states=latents, timestep=t, **common, return_dict=False)[0]
        if variant.startswith("premier_reference"):
            return lambda latents, t: self.premier(
                hidden_states=latents,
                timestep=t,
                text_deltas=self.adapters.text_deltas(x["text"], x["users"]),
                **common,
            )
        deltas = self.adapters.text_deltas(x["text"], x["users"])
        return lambda latents, t: self.premier(hidden_states=latents, timestep=t, text_deltas=deltas, **common)

    def output(self, variant: str, res: int, batch: int) -> torch.Tensor:
        with torch.inference_mode():
            x = self.inputs(res, batch)
            t = torch.full((batch,), 0.5, device=self.device, dtype=self.dtype)
            return self.forward_fn(variant, x)(x["latents"], t).float()

    # ------------------------------------------------------------------ estimates
    def tokens(self, res: int) -> int:
        return (res // 16) ** 2 + self.spec["text_len"]

    def step_estimate(self, variant: str, res: int, batch: int) -> float:
        if (variant, res, batch) in self.step_s:
            return self.step_s[(variant, res, batch)]
        work = batch * self.tokens(res)
        measured = [s / (b * self.tokens(r)) for (_, r, b), s in self.step_s.items()]
        per_token = statistics.median(measured) if measured else self.spec["step_s_per_token"]
        return work * per_token * (1.3 if "reference" in variant else 1.0)

    def compile_estimate(self) -> float:
        return statistics.median(self.compile_s) if self.compile_s else self.spec["compile_estimate_s"]

    def bucket(self, variant: str, res: int, batch: int) -> tuple[str, str, int, int]:
        return (variant_state(variant), "plain" if variant.startswith("plain") else "premier", res, batch)

    def row_estimate(self, variant: str, res: int, batch: int, calls: int) -> float:
        compiling = variant_state(variant) != "eager" and self.bucket(variant, res, batch) not in self.compiled_buckets
        return calls * self.step_estimate(variant, res, batch) + (self.compile_estimate() if compiling else 0.0)

    def setup_estimate(self, state: str) -> float:
        if state == self.state or (state == "eager" and self.state is not None):
            return 0.0
        if state == "compiled" and self.state == "eager":
            return 0.0
        build = self.build_s if self.build_s is not None else self.spec["build_estimate_s"]
        return build + (0.0 if state in ("eager", "compiled") else self.spec["quantize_estimate_s"])

    # ------------------------------------------------------------------ measurements
    def step(self, variant: str, res: int, batch: int) -> None:
        from premier.compile import compiled_graphs

        self.ensure(variant_state(variant))
        with torch.inference_mode():
            x = self.inputs(res, batch)
            fn = self.forward_fn(variant, x)
            t = torch.full((batch,), 0.5, device=self.device, dtype=self.dtype)
            graphs = compiled_graphs()
            self.reset_peak()
            first = self.timed(lambda: fn(x["latents"], t))
            first_peak = self.peak_gb()
            new_graphs = compiled_graphs() - graphs
            self.reset_peak()
            times = [self.timed(lambda: fn(x["latents"], t)) for _ in range(self.spec["repeats"])]
        step_s = statistics.median(times)
        self.step_s[(variant, res, batch)] = step_s
        if variant_state(variant) != "eager":
            if new_graphs:
                self.compile_s.append(max(first - step_s, 0.0))
            self.compiled_buckets.add(self.bucket(variant, res, batch))
        row = {
            "variant": variant,
            "resolution": res,
            "batch": batch,
            "tokens": self.tokens(res),
            "step_s": step_s,
            "min_s": min(times),
            "images_per_s_per_step": batch / step_s,
            "first_call_s": first,
            "new_graphs": new_graphs,
            "compile_s": max(first - step_s, 0.0) if new_graphs else 0.0,
            "peak_gpu_gb": self.peak_gb(),
            "peak_first_call_gpu_gb": first_peak,
            "kernel_backend": kernels.backend_for(x["latents"][:, :1]),
        }
        self.report.add("steps", row)
        print(
            f"step {variant:27s} {res:4d}px B={batch}: {step_s * 1e3:9.1f} ms"
            + (f" (first call {first:.1f} s, {new_graphs} new graphs)" if new_graphs else "")
            + (f", peak {row['peak_gpu_gb']:.1f} GiB" if self.cuda else ""),
            flush=True,
        )

    def generation(self, variant: str, res: int, batch: int) -> None:
        self.ensure(variant_state(variant))
        steps = self.spec["steps"]
        with torch.inference_mode():
            x = self.inputs(res, batch)
            sigmas = torch.linspace(1.0, 0.0, steps + 1, device=self.device)
            timesteps = [sigmas[i].expand(batch).to(self.dtype) for i in range(steps)]

            def run() -> None:
                fn = self.forward_fn(variant, x)  # premier: the adapters run here, once per request
                latents = x["latents"].clone()
                for i in range(steps):
                    v = fn(latents, timesteps[i])
                    latents = latents + (sigmas[i + 1] - sigmas[i]).to(self.dtype) * v

            self.reset_peak()
            total = self.timed(run)
        self.report.add(
            "generations",
            {
                "variant": variant,
                "resolution": res,
                "batch": batch,
                "steps": steps,
                "total_s": total,
                "images_per_s": batch / total,
                "peak_gpu_gb": self.peak_gb(),
            },
        )
        print(f"generation {variant} {res}px B={batch}: {total:.2f} s for {steps} steps", flush=True)

    # ------------------------------------------------------------------ checks at full size
    def check_kernels_vs_inline(self, res: int) -> None:
        self.ensure("eager")
        self.reference_out = self.output("premier_eager", res, 1)
        with kernels.use_backend("inline"):
            inline = self.output("premier_eager", res, 1)
        self.report.data["checks"]["kernels_vs_inline_reference"] = {
            **compare(self.reference_out, inline),
            "kernel_backend": kernels.backend_for(self.reference_out[:, :1].to(self.dtype)),
        }
        self.report.save()

    def check_against_eager(self, variant: str, res: int) -> None:
        if self.reference_out is None:
            raise RuntimeError("no eager output to compare with (its check did not run)")
        self.ensure(variant_state(variant))
        self.report.data["checks"][f"{variant}_vs_eager"] = compare(self.output(variant, res, 1), self.reference_out)
        self.report.save()
        if variant_state(variant) != "eager":
            self.compiled_buckets.add(self.bucket(variant, res, 1))
