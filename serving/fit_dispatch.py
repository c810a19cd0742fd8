"""The store-side half of resident fitting: hands admitted jobs to the fit workers, reports, commits, tidies.

`FitJobManager` (serving/fitting.py) admits a fit and fills its job folder exactly as for a Ray
job; with `runner: workers` it then calls `ResidentDispatcher.start`, which runs one thread per job
in the manager's process (the ingress, on the store's node). The thread marks the folder with its
owner (`owner.json`: pid and host), waits for one of `max_running_jobs` running places, marks it
`running.json`, sends the images as bytes to the least loaded worker (`FitWorker.fit`), copies the
worker's progress into `progress.json` while it waits, and at the end puts the record into the
store in one SQLite transaction (as the job driver does), writes `results/<job id>.json` and removes
the folder. Nothing is written to the store before the fit has ended well, so a cancelled fit, a
failed one or one whose worker died leaves no user behind. A worker that dies mid-fit
(RayActorError) is replaced and the fit started again, `worker_retries` times; then the job fails.

A job folder whose owner process is gone (the ingress restarted) is reaped as FAILED by the next
manager's reconciliation (`info`): the client resubmits; no user was written.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from premier.files import atomic_write_bytes
from serving.fit_folders import UploadsFolder, read_json
from serving.fit_settings import (
    IMAGES_DIR,
    JOB_KIND,
    OWNER_FILE,
    PROGRESS_FILE,
    RUNNING_FILE,
    TERMINAL,
    FitSettings,
    public_reason,
)

log = logging.getLogger("ray.serve")
PROGRESS_POLL_S = 1.0  # per job: a call into the busy worker each time (16 fits at 4/s cost it ~10 % of its rounds)
RUNNER = "worker"


class ResidentDispatcher:
    """Runs resident fit jobs from this process; `info` answers for them as the Jobs API does for Ray jobs."""

    def __init__(
        self, settings: FitSettings, folder: UploadsFolder, store_path: str, model: str | None, checkpoint: str | None
    ):
        self.settings, self.folder = settings, folder
        self.store_path, self.model, self.checkpoint = store_path, model, checkpoint
        self._lock = threading.Lock()
        self._places = threading.BoundedSemaphore(settings.max_running_jobs)
        self._workers: list[Any] | None = None
        self._threads: dict[str, threading.Thread] = {}
        self._cancelled: set[str] = set()
        self._where: dict[str, Any] = {}  # job id -> the worker fitting it
        threading.Thread(target=self._warm, name="fit-workers-warm-up", daemon=True).start()

    def _warm(self) -> None:
        try:
            self.warm_up()
        except Exception as e:  # the first fit tries again (and reports)
            log.warning("fit workers did not start: %s", e)

    # ------------------------------------------------------------------ jobs
    def start(self, job_id: str, user_id: str) -> None:
        job_dir = self.folder.path / job_id
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "runner": RUNNER, "started_at": time.time()}
        atomic_write_bytes(job_dir / OWNER_FILE, json.dumps(owner).encode())
        thread = threading.Thread(target=self._run, args=(job_id, user_id), name=f"fit-{job_id}", daemon=True)
        with self._lock:
            self._threads[job_id] = thread
        thread.start()

    def cancel(self, job_id: str) -> bool:
        """Ask the job's worker to stop it; True if this process runs it (its result says how it ended)."""
        with self._lock:
            if job_id not in self._threads:
                return False
            self._cancelled.add(job_id)
            worker = self._where.get(job_id)
        if worker is not None:
            try:
                worker.cancel.remote(job_id)
            except Exception as e:  # a dead worker: the job's thread sees it and ends STOPPED
                log.info("fit job %s: cancel: %s", job_id, e)
        return True

    def running(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._threads

    def wait(self, job_id: str, timeout: float) -> None:
        with self._lock:
            thread = self._threads.get(job_id)
        if thread is not None:
            thread.join(timeout)

    def info(self, job_id: str) -> Any:
        """A Jobs-API-like description (status.value, metadata, message, start/end times) of a resident job, or
        None if the folder does not hold one. An orphan (its owner process is gone) is described as FAILED, so
        that the folder's reconciliation reaps it."""
        job_dir = self.folder.path / job_id
        claim = read_json(job_dir / "claim.json")
        result = self.folder.result(job_id)
        owner = read_json(job_dir / OWNER_FILE)
        reaped = bool(result) and self.settings.jobs_min_images is None  # every job of this server is resident
        if not owner and result.get("runner") != RUNNER and not reaped:
            return None
        status, message = "PENDING", ""
        if result.get("status") in TERMINAL:
            status = result["status"]
        elif owner:
            with self._lock:
                mine = job_id in self._threads
            if mine or _alive(owner):
                status = "RUNNING" if (job_dir / RUNNING_FILE).exists() else "PENDING"
            else:
                status, message = "FAILED", "the server restarted during the fit; resubmit it"
        meta = {"kind": JOB_KIND, "store": self.store_path, "user_id": claim.get("user_id") or result.get("user_id")}
        started = claim.get("created_at") or owner.get("started_at")
        return SimpleNamespace(
            status=SimpleNamespace(value=status),
            metadata=meta,
            message=message,
            start_time=started * 1000 if started else None,
            end_time=result["finished_at"] * 1000 if result.get("finished_at") else None,
        )

    # ------------------------------------------------------------------ the job's thread
    def _run(self, job_id: str, user_id: str) -> None:
        job_dir = self.folder.path / job_id
        result: dict[str, Any] = {"status": "FAILED", "reason": "the fit ended without a result"}
        try:
            result = self._fit_and_store(job_id, user_id, job_dir)
        except Exception as e:
            log.exception("fit job %s failed", job_id)
            result = {"status": "FAILED", "reason": public_reason(f"{type(e).__name__}: {e}"), "detail": repr(e)}
        finally:
            from serving.fit_job import _tidy

            submitted = read_json(job_dir / "claim.json").get("created_at")
            now = time.time()
            result.update(job_id=job_id, user_id=user_id, runner=RUNNER, finished_at=now)
            if submitted:
                result["seconds"] = now - submitted  # upload accepted -> ended: the fit latency metric
            self.folder.write_result(job_id, result)
            _tidy(job_dir, result.get("status") == "SUCCEEDED")
            with self._lock:
                self._threads.pop(job_id, None)
                self._cancelled.discard(job_id)
                self._where.pop(job_id, None)
            log.info("fit job %s for user %r: %s", job_id, user_id, result["status"])

    def _fit_and_store(self, job_id: str, user_id: str, job_dir: Path) -> dict[str, Any]:
        from premier.training.dataset import read_user_folder

        while not self._places.acquire(timeout=0.2):
            if self._is_cancelled(job_id):
                return {"status": "STOPPED", "reason": ""}
        try:
            if self._is_cancelled(job_id):
                return {"status": "STOPPED", "reason": ""}
            atomic_write_bytes(job_dir / RUNNING_FILE, json.dumps({"pid": os.getpid(), "at": time.time()}).encode())
            examples = read_user_folder(job_dir / IMAGES_DIR, user_id=user_id)
            images = [(e.file, e.path.read_bytes()) for e in examples]
            captions = [e.prompt for e in examples]
            outcome = self._fit_with_retries(job_id, user_id, job_dir, images, captions)
        finally:
            self._places.release()
        if outcome.get("status") == "STOPPED":
            return {"status": "STOPPED", "reason": ""}
        if outcome["code"] != 0:
            reason = outcome.get("error") or "the fit failed"
            return {"status": "FAILED", "reason": public_reason(reason), "detail": reason}
        if self._is_cancelled(job_id):
            return {"status": "STOPPED", "reason": ""}
        return {"status": "SUCCEEDED", "user": self._commit(outcome["record"])}

    def _fit_with_retries(
        self, job_id: str, user_id: str, job_dir: Path, images: list[tuple[str, bytes]], captions: list[str]
    ) -> dict[str, Any]:
        import ray
        from ray.exceptions import RayActorError

        attempts = self.settings.worker_retries + 1
        for attempt in range(attempts):
            worker = self._pick()
            with self._lock:
                self._where[job_id] = worker
            ref = worker.fit.remote(job_id, user_id, images, captions, self.settings.image_limits())
            try:
                while True:
                    ready, _ = ray.wait([ref], timeout=PROGRESS_POLL_S)
                    if ready:
                        return ray.get(ref)
                    if self._is_cancelled(job_id):
                        worker.cancel.remote(job_id)
                    progress = ray.get(worker.progress.remote(job_id))
                    if progress:
                        atomic_write_bytes(job_dir / PROGRESS_FILE, json.dumps(progress).encode())
            except RayActorError as e:
                log.warning("fit job %s: its worker died (attempt %d of %d): %s", job_id, attempt + 1, attempts, e)
                self._forget_workers()
                if self._is_cancelled(job_id):
                    return {"status": "STOPPED"}
                (job_dir / PROGRESS_FILE).unlink(missing_ok=True)
        return {"code": 1, "error": f"the fit worker died {attempts} time(s) during the fit; no user was written"}

    def _commit(self, record: Any) -> dict[str, Any]:
        """The record into the store, in one SQLite transaction (as the job driver commits)."""
        from premier.served import load_served_basis
        from serving.fit_job import record_summary
        from store.user_store import UserStore

        basis, checkpoint_id = load_served_basis(self.checkpoint)
        with UserStore(self.store_path, basis, checkpoint_id) as store:
            stored = store.put(record)
        return record_summary(stored)

    # ------------------------------------------------------------------ workers
    def _pick(self) -> Any:
        """The least loaded worker (ties: the first); workers are made (and their model loaded) on first use."""
        import ray

        from serving.fit_workers import worker_handles

        with self._lock:
            if self._workers is None:
                self._workers = worker_handles(self.settings, self.store_path, self.model, self.checkpoint)
            workers = list(self._workers)
        if len(workers) == 1:
            return workers[0]
        loads = ray.get([w.load.remote() for w in workers])
        return workers[min(range(len(workers)), key=loads.__getitem__)]

    def warm_up(self) -> None:
        """Start the workers and wait for their model to load (the server's start, not the first fit, pays it)."""
        import ray

        self._pick()
        with self._lock:
            workers = list(self._workers or [])
        ray.get([w.ready.remote() for w in workers])

    def _forget_workers(self) -> None:
        with self._lock:
            self._workers = None

    def _is_cancelled(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._cancelled


def _alive(owner: dict[str, Any]) -> bool:
    """Whether the process that dispatches a job still runs (on this host; another host's: assumed alive)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except (OSError, ValueError):
        return False
    return True


def read_progress(job_dir: Path) -> dict[str, Any] | None:
    return read_json(job_dir / PROGRESS_FILE) or None


__all__ = ["ResidentDispatcher", "read_progress", "RUNNER"]
