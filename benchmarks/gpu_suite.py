"""The GPU suite: the whole GPU story in one run, under 7 minutes on one H100/H200. Nothing is downloaded.

Run it with `scripts/gpu-run.sh OUT_DIR [--smoke|--full] [--budget-s S]`, which installs the
offline wheels (`scripts/gpu-wheels.sh`) and calls `python -m benchmarks.gpu_suite --out-dir OUT_DIR`.

1. Preflight (first; a failure stops the run): the fused ops against the PyTorch reference at
   FLUX and odd shapes in fp32/bf16/fp16, both AdaLN kernel variants, on strided chunked views;
   the Premier transformer at zero delta against stock diffusers; compiled against eager; new
   users and timesteps compile nothing new (`benchmarks.gpu.preflight`).
2. Kernels: device time per call from CUDA graph replay and the host-inclusive time, achieved
   bandwidth against a device-to-device copy of the same bytes measured in the same run, for the
   fused kernel (both AdaLN variants) vs eager PyTorch vs torch.compile of the reference vs the
   inline ops under compile, at B = 8 and 1, T = 512, D = 3072 and the single-stream shape
   (`benchmarks.gpu.kernel_timing`).
3. A FLUX.1-dev-sized transformer with random bf16 weights (19 double + 38 single blocks, the
   reference Premier adapters): one step, plain vs Premier vs the reference release's way
   (adapters every step), eager and regional-compiled, at 1024² and 512², batch 1, 4 and 8; the
   compiled Premier model on float8 (dynamic activations) and int8 weight-only linears; peak memory
   of each; a 28-step 1024² generation compiled at batch 1; full-size agreement checks
   (`benchmarks.gpu.model`).

Everything after the preflight runs under a time budget (default 360 s of measurement, and all
within 385 s of the suite's start, so that with imports and the wheel install the command takes
under 7 minutes): the plan below is in priority order, and when the estimated rest no
longer fits, the least important rows are dropped and listed under "skipped" with the reason
(`benchmarks.gpu.plan`). The JSON and a short Markdown table are rewritten under OUT_DIR after
every measurement (`benchmarks.gpu.report`), so a run cut short keeps what it measured.
A missing package, a host without a GPU, or a card without float8 tensor cores each give one
line and the run goes on with what it can measure.

`--smoke`: the preflight and one row of each measurement on a tiny model, in under 90 s on a GPU
(compile backend "eager", i.e. dynamo without inductor, unless --compile-backend says otherwise;
the full run's preflight compiles with inductor). On a CPU the same code runs (fp32, the kernels
through Triton's interpreter when TRITON_INTERPRET=1, as gpu-run.sh sets it): the suite's own test.

The plan lives here, in `plan_rows`, read (and tuned) top to bottom; the package `benchmarks.gpu`
holds the pieces it schedules.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kernels  # noqa: E402
from benchmarks.common import RESULTS, machine_label  # noqa: E402
from benchmarks.gpu import kernel_timing  # noqa: E402
from benchmarks.gpu.host import detect_device, missing, versions  # noqa: E402
from benchmarks.gpu.model import QUANT_MODES, Models, variant_state  # noqa: E402
from benchmarks.gpu.plan import Row, Scheduler  # noqa: E402
from benchmarks.gpu.preflight import Preflight  # noqa: E402
from benchmarks.gpu.report import Report  # noqa: E402
from benchmarks.gpu.targets import evaluate_targets  # noqa: E402

FULL = dict(
    flux=dict(guidance_embeds=True),  # diffusers' defaults are FLUX.1-dev's sizes
    premier={},  # the reference release: 19 double blocks, 30 x 1024 users, adapter width 3072
    resolutions=[1024, 512],
    batches=[1, 4, 8],
    text_len=512,
    steps=28,
    repeats=3,
    kernel_size=dict(text=512, image=4096, dim=3072),
    kernel_batches=[8, 1],
    kernel_ops=list(kernel_timing.OPS),
    budget_s=360.0,
    total_s=385.0,  # from the suite's start: imports and the wheel install come on top, ~20 s
    # Estimates before anything is measured (then replaced by measurements).
    step_s_per_token=6e-5,  # ~24 GFLOP per token-step at ~400 TFLOP/s
    compile_estimate_s=45.0,
    build_estimate_s=20.0,
    quantize_estimate_s=15.0,
    kernel_row_estimate_s=8.0,
)
SMOKE = dict(
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
    premier=dict(num_user_tokens=4, user_dim=16, adapter_width=32, adapter_heads=2, single_blocks=(0,)),
    resolutions=[32],
    batches=[1],
    text_len=8,
    steps=3,
    repeats=1,
    kernel_size=dict(text=512, image=4096, dim=3072),  # a GPU times the real shape; a CPU interprets:
    cpu_kernel_size=dict(text=8, image=16, dim=64),
    kernel_batches=[1],
    kernel_ops=["adaln_cat_single_stream"],
    budget_s=60.0,
    total_s=None,  # the smoke run is for seeing every path work: its rows are not squeezed
    cpu_budget_s=300.0,
    step_s_per_token=1e-3,
    compile_estimate_s=5.0,
    build_estimate_s=1.0,
    quantize_estimate_s=1.0,
    kernel_row_estimate_s=3.0,
)


# ----------------------------------------------------------------------------- the plan
def plan_rows(
    spec: dict,
    models: Models,
    report: Report,
    device: torch.device,
    dtype: torch.dtype,
    backend: str,
    unavailable: dict[str, str | None],
    smoke: bool,
) -> list[Row]:
    """Every measurement in execution order, each with its importance (1 = most important).

    Eager rows come before compiled ones (regional compilation is in place), bf16 before the
    quantized variants (each quantization rebuilds the model).
    """
    cuda = device.type == "cuda"
    rows: list[Row] = []
    kernel_walls: list[float] = []
    compiled_refs: dict[str, Callable] = {}
    size = spec["kernel_size"] if cuda else spec.get("cpu_kernel_size", spec["kernel_size"])

    def kernel_row(op: str, b: int) -> Callable[[], None]:
        def run() -> None:
            t0 = time.perf_counter()
            report.add("kernels", kernel_timing.measure_row(op, b, size, dtype, device, backend, compiled_refs))
            kernel_walls.append(time.perf_counter() - t0)

        return run

    def copy_row() -> None:
        report.data["copy_bandwidth"] = kernel_timing.copy_bandwidth(device)
        report.save()
        print(f"device-to-device copy: {report.data['copy_bandwidth']['gb_per_s']:.0f} GB/s", flush=True)

    def kernel_estimate() -> float:
        return max(kernel_walls) if kernel_walls else spec["kernel_row_estimate_s"]

    rows.append(Row("copy bandwidth (2 GiB)", 1, copy_row, lambda: 2.0, unavailable=unavailable["gpu"]))
    for b in spec["kernel_batches"]:
        for op in spec["kernel_ops"]:
            prio = 1 if smoke or (b > 1 and op == "adaln_per_token") else 2 if b > 1 else 3
            why = None if smoke else unavailable["gpu"]  # a CPU times kernels only in the smoke run
            rows.append(Row(f"kernel {op} B={b}", prio, kernel_row(op, b), kernel_estimate, unavailable=why))

    def model_row(name: str, prio: int, run: Callable[[], None], estimate: Callable[[], float], state: str) -> Row:
        key = "model:bf16" if state in ("eager", "compiled") else f"model:{state}"
        why = unavailable["model"] or (unavailable.get(state) if state in QUANT_MODES.values() else None)
        return Row(name, prio, run, estimate, [(key, lambda: models.setup_estimate(state))], unavailable=why)

    def step(variant: str, res: int, b: int, prio: int) -> None:
        calls = 1 + spec["repeats"]
        rows.append(
            model_row(
                f"step {variant} {res}px B={b}",
                prio,
                lambda: models.step(variant, res, b),
                lambda: models.row_estimate(variant, res, b, calls),
                variant_state(variant),
            )
        )

    def generation(variant: str, res: int, b: int, prio: int) -> None:
        calls = spec["steps"] + 1
        rows.append(
            model_row(
                f"generation {variant} {res}px B={b} ({spec['steps']} steps)",
                prio,
                lambda: models.generation(variant, res, b),
                lambda: models.row_estimate(variant, res, b, calls),
                variant_state(variant),
            )
        )

    def check(name: str, variant: str, res: int, prio: int, run: Callable[[], None]) -> None:
        rows.append(
            model_row(
                f"check {name}", prio, run, lambda: models.row_estimate(variant, res, 1, 2), variant_state(variant)
            )
        )

    if smoke:
        (res,), (b,) = spec["resolutions"], spec["batches"]
        for v in ("plain_eager", "premier_eager", "premier_reference_eager"):
            step(v, res, b, 1)
        check("kernels vs inline", "premier_eager", res, 1, lambda: models.check_kernels_vs_inline(res))
        for v in ("plain_compiled", "premier_compiled", "premier_reference_compiled"):
            step(v, res, b, 1)
        check(
            "compiled vs eager", "premier_compiled", res, 1, lambda: models.check_against_eager("premier_compiled", res)
        )
        generation("premier_compiled", res, b, 1)
        for v in QUANT_MODES:
            step(v, res, b, 1)
            check(f"{v} vs eager", v, res, 1, lambda v=v: models.check_against_eager(v, res))
        return rows

    # The full run. Checks run at (hi, 1), whose buckets the steps compile anyway.
    hi, lo = spec["resolutions"]
    eager = {(hi, 1): 1, (lo, 1): 2, (lo, 8): 2, (hi, 8): 3, (lo, 4): 4, (hi, 4): 4}
    for (res, b), prio in eager.items():
        for v in ("premier_eager", "plain_eager"):
            step(v, res, b, prio)
    step("premier_reference_eager", hi, 1, 2)
    step("premier_reference_eager", lo, 8, 4)
    check("kernels vs inline", "premier_eager", hi, 2, lambda: models.check_kernels_vs_inline(hi))
    # Compiled: every new bucket costs a compilation (~45 s at this size), so few buckets are important.
    for v in ("premier_compiled", "plain_compiled"):
        step(v, hi, 1, 1)
    check("compiled vs eager", "premier_compiled", hi, 1, lambda: models.check_against_eager("premier_compiled", hi))
    generation("premier_compiled", hi, 1, 1)
    step("premier_reference_compiled", hi, 1, 3)
    generation("plain_compiled", hi, 1, 3)
    compiled = {(lo, 8): (2, 3), (lo, 1): (3, 3), (hi, 8): (4, 4), (lo, 4): (4, 4), (hi, 4): (4, 4)}
    for (res, b), (premier_prio, plain_prio) in compiled.items():
        step("premier_compiled", res, b, premier_prio)
        step("plain_compiled", res, b, plain_prio)
    # Quantized (each rebuilds the model, then compiles): one bucket each is important.
    for v in QUANT_MODES:
        step(v, hi, 1, 2)
        check(f"{v} vs eager", v, hi, 2, lambda v=v: models.check_against_eager(v, hi))
        step(v, lo, 8, 4)
    return rows


# ----------------------------------------------------------------------------- the run
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--smoke", "--tiny", action="store_true", help="preflight and one row of each, tiny model")
    mode.add_argument("--full", action="store_true", help="everything at FLUX.1-dev size (the default)")
    ap.add_argument("--budget-s", type=float, help="seconds of measurement after the preflight (default 360; smoke 60)")
    ap.add_argument(
        "--total-s", type=float, help="cap on the whole process: shrinks the budget (default 385 on a GPU; smoke none)"
    )
    ap.add_argument(
        "--compile-backend", help="torch.compile backend (default inductor; eager in the smoke run and on a CPU)"
    )
    ap.add_argument("--out-dir", help="where the JSON and Markdown go (default benchmarks/results/<card>/)")
    return ap


def run(args: argparse.Namespace, start: float) -> tuple[dict, int]:
    smoke = bool(args.smoke)
    spec = SMOKE if smoke else FULL
    device, device_info = detect_device()
    name = "gpu_suite_smoke" if smoke else "gpu_suite"
    report = Report(args.out_dir or RESULTS / machine_label(), name, "smoke" if smoke else "full", start)
    try:
        return _run(args, start, smoke, spec, device, device_info, report)
    except BaseException as e:  # the document says how the run ended, whatever ended it
        report.data["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "error"
        report.data["notes"].append(f"stopped by {type(e).__name__}: {e}")
        report.save()
        raise


def _run(
    args: argparse.Namespace,
    start: float,
    smoke: bool,
    spec: dict,
    device: torch.device,
    device_info: dict[str, Any],
    report: Report,
) -> tuple[dict, int]:
    cuda = device.type == "cuda"
    report.data["device"] = device_info
    report.data["versions"] = versions()
    if not cuda:
        report.note(
            f"no CUDA GPU: {device_info['no_gpu_reason']}; "
            + ("the smoke run measures on the CPU" if smoke else "every GPU measurement is skipped")
        )
    for wheel in filter(None, os.environ.get("PREMIER_GPU_MISSING_WHEELS", "").split(",")):
        report.note(f"missing wheel {wheel} (scripts/gpu-wheels.sh): the host's copy is used, if it has one")
    unavailable: dict[str, str | None] = {
        "gpu": None if cuda else f"no CUDA GPU ({device_info['no_gpu_reason']})",
        "model": missing("diffusers") or missing("premier.transformer"),
    }
    if unavailable["model"]:
        report.note(f"FLUX-sized rows skipped: {unavailable['model']}")
    torchao = missing("torchao.quantization")
    for mode in QUANT_MODES.values():
        why = torchao
        if not why and (cuda or smoke):  # without a GPU the full run skips them all anyway
            from premier.quantize import QuantizationUnavailable, check_supported

            try:
                check_supported(mode, device)
            except QuantizationUnavailable as e:
                why = str(e).split(". Use ")[0]
        unavailable[mode] = why
        if why:
            report.note(f"{mode} rows skipped: {why}")
    preflight_model = unavailable["model"]  # the small-model checks run on a CPU too
    if not cuda and not smoke:
        unavailable["model"] = unavailable["gpu"]

    dtype = torch.bfloat16 if cuda else torch.float32
    backend = args.compile_backend or ("inductor" if cuda and not smoke else "eager")
    report.data["config"] = {
        "flux": spec["flux"],
        "premier": spec["premier"] or "reference (PremierConfig defaults)",
        "resolutions": spec["resolutions"],
        "batches": spec["batches"],
        "text_len": spec["text_len"],
        "steps": spec["steps"],
        "repeats": spec["repeats"],
        "dtype": str(dtype),
        "compile": {"mode": "regional", "backend": backend, "dynamic": False},
        "kernel_backend_policy": kernels.get_backend(),
        "adaln_variant_default": kernels.modulation.get_adaln_variant(),
        "triton_interpret": kernels.modulation.INTERPRET,
    }

    print(f"== preflight on {device_info['name'] or 'the CPU'}", flush=True)
    passed = Preflight(report, device, backend, preflight_model).run()
    if not passed:
        report.data["status"] = "preflight_failed"
        report.note("preflight failed: nothing is timed (see preflight.checks in the JSON)")
        return report.data, 1

    budget = args.budget_s or (spec["budget_s"] if cuda or not smoke else spec["cpu_budget_s"])
    total = args.total_s if args.total_s is not None else (spec["total_s"] if cuda else None)
    effective = budget if total is None else max(0.0, min(budget, total - (time.perf_counter() - start)))
    report.data["budget"] = {"measurement_s": budget, "total_s": total, "effective_s": effective, "used_s": 0.0}
    print(f"== measurements: {effective:.0f} s budget", flush=True)
    models = Models(spec, device, dtype, backend, report)
    scheduler = Scheduler(effective, report)
    try:
        scheduler.run(plan_rows(spec, models, report, device, dtype, backend, unavailable, smoke))
    finally:
        report.data["budget"]["used_s"] = scheduler.elapsed()
        report.data["targets"] = evaluate_targets(report.data, spec)
        report.save()
    report.data["status"] = "complete"
    report.save()
    targets = {k: v for k, v in report.data["targets"].items() if isinstance(v, dict) and "pass" in v}
    print(
        f"wrote {report.json_path} and {report.md_path.name} after {time.perf_counter() - start:.0f} s; "
        f"{len(report.data['skipped'])} skipped"
        + "".join(f"; {k} {'pass' if v['pass'] else 'FAIL'}" for k, v in targets.items()),
        flush=True,
    )
    return report.data, 0


def main(argv: list[str] | None = None) -> dict:
    """Run the suite; returns the result document (tests call this)."""
    return _main(argv)[0]


def _main(argv: list[str] | None = None) -> tuple[dict, int]:
    start = time.perf_counter()
    args = _parser().parse_args(argv)
    threads = torch.get_num_threads()
    if args.smoke and not torch.cuda.is_available():
        torch.set_num_threads(1)  # a tiny model gains nothing from threads on a shared CPU
    try:
        return run(args, start)
    finally:
        torch.set_num_threads(threads)


def _terminate(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    sys.exit(_main()[1])
