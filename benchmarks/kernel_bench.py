"""The modulation ops at FLUX.1-dev sizes: fused Triton kernel vs eager PyTorch vs torch.compile.

For B in 1, 4, 8, T = 512 text tokens and D = 3072 it times
  adaln_per_token           the text stream's AdaLN with (B, T, D) scale/shift (chunks of the
                            (B, T, 6D) embedding, as the modulated block passes them);
  adaln_per_sample          the image-stream form, (B, D) scale/shift;
  adaln_cat_single_stream   a single-stream block's input: T text rows per token + 4096 image rows
                            (1024x1024) per sample, written as one (B, T + 4096, D) tensor;
  gated_residual_per_token  x + gate * y with a per-token gate;
as `eager` (the PyTorch reference, op by op), `compiled` (torch.compile of the reference,
inductor) and, on a GPU, `fused` (the Triton kernel through its custom operator). It reports
the minimum bytes each op must move, the achieved bandwidth and, on a GPU, its fraction of the
card's peak; on a CPU `fallback` is what `kernels` runs there (the inline reference).
Ratios are to eager in the same run. Run: `python benchmarks/kernel_bench.py` (`--quick`: tiny shapes).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: E402
from benchmarks.common import interleaved, write_result  # noqa: E402
from kernels import adaln_modulate_reference, gated_residual_reference  # noqa: E402

# Peak HBM bandwidth in bytes/s by card name (vendor data sheets).
PEAK_BANDWIDTH = {
    "h200": 4.8e12,
    "h100 80gb hbm3": 3.35e12,  # SXM
    "h100 nvl": 3.9e12,
    "h100 pcie": 2.0e12,
    "h100": 3.35e12,
    "a100-sxm4-80gb": 2.039e12,
    "a100 80gb pcie": 1.935e12,
    "a100": 1.555e12,
    "l40s": 0.864e12,
    "a10g": 0.6e12,
    "l4": 0.3e12,
}
TARGET = {"op": "adaln_per_token", "batch": 8, "min_speedup_vs_eager": 2.0, "min_peak_fraction": 0.70}
FULL = dict(batches=[1, 4, 8], text=512, image=4096, dim=3072)
QUICK = dict(batches=[2], text=8, image=16, dim=64)


def peak_bandwidth(name: str) -> float | None:
    name = name.lower()
    for key, value in PEAK_BANDWIDTH.items():  # most specific keys first
        if key in name:
            return value
    return None


def make_cases(b: int, t: int, l: int, d: int, dtype: torch.dtype, device: torch.device) -> dict[str, dict[str, Any]]:
    """Inputs and the reference function of each op, with the bytes it must read and write at least."""
    g = torch.Generator(device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    x, y, image = r(b, t, d), r(b, t, d), r(b, l, d)
    emb = r(b, t, 6 * d)  # the modulated block's per-token AdaLN embedding
    shift, scale, gate = emb.chunk(6, dim=-1)[:3]
    s_scale, s_shift, i_scale, i_shift = r(b, d), r(b, d), r(b, d), r(b, d)
    e = torch.finfo(dtype).bits // 8
    btd, bd = b * t * d * e, b * d * e

    def cat_ref(text, img, ts, th, is_, ih, eps):
        return torch.cat([adaln_modulate_reference(text, ts, th, eps), adaln_modulate_reference(img, is_, ih, eps)], 1)

    return {
        "adaln_per_token": dict(
            args=(x, scale, shift, 1e-6), ref=adaln_modulate_reference, fused=kernels.adaln_modulate, bytes=4 * btd
        ),
        "adaln_per_sample": dict(
            args=(x, s_scale, s_shift, 1e-6),
            ref=adaln_modulate_reference,
            fused=kernels.adaln_modulate,
            bytes=2 * btd + 2 * bd,
        ),
        "adaln_cat_single_stream": dict(
            args=(x, image, scale, shift, i_scale, i_shift, 1e-6),
            ref=cat_ref,
            fused=kernels.adaln_modulate_cat,
            bytes=2 * (btd + b * l * d * e) + 2 * btd + 2 * bd,
        ),
        "gated_residual_per_token": dict(
            args=(x, gate, y), ref=gated_residual_reference, fused=kernels.gated_residual, bytes=4 * btd
        ),
    }


def run(size: dict, dtype: torch.dtype, device: torch.device, repeats: int) -> list[dict]:
    gpu = device.type == "cuda"
    inner = 20 if gpu else 1  # GPU calls are tens of microseconds: time a loop, not one launch
    peak = peak_bandwidth(torch.cuda.get_device_name(device)) if gpu else None
    compiled_refs: dict[str, Callable] = {}
    rows = []
    for b in size["batches"]:
        cases = make_cases(b, size["text"], size["image"], size["dim"], dtype, device)
        for name, case in cases.items():
            args, ref = case["args"], case["ref"]
            if name not in compiled_refs:
                compiled_refs[name] = torch.compile(ref, fullgraph=True, dynamic=False)
            comp = compiled_refs[name]

            def loop(fn: Callable) -> Callable[[], None]:
                return lambda: [fn(*args) for _ in range(inner)]

            with torch.inference_mode():
                fns = {"eager": loop(ref), "compiled": loop(comp)}
                expected = ref(*args)
                errors = {"compiled": (comp(*args).float() - expected.float()).abs().max().item()}
                if gpu:
                    with kernels.use_backend("triton"):
                        errors["fused"] = (case["fused"](*args).float() - expected.float()).abs().max().item()
                    fused_fn = case["fused"]

                    def fused_loop(fused_fn=fused_fn):
                        with kernels.use_backend("triton"):
                            for _ in range(inner):
                                fused_fn(*args)

                    fns["fused"] = fused_loop
                else:
                    fallback = case["fused"]  # the public op: on a CPU it runs the inline reference
                    fns["fallback"] = loop(fallback)
                t = interleaved(fns, repeats=repeats, warmup=2)
            secs = {k: v["median_s"] / inner for k, v in t.items()}
            row: dict[str, Any] = {
                "op": name,
                "batch": b,
                "text_tokens": size["text"],
                "image_tokens": size["image"] if name == "adaln_cat_single_stream" else 0,
                "dim": size["dim"],
                "dtype": str(dtype).removeprefix("torch."),
                "bytes": case["bytes"],
                "eager_s": secs["eager"],
                "compiled_s": secs["compiled"],
                "fused_s": secs.get("fused"),
                "fallback_s": secs.get("fallback"),
                "fallback_backend": None
                if gpu
                else kernels.backend_for(*[a for a in args if isinstance(a, torch.Tensor)]),
                "compiled_speedup_vs_eager": secs["eager"] / secs["compiled"],
                "max_abs_error_vs_eager": errors,
            }
            for k in ("eager", "compiled", "fused", "fallback"):
                if k in secs:
                    row[f"{k}_gb_per_s"] = case["bytes"] / secs[k] / 1e9
                    if peak:
                        row[f"{k}_peak_fraction"] = case["bytes"] / secs[k] / peak
            if "fused" in secs:
                row["fused_speedup_vs_eager"] = secs["eager"] / secs["fused"]
                row["fused_speedup_vs_compiled"] = secs["compiled"] / secs["fused"]
            rows.append(row)
            best = "fused" if "fused" in secs else "fallback"
            print(
                f"{name:26s} B={b}: eager {secs['eager'] * 1e3:8.3f} ms | compiled x{row['compiled_speedup_vs_eager']:.2f}"
                f" | {best} {secs[best] * 1e3:8.3f} ms ({row[f'{best}_gb_per_s']:.1f} GB/s"
                + (f", {row[f'{best}_peak_fraction']:.0%} of peak)" if peak else ")")
            )
    return rows


def targets(rows: list[dict]) -> dict[str, Any] | None:
    """The issue's kernel targets, at (B=8, T=512, D=3072), when measured on a GPU."""
    row = next((r for r in rows if r["op"] == TARGET["op"] and r["batch"] == TARGET["batch"] and r["fused_s"]), None)
    if row is None:
        return None
    fraction = row.get("fused_peak_fraction")
    return {
        "fused_speedup_vs_eager": row["fused_speedup_vs_eager"],
        "speedup_pass": row["fused_speedup_vs_eager"] >= TARGET["min_speedup_vs_eager"],
        "fused_peak_fraction": fraction,
        "bandwidth_pass": None if fraction is None else fraction >= TARGET["min_peak_fraction"],
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (a smoke test)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per variant (default 25 on GPU, 7 on CPU)")
    ap.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, float32 on CPU"
    )
    ap.add_argument("--threads", type=int, help="CPU threads (default torch's; 1 is steadier on a shared CPU)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/kernel_bench.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    size = QUICK if args.quick else FULL
    repeats = args.repeats or (2 if args.quick else 25 if device.type == "cuda" else 7)
    rows = run(size, dtype, device, repeats)
    payload = {
        "device": device.type,
        "config": {"size": size, "quick": args.quick, "repeats": repeats, "dtype": str(dtype)},
        "peak_bandwidth_bytes_per_s": peak_bandwidth(torch.cuda.get_device_name(device))
        if device.type == "cuda"
        else None,
        "target": TARGET,
        "targets": targets(rows),
        "results": rows,
    }
    path = write_result("kernel_bench" + ("_quick" if args.quick else ""), payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
