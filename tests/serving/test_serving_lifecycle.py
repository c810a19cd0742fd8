"""A generator replica killed under load is replaced; stopping the server lets in-flight requests finish;
streamed generation. The server runs step-level batching, so these also exercise it under Ray."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image
from serving_harness import serve_app


@pytest.fixture(scope="module")
def server():
    with serve_app({"max_batch_size": 4, "max_queued_requests": 32, "torch_threads": 2, "batching": "step"}) as s:
        yield s


def generate(server, **body) -> requests.Response:
    return requests.post(server.http_url + "/v1/generate", json={"prompt": "p", **body}, timeout=300)


def generator_pid() -> int:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="premier").pid.remote().result(timeout_s=60)


def generator_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="premier").stats.remote().result(timeout_s=60)


def sse_events(response: requests.Response):
    """(event, data) pairs of a server-sent-events response, as they arrive."""
    event = None
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            event = line[len("event: ") :]
        elif line.startswith("data: "):
            yield event, json.loads(line[len("data: ") :])


def test_streamed_generation_reports_every_step_then_the_image(server):
    body = {"prompt": "a red circle", "user_id": "alice", "seed": 7, "steps": 6, "stream": True}
    with requests.post(server.http_url + "/v1/generate", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    assert [e for e, _ in events] == ["progress"] * 5 + ["image"]
    assert [d["step"] for _, d in events[:-1]] == [1, 2, 3, 4, 5] and {d["steps"] for _, d in events[:-1]} == {6}
    final = events[-1][1]
    plain = generate(server, prompt="a red circle", user_id="alice", seed=7, steps=6, format="json").json()
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(final["image"]))), dtype=int)
    b = np.asarray(Image.open(io.BytesIO(base64.b64decode(plain["image"]))), dtype=int)
    assert final["seed"] == 7 and np.abs(a - b).max() <= 1
    assert final["timings"]["first_step_s"] >= 0
    metrics = requests.get(server.http_url + "/metrics", timeout=30).text
    assert _sample(metrics, "premier_step_occupancy_count") >= 6
    assert _sample(metrics, "premier_time_to_first_step_seconds_count") >= 2


def test_a_stream_refused_at_the_door_is_a_plain_4xx(server):
    body = {"prompt": "a red circle", "steps": 0, "stream": True}
    r = requests.post(server.http_url + "/v1/generate", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "steps"
    r = requests.post(server.http_url + "/v1/generate", json={**body, "steps": 2, "user_id": "nobody"}, timeout=60)
    assert r.status_code == 404


def test_a_client_leaving_mid_stream_cancels_its_request(server):
    before = generator_stats()["dropped"]["cancelled"]
    body = {"prompt": "a long one", "seed": 9, "steps": 200, "stream": True}
    with requests.post(server.http_url + "/v1/generate", json=body, stream=True, timeout=300) as r:
        event, data = next(sse_events(r))
        assert event == "progress" and data == {"step": 1, "steps": 200}
    # the connection is closed: the request leaves the running batch at a step boundary, long before step 200
    deadline = time.monotonic() + 120
    stats = generator_stats()
    while time.monotonic() < deadline and not (stats["running"] == 0 and stats["dropped"]["cancelled"] > before):
        time.sleep(0.2)
        stats = generator_stats()
    assert stats["running"] == 0 and stats["dropped"]["cancelled"] == before + 1, stats
    metrics = requests.get(server.http_url + "/metrics", timeout=30).text
    assert _sample(metrics, 'premier_requests_dropped_total{reason="disconnected"}') >= 1
    assert generate(server, user_id="bob", seed=3, steps=2).status_code == 200


def _sample(exposition: str, name: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_replica_killed_mid_load_is_replaced_and_later_requests_succeed(server):
    old = generator_pid()
    codes: list[int] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            codes.append(generate(server, user_id="alice", seed=worker * 1000 + i, steps=16).status_code)

    threads = [threading.Thread(target=load, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(2.0)
    served_before = codes.count(200)
    os.kill(old, signal.SIGKILL)
    deadline = time.monotonic() + 180
    new = old
    while new == old and time.monotonic() < deadline:
        try:
            new = generator_pid()
        except Exception:  # no replica yet
            time.sleep(1.0)
    time.sleep(2.0)
    stop.set()
    for t in threads:
        t.join(timeout=300)
    assert new != old, "the killed generator replica was not replaced"
    assert served_before > 0
    assert set(codes) <= {200, 503}, sorted(set(codes))
    later = [generate(server, user_id="bob", seed=i) for i in range(3)]
    assert [r.status_code for r in later] == [200, 200, 200], [r.text for r in later]


def test_readiness_follows_the_generators(server):
    """/readyz and KServe readiness say "not ready" once the last generator replica is gone, and ready again after."""
    url = server.http_url
    assert requests.get(url + "/readyz", timeout=30).status_code == 200
    old = generator_pid()
    os.kill(old, signal.SIGKILL)
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        pair = (
            requests.get(url + "/readyz", timeout=30).status_code,
            requests.get(url + "/v2/health/ready", timeout=30).status_code,
        )
        seen.append(pair)
        if (503, 503) in seen and pair == (200, 200):
            break
        time.sleep(0.2)
    assert (503, 503) in seen, "never reported not ready after the only generator was killed"
    assert seen[-1] == (200, 200), "not ready again after the generator was replaced"
    assert generate(server, user_id="alice", seed=5).status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests(server):
    """Must run last in this module: it stops the server."""
    n = 6
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(generate, server, user_id="carol", seed=i, steps=60) for i in range(n)]
        time.sleep(1.0)  # all admitted and running or queued in the generator
        assert not all(f.done() for f in futures), "requests finished before shutdown started: make them slower"
        server.stop()  # no bound in seconds: pytest-timeout catches a hang, a busy machine stops slowly
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * n, codes
    with pytest.raises(requests.ConnectionError):
        requests.get(server.http_url + "/healthz", timeout=5)
