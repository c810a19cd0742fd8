"""Resident fit workers (`fitting: {runner: workers}`): serving/fit_dispatch.py and serving/fit_workers.py.

A local Ray without a dashboard: the workers path needs no Jobs API. Fits run on the embedded model
in the worker's process; "long" fits (fast: false, many steps) stay running until they are
cancelled or their worker is killed, so those tests act on a fit that is certainly mid-way.
"""

from __future__ import annotations

import time

import pytest
import torch
from training_data import user_images

from premier.errors import InvalidRequestError
from serving.fit_settings import OWNER_FILE, FitConflictError, FitSettings
from serving.fitting import FitJobManager
from store.user_store import UserStore

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
QUICK = dict(runner="workers", worker_threads=1, max_running_jobs=8, max_queued_jobs=8)
LONG = dict(QUICK, fast=False, steps=100_000, eval_every=100_000, patience=1, optimizer="adamw", lr=0.01)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def png_upload(n: int, colour=(200, 40, 40), seed: int = 0, noise: bool = True) -> list[tuple[str, bytes]]:
    import io

    from PIL import Image

    images = user_images(colour, n, seed=seed) if noise else [Image.new("RGB", (64, 64), colour) for _ in range(n)]
    out = []
    for i, im in enumerate(images):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append((f"{i:02d}.png", buf.getvalue()))
    return out


def manager(tmp_path, **settings) -> FitJobManager:
    return FitJobManager(
        FitSettings(**{**QUICK, **settings}), store_path=str(tmp_path / "store"), model=None, checkpoint=None
    )


def wait(m: FitJobManager, job_id: str, until=TERMINAL, timeout: float = 300.0, check=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = m.status(job_id)
        if status["status"] in until and (check is None or check(status)):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.2)


def test_resident_fit_is_servable_and_identical_uploads_fit_identically(ray_local, tmp_path):
    m = manager(tmp_path)
    files = png_upload(4)
    a = m.submit("alice", files, ["a cat", "a house", "a tree", "a cat"])
    b = m.submit("bob", files, ["a cat", "a house", "a tree", "a cat"])  # the same bytes as alice's: allowed
    flat = m.submit("flat", png_upload(2, colour=(128, 128, 128), noise=False), ["a cat", "a tree"])
    for job_id in (a, b, flat):
        status = wait(m, job_id)
        assert status["status"] == "SUCCEEDED", status
        assert status["user"]["steps"] >= 1
        assert not (m.uploads_dir / job_id).exists()  # the folder goes when the job ends
    assert m.folder.result(a)["runner"] == "worker" and m.folder.result(a)["seconds"] > 0
    with UserStore.open(tmp_path / "store") as store:
        ra, rb, rf = store.get("alice"), store.get("bob"), store.get("flat")
        # Identical uploads are allowed and scored identically (the same warm start); the fits themselves may stop at
        # different steps, since they share rounds with different peers (fp32 noise can move a convergence stop).
        assert ra.fit.get("warm_start") == rb.fit.get("warm_start")
        assert torch.isfinite(ra.vector).all() and torch.isfinite(rb.vector).all() and ra.user_id != rb.user_id
        assert torch.isfinite(rf.vector).all() and ra.fit["fitter"] == "multi-user"
    counts = m.counts()
    assert counts["SUCCEEDED"] == 3 and counts["RUNNING"] == counts["PENDING"] == 0
    latencies = m.latencies()
    assert len(latencies) == 3 and all(r == "worker" and st == "SUCCEEDED" and sec > 0 for r, st, sec in latencies)
    from prometheus_client import CollectorRegistry, generate_latest

    from serving.fit_metrics import FitLatencyCollector

    registry = CollectorRegistry()
    registry.register(FitLatencyCollector(m.latencies))
    text = generate_latest(registry).decode()
    assert 'premier_fit_latency_seconds_count{runner="worker",status="SUCCEEDED"} 3.0' in text


