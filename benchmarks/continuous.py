"""Step-level vs request-level batching under open-loop Poisson traffic of mixed steps, users and sizes.

Both modes run in this process through the same `serving.generator.Generator` class the server
deploys (no Ray: the comparison is the scheduling, not the transport), on the same arrival trace:
25 % 4-step, 50 % 8-step and 25 % 28-step requests, users drawn from the checkpoint's (and none),
two resolutions half and half. The load levels are fractions (default 50 %, 80 %, 100 %) of the
request-level saturation rate, measured first with a closed burst of the same mix. Per level
and mode: images/s, latency p50/p99, queue-wait p50, time to first step p50, mean batch
occupancy (request-level: requests per forward; step-level: requests per step).

Models: the embedded one, and a mid-size FLUX-architecture model (random weights, ~36M transformer
parameters, 64x64 images) on which batching pays off on a CPU. `--flux-dev` adds FLUX.1-dev sizes
with random weights (a GPU's job). Goal at 80 % load: step-level p50 latency >= 1.5x lower
than request-level and throughput not lower; the ratios are in the JSON.

Run: `python benchmarks/continuous.py` (~15 min on 2 cores), `--quick` (a smoke run), `--models
embedded`. Writes JSON (`--out`, default benchmarks/results/<machine>/continuous.json) and a PNG
plot of latency against load beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_result  # noqa: E402

STEP_MIX = ((4, 0.25), (8, 0.50), (28, 0.25))
FULL = dict(models=["embedded", "mid"], loads=[0.5, 0.8, 1.0], requests=48, saturation_requests=24, max_batch_size=8)
QUICK = dict(models=["embedded"], loads=[0.5, 1.0], requests=8, saturation_requests=6, max_batch_size=4)


def model_spec(model: str):
    """The random-weight FLUX-architecture sizes the benchmarks use besides the embedded model: 'mid' (~36M
    transformer parameters, 64x64 images) and 'flux-dev' (FLUX.1-dev's shapes)."""
    from premier.models.embedded import EmbeddedSpec

    return {
        "mid": EmbeddedSpec(
            num_layers=2,
            num_single_layers=4,
            num_attention_heads=8,
            attention_head_dim=64,
            axes_dims_rope=(16, 24, 24),
            text_dim=256,
            pooled_dim=128,
            image_size=64,
            adapter_width=128,
        ),
        "flux-dev": EmbeddedSpec(
            num_layers=19,
            num_single_layers=38,
            num_attention_heads=24,
            attention_head_dim=128,
            axes_dims_rope=(16, 56, 56),
            text_dim=4096,
            pooled_dim=768,
            max_sequence_length=512,
            image_size=1024,
            codec_factor=8,
            adapter_width=1024,
        ),
    }[model]


def build_pipe(model: str):
    """(pipeline, the two resolutions of the mix)."""
    from premier.models.embedded import build_embedded_flux, build_embedded_premier
    from premier.models.loading import profile_for
    from premier.pipeline import PremierPipeline

    if model == "embedded":
        pipe = PremierPipeline.load()
        size = pipe.profile.default_size
        return pipe, (size, size + size // 2)
    spec = model_spec(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    flux = build_embedded_flux(spec=spec, weights=None).to(device=device, dtype=dtype)
    premier = build_embedded_premier(spec=spec, weights=None)
    pipe = PremierPipeline(flux, premier, profile_for(flux, embedded=True), model)
    size = spec.image_size
    return pipe, (size, size // 2)


def trace(n: int, rate: float, sizes: tuple[int, int], users: list[str], seed: int) -> list[tuple[float, dict]]:
    """n (arrival time, request fields) with Poisson arrivals at `rate` per second (rate 0: all at once)."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        steps = rng.choices([s for s, _ in STEP_MIX], [w for _, w in STEP_MIX])[0]
        size = rng.choice(sizes)
        user = rng.choice([*users, None])
        out.append((t, dict(prompt=f"a shape {i % 5}", seed=1000 + i, steps=steps, size=size, user=user)))
        if rate > 0:
            t += rng.expovariate(rate)
    return out


async def replay(generator, pipe, arrivals: list[tuple[float, dict]]) -> dict[str, Any]:
    """Send the trace open-loop (arrivals never wait for answers); summarise what came back."""
    from serving.protocol import ImageRequest, ImageResult

    start = time.perf_counter()
    epoch = time.time()

    async def one(at: float, f: dict):
        await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
        settings = pipe.default_settings(steps=f["steps"], height=f["size"], width=f["size"])
        sent = time.perf_counter()
        request = ImageRequest(f["prompt"], f["seed"], settings, user=f["user"], received_at=epoch + (sent - start))
        result = await submit(generator, request)
        return sent, time.perf_counter(), result

    done = await asyncio.gather(*(one(at, f) for at, f in arrivals))
    ok = [(s, e, r) for s, e, r in done if isinstance(r, ImageResult)]
    latencies = sorted(e - s for s, e, _ in ok)
    span = max(e for _, e, _ in ok) - min(s for s, _, _ in ok)
    waits = [r.timings.get("queue_wait_s", 0.0) for _, _, r in ok]
    firsts = [r.timings["first_step_s"] for _, _, r in ok if "first_step_s" in r.timings]
    steps_log = [o for _, _, r in ok for o, _, _ in r.step_log]
    if steps_log:
        occupancy = statistics.fmean(steps_log)
    else:  # request-level: each batch counted once, by its first request
        batches = {r.batch_id: r.batch_size for _, _, r in ok}
        occupancy = statistics.fmean(batches.values())
    return {
        "requests": len(arrivals),
        "answered": len(ok),
        "images_per_s": len(ok) / span,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "queue_wait_p50_s": statistics.median(waits),
        "first_step_p50_s": statistics.median(firsts) if firsts else None,
        "mean_occupancy": occupancy,
        "forwards": len(steps_log) if steps_log else None,
    }


async def submit(generator, request):
    """The generator's own entry point; request-level batching without Serve's batch former (it needs a replica):
    every call deposits one request and whoever holds the pipeline runs everything waiting, as in the server
    under load (minus its 2 ms wait for a batch to fill)."""
    if generator.stepper is not None:
        return await generator.generate(request)
    (result,) = await type(generator)._batch.__wrapped__(generator, [request])
    return result


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


async def run_model(model: str, cfg: dict) -> dict[str, Any]:
    from serving.config import build_config
    from serving.generator import Generator

    pipe, sizes = build_pipe(model)
    users = pipe.user_ids[:8]
    base = {"max_batch_size": cfg["max_batch_size"], "torch_threads": cfg["threads"]}
    request_level = Generator(build_config({**base, "batching": "request"}, environ={}).to_args(), pipe=pipe)
    step_args = {**base, "batching": "step", "step_profile_sizes": list(sizes)}  # measured here, at both sizes
    step_level = Generator(build_config(step_args, environ={}).to_args(), pipe=pipe)
    modes = {"request": request_level, "step": step_level}
    burst = trace(cfg["saturation_requests"], 0.0, sizes, users, seed=1)
    saturation = (await replay(request_level, pipe, burst))["images_per_s"]
    print(f"[{model}] request-level saturation: {saturation:.2f} images/s", flush=True)
    levels = []
    for i, load in enumerate(cfg["loads"]):
        arrivals = trace(cfg["requests"], load * saturation, sizes, users, seed=100 + i)
        row: dict[str, Any] = {"load": load, "offered_rps": load * saturation}
        for name, generator in modes.items():
            row[name] = await replay(generator, pipe, arrivals)
            r = row[name]
            print(
                f"[{model}] load {load:.0%} {name:7s}: {r['images_per_s']:.2f} img/s, p50 {r['latency_p50_s']:.2f}s, "
                f"p99 {r['latency_p99_s']:.2f}s, occupancy {r['mean_occupancy']:.2f}",
                flush=True,
            )
        row["p50_latency_request_over_step"] = row["request"]["latency_p50_s"] / row["step"]["latency_p50_s"]
        row["throughput_step_over_request"] = row["step"]["images_per_s"] / row["request"]["images_per_s"]
        levels.append(row)
    return {
        "model": model,
        "sizes": list(sizes),
        "transformer_params_m": sum(p.numel() for p in pipe.flux_pipe.transformer.parameters()) / 1e6,
        "step_profile_s": {str(t): sec for t, sec in step_level.step_profile.tables.items()},
        "step_caps": {str(t): step_level.step_profile.cap_for(t) for t in step_level.step_profile.tables},
        "request_level_saturation_rps": saturation,
        "levels": levels,
    }


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        loads = [row["load"] for row in res["levels"]]
        for mode, colour in (("request", "tab:red"), ("step", "tab:blue")):
            ax.plot(
                loads, [row[mode]["latency_p50_s"] for row in res["levels"]], "o-", color=colour, label=f"{mode} p50"
            )
            ax.plot(
                loads, [row[mode]["latency_p99_s"] for row in res["levels"]], "o--", color=colour, label=f"{mode} p99"
            )
        ax.set_title(f"{res['model']} ({res['transformer_params_m']:.0f}M)")
        ax.set_xlabel("load (fraction of request-level saturation)")
        ax.set_ylabel("latency (s)")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", help="comma-separated: embedded, mid, flux-dev")
    p.add_argument("--flux-dev", action="store_true", help="add FLUX.1-dev sizes, random weights (GPU)")
    p.add_argument("--requests", type=int)
    p.add_argument(
        "--threads",
        type=int,
        default=1 if not torch.cuda.is_available() else None,
        help="torch threads of the generators (CPU default 1: the client and the scheduler's event loop share the "
        "machine, and two threads on a busy 2-core machine stall on each other)",
    )
    p.add_argument("--out")
    args = p.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.models:
        cfg["models"] = args.models.split(",")
    if args.flux_dev:
        cfg["models"] = [*cfg["models"], "flux-dev"]
    if args.requests:
        cfg["requests"] = args.requests
    cfg["threads"] = args.threads
    results = [asyncio.run(run_model(m, cfg)) for m in cfg["models"]]
    goal = {}
    for res in results:
        at80 = next((row for row in res["levels"] if abs(row["load"] - 0.8) < 1e-9), None)
        if at80 is not None:
            goal[res["model"]] = {
                "p50_latency_request_over_step": at80["p50_latency_request_over_step"],
                "throughput_step_over_request": at80["throughput_step_over_request"],
                "met": at80["p50_latency_request_over_step"] >= 1.5 and at80["throughput_step_over_request"] >= 0.97,
            }
    payload = {"config": cfg, "step_mix": STEP_MIX, "results": results, "goal_at_80pct": goal}
    name = "continuous_quick" if args.quick else "continuous"
    path = write_result(name, payload, args.out)
    try:
        plot(results, path.with_suffix(".png"))
    except ImportError:
        pass
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
