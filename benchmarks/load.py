"""Open-loop load against the server's HTTP API: throughput and latency against offered load and max batch size.

Requests (`POST /v1/generate`, JSON answers with per-request timings) arrive on a Poisson
schedule that does not wait for answers (open loop: a slow server faces a growing queue, as it
would in production, instead of a client that politely slows down). For each max batch size
(default 1, the baseline, and 8) the benchmark starts the server itself (`premier serve` on
the embedded model, in its own process, on free ports), then:

  low load   fixed-rate requests far apart: the server's own overhead, end to end (as the client
             sees it) minus the pipeline time the response reports, p50/p95; and the server's own
             account of it (`timings.server_overhead_s`, measured inside the ingress);
  probe      a burst of requests to estimate the saturation throughput;
  sweep      Poisson arrivals at fractions and multiples of that estimate, then once more at 2x
             the best throughput the sweep measured (the saturation load): images/s, latency
             p50/p95/p99, mean batch size, and how every request ended: 200, 503 (refused by the
             bounded queue), other 4xx, 5xx, or lost (no answer before the client's timeout).

The batch-size comparison is a ratio against max batch size 1 measured in the same run, next to
the same ratio for the pipeline alone (called in this process on one thread, no server), which
bounds what batching can give on the machine. Targets:
server overhead p50 <= 15 ms at low load; max batch size 8 >= 3x the images/s of max batch
size 1; at 2x saturation no request lost and none answered 5xx (the excess gets 503), and the
images answered per second stay within 10 % of the saturation throughput (goodput).

Run: `python benchmarks/load.py` (~10 min on 2 cores), `--batch-sizes 1,8`, `--quick` (a smoke
run), or `--url http://host:port` against a server that is already running (one sweep, its own
max batch size). On a small machine the client, Ray's HTTP proxy and the ingress share the model's
cores, so every refused request takes CPU from the model; `--pin` gives the model a core of its own
(as on a GPU node, where the front never runs on the model's CPU) and writes `load_pinned.json`. Writes JSON (`--out`, default benchmarks/results/<machine>/load.json) and a
PNG plot beside it.

One module on purpose: the load generator, the server it starts and the report are one experiment whose
sections share the Sample/summary schema that the targets and the plot read, and no other code uses them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

PROMPTS = (
    "a cat on a sofa",
    "a lighthouse at dusk",
    "a bowl of fruit",
    "a mountain lake",
    "a city street in the rain",
    "a red bicycle",
)
FULL = dict(
    batch_sizes=[1, 8],
    low_load_requests=40,
    low_load_rps=2.0,
    probe_requests=48,
    level_s=20.0,
    fractions=[0.25, 0.5, 1.0, 1.5],
    client_timeout_s=150.0,
    pipeline_repeats=7,
)
QUICK = dict(
    FULL,
    batch_sizes=[4],
    low_load_requests=6,
    low_load_rps=4.0,
    probe_requests=12,
    level_s=2.0,
    fractions=[0.5],
    client_timeout_s=60.0,
    pipeline_repeats=1,
)
TARGET_OVERHEAD_P50_MS = 15.0
TARGET_BATCH_RATIO = 3.0
TARGET_GOODPUT_LOSS = 0.10  # useful throughput at 2x saturation within 10 % of saturation


@dataclass
class Sample:
    """One request as the client saw it; `status` None means lost (no HTTP answer)."""

    scheduled_s: float
    lag_s: float  # how late the client sent it (open-loop fidelity)
    latency_s: float
    status: int | None
    pipeline_s: float | None = None
    queue_wait_s: float | None = None
    server_overhead_s: float | None = None
    batch_size: int | None = None
    error: str | None = None


# ---------------------------------------------------------------------- the load generator
def payloads(users: list[str | None], seed: int) -> Iterator[dict[str, Any]]:
    """Requests cycling through users and prompts with fresh seeds, all at the model's default settings."""
    rng = random.Random(seed)
    i = 0
    while True:
        yield {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "user_id": users[i % len(users)],
            "seed": rng.randrange(2**31),
            "format": "json",
        }
        i += 1


