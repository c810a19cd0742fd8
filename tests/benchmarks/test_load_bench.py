"""benchmarks/load.py: the open-loop generator and its accounting (against a stub), and a quick run against the real server."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import load


def test_arrivals():
    fixed = load.arrivals(4.0, 5, poisson=False, rng=random.Random(0))
    assert fixed == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    times = load.arrivals(10.0, 4000, poisson=True, rng=random.Random(0))
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, rel=0.05) and min(gaps) < 0.01 < 0.3 < max(gaps)


def test_open_loop_accounting_against_a_stub():
    """Requests go out on schedule while earlier ones are still unanswered, and every ending is counted."""
    from aiohttp import web

    async def generate(request: web.Request) -> web.Response:
        body = await request.json()
        kind = body["seed"] % 5
        if kind == 1:
            return web.json_response({"error": "queue full"}, status=503)
        if kind == 2:
            return web.json_response({"error": "boom"}, status=500)
        if kind == 3:
            await asyncio.sleep(5)  # longer than the client's timeout: lost
        await asyncio.sleep(0.3)
        t = {"pipeline_s": 0.25, "queue_wait_s": 0.01, "server_overhead_s": 0.02, "batch_size": 2}
        return web.json_response({"image": "", "seed": body["seed"], "timings": t})

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/generate", generate)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        bodies = ({"prompt": "p", "user_id": None, "seed": i, "format": "json"} for i in range(1000))
        try:
            return await load.offer(f"http://127.0.0.1:{port}", [i * 0.02 for i in range(20)], bodies, timeout_s=1.0)
        finally:
            await runner.cleanup()

    samples, wall = asyncio.run(scenario())
    out = load.summarise(samples, 50.0, wall)
    assert out["requests"] == 20 and (out["ok"], out["refused_503"], out["server_errors_5xx"], out["lost"]) == (
        8,
        4,
        4,
        4,
    )
    # Lower bounds only (sleeps cannot finish early); a busy machine may stretch anything upwards.
    assert out["send_lag"]["p50_ms"] <= out["send_lag"]["p99_ms"]  # open loop: sends do not wait for answers
    assert 1.0 <= wall and out["images_per_s"] == pytest.approx(8 / wall, rel=1e-3)
    assert 300 <= out["latency"]["p50_ms"] <= out["latency"]["p99_ms"]
    assert out["pipeline"]["p50_ms"] == 250 and out["mean_batch_size"] == 2
    assert 50 <= out["server_overhead_e2e"]["p50_ms"] and out["server_overhead_reported"]["p50_ms"] == 20
    assert any("boom" in e for e in out["errors"]) and any("Timeout" in e for e in out["errors"])


def _run(b: int, sat: float, overhead_ms: float, lost: int = 0, goodput: float = 1.0) -> dict:
    level = {"lost": lost, "server_errors_5xx": 0, "refused_503": 7, "images_per_s": sat * goodput}
    return {
        "max_batch_size": b,
        "saturation_images_per_s": sat,
        "low_load": {"server_overhead_e2e": {"p50_ms": overhead_ms}},
        "at_2x_saturation": level,
    }


def test_targets():
    runs = [_run(1, 10.0, 9.0), _run(8, 35.0, 14.0)]
    t = load.targets(runs, {"1": {"images_per_s": 4.0}, "8": {"images_per_s": 20.0}})
    assert t["batch8_ge_3x_batch1"] == {"ratio": 3.5, "pass": True, "pipeline_alone_ratio": 5.0}
    assert runs[1]["images_per_s_over_batch1"] == 3.5
    assert t["server_overhead_p50_le_15ms"]["value_ms"] == 14.0 and t["server_overhead_p50_le_15ms"]["pass"]
    assert t["no_loss_no_5xx_at_2x_saturation"]["pass"]
    assert t["goodput_at_2x_within_10pct_of_saturation"] == {"ratio": {1: 1.0, 8: 1.0}, "pass": True}
    t = load.targets([_run(1, 10.0, 9.0), _run(8, 25.0, 16.0, lost=1, goodput=0.8)])
    assert not t["batch8_ge_3x_batch1"]["pass"] and not t["server_overhead_p50_le_15ms"]["pass"]
    assert not t["no_loss_no_5xx_at_2x_saturation"]["pass"]
    assert t["goodput_at_2x_within_10pct_of_saturation"]["ratio"][8] == 0.8
    assert not t["goodput_at_2x_within_10pct_of_saturation"]["pass"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two cores")
def test_pin_moves_every_thread_of_a_generator_process_and_nothing_else():
    """--pin finds generator replicas by their Ray process title and moves all their threads to the model core."""
    cores = sorted(os.sched_getaffinity(0))
    code = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"
    generator = subprocess.Popen([sys.executable, "-c", code, "ray::ServeReplica:premier:Generator"])
    other = subprocess.Popen([sys.executable, "-c", code, "ray::ServeReplica:premier:Ingress"])
    try:
        tasks = Path(f"/proc/{generator.pid}/task")
        for _ in range(100):  # until its second thread exists
            if len(list(tasks.iterdir())) >= 2:
                break
            time.sleep(0.05)
        assert generator.pid in load.pin_generators({cores[-1]})
        assert other.pid not in load.pin_generators({cores[-1]})
        threads = [int(t.name) for t in tasks.iterdir()]
        assert len(threads) >= 2 and all(os.sched_getaffinity(t) == {cores[-1]} for t in threads)
        assert os.sched_getaffinity(other.pid) == set(cores)
    finally:
        for p in (generator, other):
            p.kill()
            p.wait()


def test_load_bench_quick(tmp_path):
    out = tmp_path / "load.json"
    load.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "load_quick" and data["environment"]["machine"]
    assert data["machine_load"]["loadavg_1m_before"] >= 0
    alone = data["pipeline_alone"]
    assert alone["4"]["images_per_s"] > 0 and alone["1"]["batch_s"] > 0 and alone["settings"]["steps"] > 0
    (run,) = data["runs"]
    assert run["max_batch_size"] == 4
    low = run["low_load"]
    assert low["ok"] == low["requests"] > 0 and low["lost"] == low["server_errors_5xx"] == 0
    assert 0 < low["server_overhead_e2e"]["p50_ms"] <= low["server_overhead_e2e"]["p95_ms"] < low["latency"]["p95_ms"]
    assert low["pipeline"]["p50_ms"] > 0 and low["server_overhead_reported"]["p50_ms"] >= 0
    for level in [run["probe"], *run["levels"]]:
        ended = (
            level["ok"] + level["refused_503"] + level["client_errors_4xx"] + level["server_errors_5xx"] + level["lost"]
        )
        assert ended == level["requests"] and level["client_errors_4xx"] == 0
        assert level["server_errors_5xx"] == 0 and level["lost"] == 0, level["errors"]
        assert (
            level["ok"] > 0
            and 0 < level["latency"]["p50_ms"] <= level["latency"]["p95_ms"] <= level["latency"]["p99_ms"]
        )
        assert 1 <= level["mean_batch_size"] <= 4 and level["images_per_s"] > 0
    assert run["probe"]["mean_batch_size"] > 1  # a burst is served in batches
    at_2x = run["at_2x_saturation"]
    assert at_2x["offered_rps"] == pytest.approx(2 * run["saturation_images_per_s"], rel=0.01)
    assert set(data["targets"]) == {
        "server_overhead_p50_le_15ms",
        "no_loss_no_5xx_at_2x_saturation",
        "goodput_at_2x_within_10pct_of_saturation",
    }
    assert data["targets"]["no_loss_no_5xx_at_2x_saturation"]["pass"]
    assert out.with_suffix(".png").stat().st_size > 10_000