def test_refit_while_running_is_409_and_cancel_writes_nothing(ray_local, tmp_path):
    m = manager(tmp_path, **LONG)
    job_id = m.submit("carol", png_upload(2), ["a cat", "a tree"])
    running = wait(m, job_id, until=("RUNNING",), check=lambda s: "progress" in s)
    p = running["progress"]
    assert p["step"] >= 1 and p["max_steps"] == 100_000 and p["expected_seconds_left"] >= 0 and "loss" in p
    with pytest.raises(FitConflictError, match=job_id):
        m.submit("carol", png_upload(1), ["a cat"])
    state = m.cancel(job_id)
    state = wait(m, job_id) if state["status"] not in TERMINAL else state
    assert state["status"] == "STOPPED", state
    with UserStore.open(tmp_path / "store") as store:
        assert "carol" not in store
    assert not (m.uploads_dir / job_id).exists()
    again = m.submit("carol", png_upload(1), ["a cat"])  # the user may be fitted again once the job ended
    m.cancel(again)
    assert wait(m, again)["status"] == "STOPPED"


@pytest.mark.parametrize("retries", [0, 1])
def test_a_worker_killed_mid_fit_retries_or_fails_cleanly(ray_local, tmp_path, retries):
    import ray

    from serving.fit_workers import NAMESPACE

    settings = dict(LONG, steps=60, worker_retries=retries) if retries else dict(LONG, worker_retries=0)
    m = manager(tmp_path, **settings)
    job_id = m.submit("dave", png_upload(2), ["a cat", "a tree"])
    wait(m, job_id, until=("RUNNING",), check=lambda s: "progress" in s)
    (worker,) = [
        ray.get_actor(a["name"], namespace=NAMESPACE)
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == NAMESPACE and a["name"].startswith("fit-worker-")
    ]
    ray.kill(worker, no_restart=True)
    status = wait(m, job_id)
    with UserStore.open(tmp_path / "store") as store:
        present = "dave" in store
    if retries:
        assert status["status"] == "SUCCEEDED" and present, status
        assert status["user"]["steps"] == 60  # the whole fit again, on a fresh worker: not a half-fitted user
    else:
        assert status["status"] == "FAILED" and not present, status
        assert "worker died" in status["message"] and "/" not in status["message"].split(":", 1)[-1]


def test_bad_uploads_are_refused_before_any_work(ray_local, tmp_path):
    m = manager(tmp_path)
    with pytest.raises(InvalidRequestError) as e:
        m.submit("erin", [("a.png", b"")], ["a cat"])
    assert e.value.field == "images[0]"
    assert not m.uploads_dir.exists() or not [p for p in m.uploads_dir.iterdir() if p.name.startswith("fit-")]


def test_an_orphaned_resident_job_is_reaped_as_failed(ray_local, tmp_path):
    """A job whose dispatching process is gone (the ingress restarted) fails cleanly for the next manager."""
    import json

    m = manager(tmp_path, **LONG)
    job_id = m.submit("frank", png_upload(1), ["a cat"])
    wait(m, job_id, until=("RUNNING",))
    m.cancel(job_id)
    wait(m, job_id)
    # a folder as a dead owner leaves it: admitted, filled, owned by a pid that does not exist
    orphan = "fit-" + "0" * 16
    (m.uploads_dir / orphan).mkdir()
    (m.uploads_dir / orphan / "claim.json").write_text(json.dumps({"user_id": "gina", "created_at": time.time()}))
    owner = json.loads(json.dumps({"pid": 2**22 + 7, "host": __import__("socket").gethostname(), "runner": "worker"}))
    (m.uploads_dir / orphan / OWNER_FILE).write_text(json.dumps(owner))
    fresh = manager(tmp_path, **LONG)
    status = fresh.status(orphan)
    assert status["status"] == "FAILED" and "restarted" in status["message"]
    assert not (m.uploads_dir / orphan).exists()
    with UserStore.open(tmp_path / "store") as store:
        assert "gina" not in store