def arrivals(rate: float, n: int, poisson: bool, rng: random.Random) -> list[float]:
    """Send times (s from start) of n requests at `rate` per second."""
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate) if poisson else 1.0 / rate
    return out


async def _one(
    session: Any, url: str, body: dict[str, Any], scheduled: float, start: float, timeout_s: float
) -> Sample:
    import aiohttp

    sent = time.perf_counter()
    lag = sent - start - scheduled
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            data = await resp.read()
            latency = time.perf_counter() - sent
            sample = Sample(scheduled, lag, latency, resp.status)
            if resp.status == 200:
                t = json.loads(data)["timings"]
                sample.pipeline_s, sample.queue_wait_s = t.get("pipeline_s"), t.get("queue_wait_s")
                sample.server_overhead_s, sample.batch_size = t.get("server_overhead_s"), t.get("batch_size")
            elif resp.status >= 500 and resp.status != 503:
                sample.error = data[:300].decode("utf-8", "replace")
            return sample
    except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
        return Sample(scheduled, lag, time.perf_counter() - sent, None, error=f"{type(e).__name__}: {e}")


async def offer(
    url: str, times: list[float], bodies: Iterator[dict[str, Any]], timeout_s: float
) -> tuple[list[Sample], float]:
    """Send one request at each time (never waiting for answers); returns the samples and the wall time to the last answer."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        tasks = []
        for t in times:
            delay = start + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_one(session, url + "/v1/generate", next(bodies), t, start, timeout_s)))
        samples = await asyncio.gather(*tasks)
        return list(samples), time.perf_counter() - start


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def _ms(values: list[float], qs: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    return {f"p{q}_ms": (None if _pct(values, q) is None else round(1000 * _pct(values, q), 3)) for q in qs}  # type: ignore[operator]


def summarise(samples: list[Sample], offered_rps: float | None, wall_s: float) -> dict[str, Any]:
    ok = [s for s in samples if s.status == 200]
    refused = [s for s in samples if s.status == 503]
    errors_5xx = [s for s in samples if s.status is not None and s.status >= 500 and s.status != 503]
    errors_4xx = [s for s in samples if s.status is not None and 400 <= s.status < 500]
    lost = [s for s in samples if s.status is None]
    e2e_overhead = [s.latency_s - s.pipeline_s for s in ok if s.pipeline_s is not None]
    return {
        "offered_rps": None if offered_rps is None else round(offered_rps, 3),
        "requests": len(samples),
        "ok": len(ok),
        "refused_503": len(refused),
        "client_errors_4xx": len(errors_4xx),
        "server_errors_5xx": len(errors_5xx),
        "lost": len(lost),
        "wall_s": round(wall_s, 3),
        "images_per_s": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "latency": _ms([s.latency_s for s in ok]),
        "refusal_latency": _ms([s.latency_s for s in refused], (50, 99)),
        "queue_wait": _ms([s.queue_wait_s for s in ok if s.queue_wait_s is not None], (50, 95)),
        "pipeline": _ms([s.pipeline_s for s in ok if s.pipeline_s is not None], (50, 95)),
        "server_overhead_e2e": _ms(e2e_overhead, (50, 95)),
        "server_overhead_reported": _ms([s.server_overhead_s for s in ok if s.server_overhead_s is not None], (50, 95)),
        "mean_batch_size": round(statistics.fmean([s.batch_size for s in ok if s.batch_size]), 3) if ok else None,
        "send_lag": _ms([s.lag_s for s in samples], (50, 99)),
        "errors": sorted({s.error for s in errors_5xx + lost if s.error})[:5],
    }


def run_level(
    url: str, rate: float, n: int, poisson: bool, bodies: Iterator[dict[str, Any]], timeout_s: float, seed: int
) -> dict[str, Any]:
    times = arrivals(rate, n, poisson, random.Random(seed))
    samples, wall = asyncio.run(offer(url, times, bodies, timeout_s))
    out = summarise(samples, rate, wall)
    print(
        f"  offered {rate:7.2f}/s x{n:4d}: {out['images_per_s']:7.2f} img/s  p50 {out['latency']['p50_ms']} ms  "
        f"p99 {out['latency']['p99_ms']} ms  batch {out['mean_batch_size']}  503 {out['refused_503']}  "
        f"5xx {out['server_errors_5xx']}  lost {out['lost']}",
        flush=True,
    )
    return out


def sweep(url: str, size: dict[str, Any], users: list[str | None], seed: int) -> dict[str, Any]:
    """Low load, probe, the sweep and the 2x-saturation level against one running server."""
    bodies = payloads(users, seed)
    timeout = size["client_timeout_s"]
    run_level(url, 4.0, 4, False, bodies, timeout, seed)  # warm-up: first-request costs (caches, text encodings)
    low = run_level(url, size["low_load_rps"], size["low_load_requests"], False, bodies, timeout, seed + 1)
    burst = run_level(url, 1000.0, size["probe_requests"], False, bodies, timeout, seed + 2)
    estimate = max(burst["images_per_s"], 0.1)
    levels = []
    for k, f in enumerate(size["fractions"]):
        rate = f * estimate
        levels.append(run_level(url, rate, max(4, round(rate * size["level_s"])), True, bodies, timeout, seed + 10 + k))
    sustained = max(lv["images_per_s"] for lv in levels)
    saturation = max(sustained, burst["images_per_s"])  # the better of Poisson arrivals and the burst
    rate = 2 * saturation
    at_2x = run_level(url, rate, max(8, round(rate * size["level_s"])), True, bodies, timeout, seed + 99)
    at_2x["saturation_images_per_s"] = round(saturation, 3)
    return {
        "low_load": low,
        "probe": burst,
        "levels": levels + [at_2x],
        "saturation_images_per_s": round(saturation, 3),
        "sustained_images_per_s": round(sustained, 3),
        "at_2x_saturation": at_2x,
    }


def pipeline_reference(batch_sizes: list[int], repeats: int, threads: int = 1) -> dict[str, Any]:
    """Images/s of the pipeline alone (no server) at each batch size, on `threads` torch threads (a generator
    replica's one CPU): the most batching can give on this machine, to read the server's numbers against."""
    import torch

    from benchmarks.common import time_fn
    from premier.pipeline import PremierPipeline
    from premier.requests import GenerationRequest

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pipe = PremierPipeline.load(device="cpu", dtype=torch.float32)
        settings = pipe.default_settings()
        out: dict[str, Any] = {"settings": vars(settings), "threads": threads}
        for b in sorted(set(batch_sizes) | {1}):
            reqs = [GenerationRequest(prompt=PROMPTS[i % len(PROMPTS)], user=None, seed=i) for i in range(b)]
            t = time_fn(lambda: pipe(reqs, settings, output_type="np"), repeats=repeats)
            out[str(b)] = {"batch_s": round(t["median_s"], 5), "images_per_s": round(b / t["median_s"], 3)}
        return out
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- the server under test
def serve_each(batch_sizes: list[int], extra: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """(max batch size, URL) for each size: one local Ray + Serve (serving.server.ServerSession, as `premier serve`
    starts it) on free ports with a fresh store, the application redeployed for each size, everything stopped after."""
    from ray import serve

    from serving.app import build
    from serving.config import APP_NAME, ServerOptions, build_config
    from serving.server import ServerSession

    with tempfile.TemporaryDirectory(prefix="premier-load-") as work:
        configs = [
            build_config({"store": str(Path(work) / "store"), **extra, "max_batch_size": b}) for b in batch_sizes
        ]
        with ServerSession(configs[0], ServerOptions(http_port=0, grpc_port=0), dashboard=False) as session:
            for i, (b, config) in enumerate(zip(batch_sizes, configs)):
                if i:
                    serve.run(build(config), name=APP_NAME, route_prefix="/")
                    session.wait_ready(300.0)
                yield b, session.http_url


def pin_generators(model_cores: set[int]) -> list[int]:
    """Move every thread of each generator replica process onto `model_cores` (the rest of Ray, Ray's HTTP proxy,
    the ingress and this client inherited the front cores from this process); returns the pids moved."""
    moved = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
            if "ServeReplica" not in cmdline or "Generator" not in cmdline:
                continue
            for task in (proc / "task").iterdir():
                os.sched_setaffinity(int(task.name), model_cores)
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        moved.append(int(proc.name))
    return moved


# ---------------------------------------------------------------------- report
def targets(runs: list[dict[str, Any]], reference: dict[str, Any] | None = None) -> dict[str, Any]:
    by = {r["max_batch_size"]: r for r in runs}
    base = by.get(1)
    out: dict[str, Any] = {}
    overhead = [
        r["low_load"]["server_overhead_e2e"]["p50_ms"]
        for r in runs
        if r["low_load"]["server_overhead_e2e"]["p50_ms"] is not None
    ]
    if overhead:
        worst = max(overhead)
        out["server_overhead_p50_le_15ms"] = {
            "value_ms": worst,
            "pass": worst <= TARGET_OVERHEAD_P50_MS,
            "note": "worst over batch sizes; end to end at the client minus pipeline time",
        }
    for r in runs:
        if base is not None and r["max_batch_size"] != 1 and base["saturation_images_per_s"] > 0:
            ratio = r["saturation_images_per_s"] / base["saturation_images_per_s"]
            r["images_per_s_over_batch1"] = round(ratio, 3)
    if 8 in by and base is not None:
        ratio = by[8].get("images_per_s_over_batch1")
        out["batch8_ge_3x_batch1"] = {"ratio": ratio, "pass": (ratio or 0) >= TARGET_BATCH_RATIO}
        if reference and "8" in reference and "1" in reference:
            out["batch8_ge_3x_batch1"]["pipeline_alone_ratio"] = round(
                reference["8"]["images_per_s"] / reference["1"]["images_per_s"], 3
            )
    clean = all(r["at_2x_saturation"]["lost"] == 0 and r["at_2x_saturation"]["server_errors_5xx"] == 0 for r in runs)
    out["no_loss_no_5xx_at_2x_saturation"] = {
        "pass": clean,
        "refused_503": {r["max_batch_size"]: r["at_2x_saturation"]["refused_503"] for r in runs},
    }
    # Goodput under overload: images answered per second at 2x saturation over the saturation throughput.
    # Requests that expire or whose clients give up are dropped before the model, so overload does not waste it.
    goodput = {
        r["max_batch_size"]: round(r["at_2x_saturation"]["images_per_s"] / r["saturation_images_per_s"], 3)
        for r in runs
        if r["saturation_images_per_s"] > 0
    }
    out["goodput_at_2x_within_10pct_of_saturation"] = {
        "ratio": goodput,
        "pass": bool(goodput) and min(goodput.values()) >= 1 - TARGET_GOODPUT_LOSS,
    }
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for k, r in enumerate(runs):
        colour = f"C{k}"
        lv = sorted(r["levels"], key=lambda x: x["offered_rps"])
        x = [v["offered_rps"] for v in lv]
        ax1.plot(x, [v["images_per_s"] for v in lv], "o-", color=colour, label=f"max batch {r['max_batch_size']}")
        for q, style in (("p50_ms", "-"), ("p95_ms", "--"), ("p99_ms", ":")):
            ys = [v["latency"][q] for v in lv]
            ax2.plot(
                x,
                [y if y is not None else float("nan") for y in ys],
                style,
                color=colour,
                marker=".",
                label=f"batch {r['max_batch_size']} {q[:3]}",
            )
    lim = max((v["offered_rps"] for r in runs for v in r["levels"]), default=1.0)
    ax1.plot([0, lim], [0, lim], color="grey", lw=0.8, ls=":", label="offered = served")
    ax1.set(xlabel="offered load (requests/s)", ylabel="served (images/s)", title="throughput")
    ax2.set(
        xlabel="offered load (requests/s)", ylabel="latency of answered requests (ms)", title="latency", yscale="log"
    )
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: short levels, one server at max batch size 4")
    ap.add_argument("--url", help="a running server (no start/stop; one sweep at its own max batch size)")
    ap.add_argument("--batch-sizes", help="comma-separated max batch sizes (default 1,8; 1 is the baseline)")
    ap.add_argument("--level-seconds", type=float, help="length of each offered-load level")
    ap.add_argument(
        "--users", help="comma-separated user ids ('none' for plain FLUX; default: the embedded demo users and none)"
    )
    ap.add_argument("--server-config", help="YAML of extra ServeConfig fields for the servers this benchmark starts")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="the model on its own core (the last; generator torch_threads 1), everything else (Ray, its HTTP proxy, "
        "the ingress and this client) on the others: the split of a GPU node, where the front never runs on the "
        "model's CPU; writes load_pinned.json",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/load.json; the plot goes beside it)")
    args = ap.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    if args.batch_sizes:
        size["batch_sizes"] = [int(b) for b in args.batch_sizes.split(",")]
    if args.level_seconds:
        size["level_s"] = args.level_seconds
    if args.users:
        users: list[str | None] = [None if u.lower() == "none" else u for u in args.users.split(",")]
    else:
        from premier.models.embedded import DEMO_USERS

        users = [*DEMO_USERS, None]
    extra: dict[str, Any] = {}
    if args.server_config:
        import yaml

        extra = yaml.safe_load(Path(args.server_config).read_text()) or {}
    pinned: dict[str, Any] | None = None
    if args.pin:
        if args.url:
            ap.error("--pin starts the server itself; it cannot be used with --url")
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            ap.error(f"--pin needs at least 2 cores; this process may use {len(cores)}")
        pinned = {"model_cores": cores[-1:], "front_cores": cores[:-1]}
        os.sched_setaffinity(0, set(pinned["front_cores"]))  # Ray's processes, started from here, inherit it
        extra = {**extra, "torch_threads": 1}
    name = "load" + ("_quick" if args.quick else "") + ("_pinned" if pinned else "")
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    reference = None if args.url else pipeline_reference(size["batch_sizes"], size["pipeline_repeats"])
    if reference:
        print(
            "pipeline alone: "
            + ", ".join(f"batch {k}: {v['images_per_s']} img/s" for k, v in reference.items() if k.isdigit())
        )
    if args.url:
        print(f"against {args.url}", flush=True)
        runs.append({"max_batch_size": None, "url": args.url, **sweep(args.url.rstrip("/"), size, users, args.seed)})
    else:
        for b, url in serve_each(size["batch_sizes"], extra):
            if pinned:
                pinned[f"generator_pids_bs{b}"] = pin_generators(set(pinned["model_cores"]))
                if not pinned[f"generator_pids_bs{b}"]:
                    raise SystemExit("--pin: no generator replica process found to pin")
            print(f"max batch size {b}: {url}", flush=True)
            runs.append({"max_batch_size": b, **sweep(url, size, users, args.seed)})
    payload = {
        "config": {
            **size,
            "users": users,
            "quick": args.quick,
            "server_config": extra,
            "pinned": pinned,
            "arrivals": "poisson (sweep), fixed (low load)",
        },
        "machine_load": {
            "loadavg_1m_before": round(load_before[0], 2),
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
            "note": "other processes share these cores; see the report for what ran",
        },
        "pipeline_alone": reference,
        "runs": runs,
        "targets": targets(runs, reference) if not args.url else {},
    }
    path = write_result(name, payload, args.out)
    payload["plot"] = str(plot(runs, path.with_suffix(".png")))
    print(json.dumps(payload["targets"], indent=1))
    print(f"wrote {path} and {payload['plot']}")
    return payload


if __name__ == "__main__":
    main()
