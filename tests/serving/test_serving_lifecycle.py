"""A generator replica killed under load is replaced; stopping the server lets in-flight requests finish."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from serving_harness import serve_app


@pytest.fixture(scope="module")
def server():
    with serve_app({"max_batch_size": 4, "max_queued_requests": 32, "torch_threads": 2}) as s:
        yield s


def generate(server, **body) -> requests.Response:
    return requests.post(server.http_url + "/v1/generate", json={"prompt": "p", **body}, timeout=300)


def generator_pid() -> int:
    from ray import serve

    return serve.get_deployment_handle("Generator", app_name="premier").pid.remote().result(timeout_s=60)


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
        t = time.monotonic()
        server.stop()
        stop_s = time.monotonic() - t
        codes = [f.result().status_code for f in futures]
    assert codes == [200] * n, codes
    with pytest.raises(requests.ConnectionError):
        requests.get(server.http_url + "/healthz", timeout=5)
    assert stop_s < 120