def test_fit_through_http_on_resident_workers_then_generate():
    """The server's own fit path with `runner: workers`: 202, progress or an end on GET /v1/jobs, a servable user."""
    import requests
    from serving_harness import serve_app

    with serve_app({"fitting": {"worker_threads": 1}}) as server:  # resident workers: the default runner
        url = server.http_url
        files = [("images", (n, d, "image/png")) for n, d in png_upload(2, colour=(40, 60, 220))]
        r = requests.post(
            f"{url}/v1/users/newcomer/fit", files=files, data={"captions": ["a cat", "a tree"]}, timeout=60
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        again = requests.post(f"{url}/v1/users/newcomer/fit", files=files, data={"captions": ["a", "b"]}, timeout=60)
        assert again.status_code in (202, 409) and (again.status_code == 202 or job_id in again.json()["error"])
        for bad in ("-1", "61", "nan", "soon"):  # the long poll's bound: 0..60 s, a number
            r = requests.get(f"{url}/v1/jobs/{job_id}?wait={bad}", timeout=30)
            assert r.status_code == 422 and "wait" in r.text, (bad, r.text)
        polls = 0
        while (status := requests.get(f"{url}/v1/jobs/{job_id}?wait=60", timeout=120).json())["status"] not in TERMINAL:
            polls += 1  # a long poll answers when the job ends (or after 60 s): a few at most, never a busy loop
            assert polls < 5, status
            if status["status"] == "RUNNING" and "progress" in status:
                assert status["progress"]["step"] >= 1 and status["progress"]["expected_seconds_left"] >= 0
        assert status["status"] == "SUCCEEDED" and status["user"]["user_id"] == "newcomer", status
        r = requests.post(
            f"{url}/v1/generate", json={"prompt": "a cat", "user_id": "newcomer", "format": "json"}, timeout=60
        )
        assert r.status_code == 200 and r.json()["user_id"] == "newcomer", r.text
        assert requests.get(f"{url}/v1/users/newcomer", timeout=30).json()["fit"]["fitter"] == "multi-user"
        metrics = requests.get(f"{url}/metrics", timeout=30).text
        assert 'premier_fit_latency_seconds_count{runner="worker",status="SUCCEEDED"}' in metrics


def test_worker_settings_choose_the_fast_preset_or_the_stage2_options():
    from premier.training.config import Stage2Config

    default = FitSettings()  # resident workers by default, their caps from the workers' batch
    assert default.runner == "workers" and default.max_running_jobs == default.workers * default.worker_max_users
    jobs = FitSettings(runner="jobs")
    assert (jobs.max_running_jobs, jobs.max_queued_jobs) == (2, 8)
    assert FitSettings(max_running_jobs=3).max_queued_jobs == 6

    fast = Stage2Config(**FitSettings(runner="workers", seed=4).worker_stage2())
    assert fast.warm_start > 0 and fast.seed == 4 and fast.steps == Stage2Config.fast().steps
    plain = Stage2Config(**FitSettings(fast=False, steps=9, optimizer="adamw", lr=0.1).worker_stage2())
    assert plain.warm_start == 0 and plain.steps == 9 and (plain.optim.optimizer, plain.optim.lr) == ("adamw", 0.1)
    assert not plain.early_stop and plain.direct_init == "scratch"  # the paper's stage 2 unless told otherwise
    told = Stage2Config(**FitSettings(fast=False, mode="direct", early_stop=True, init="mean").worker_stage2())
    assert told.early_stop and told.direct_init == "mean"
    assert fast.early_stop and fast.init == "mean"  # the onboarding preset keeps its held-out image
    assert {"early_stop", "init"} <= set(FitSettings().fit_options())
    with pytest.raises(ValueError, match="init"):
        FitSettings(init="zeros")
    with pytest.raises(ValueError, match="runner"):
        FitSettings(runner="threads")


def test_a_fit_that_fails_the_shared_round_fails_alone():
    """A fit whose pass raises (a poisoned upload, an out-of-memory error for its shapes) fails alone: the round is
    retried fit by fit and the others end with their records."""
    import threading

    from serving.fit_workers import FitWorker

    settings = FitSettings(**QUICK)
    worker = FitWorker(None, None, settings.model_dump(mode="json"))
    fitter = worker.fitter
    real = fitter._train_step

    def train_step(slots, ended):
        if any(s.user_id == "job-bad" for s in slots):
            raise RuntimeError("CUDA out of memory (injected)")
        return real(slots, ended)

    fitter._train_step = train_step
    out: dict[str, dict] = {}
    ready = threading.Barrier(3)

    def fit(job: str, colour) -> None:
        ready.wait()
        out[job] = worker.fit(job, job.removeprefix("job-"), png_upload(2, colour=colour), ["a", "b"], {})

    threads = [
        threading.Thread(target=fit, args=(j, c))
        for j, c in (("job-bad", (10, 10, 10)), ("job-a", (200, 30, 30)), ("job-b", (30, 30, 200)))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert out["job-bad"]["code"] != 0 and "out of memory" in out["job-bad"]["error"], out["job-bad"]
    for job in ("job-a", "job-b"):
        assert out[job]["code"] == 0 and torch.isfinite(out[job]["record"].vector).all(), out[job]
    assert not fitter.slots and worker.fits_done == 3
