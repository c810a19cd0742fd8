"""Fitting new users as Ray jobs: admission, the upload, the job submission, its status and its end.

`POST /v1/users/{id}/fit` hands its multipart upload to `FitJobManager.submit`, which does the
cheapest work first: `check_upload` (names, counts, sizes, captions, each image's format by its
content and its pixels by its header: nothing is written or decoded), then admission, then the
decoding of every image in the manager's own bounded pool of threads (`decode_workers`, apart from
the threads that serve generation), then the job folder in the dataset format `premier fit-user`
reads (images + captions.jsonl, `job.json` last), and only then `python -m serving.fit_job JOB_DIR`
through the Ray Jobs API. The job's driver runs where the store is (it asks for `store_resource`,
which only the store's node, the Ray head, advertises; it needs no CPU or GPU of its own); it waits
for one of `max_running_jobs` fitting slots (lock files beside the job folders), sends the images
as bytes to a Ray task that fits stage 2 on any node (the `num_cpus`/`num_gpus`/`memory_bytes` of
the settings) within `job_timeout_s`, and puts the record into the store in one SQLite transaction.
The ingress resolves users from the store per request, so the user is servable without a restart.

Admission, per server (its uploads folder, shared by its ingress replicas; a file lock makes it
atomic across them): one job that has not ended per user (else FitConflictError, 409) and at most
`max_running_jobs + max_queued_jobs` such jobs (else FitBusyError, 429 with Retry-After). A job's
folder is its reservation: `claim.json` names its user from the moment it is admitted.

The manager keeps no state of its own that matters: a job is its Ray submission id (`fit-<hex>`)
plus metadata (user id, store), its folder while it lives, and its outcome (`results/<id>.json`,
written by the job, or by the manager for a job whose driver was killed). A job's folder is removed
when the job ends in any state, by the job or, for a killed one, by whichever manager sees it ended
(`status`, admission, `counts`, and the sweep when a manager is made). `counts()`, behind /metrics,
reads the live folders and the kept results (at most `keep_results`): never the cluster's whole
job list. `uploads_dir` must be seen by the ingress and the job driver, both on the store's node;
the fitting task gets the images as bytes, so no other node needs it.

Messages carry reasons, never server paths, tracebacks or log tails (`public_reason`); the details
go to the server log and the job's log.

With `runner: workers` (docs/onboarding.md) the same admission, folder and results hold, but an
admitted job is handed to the resident fit workers (serving/fit_dispatch.py, serving/fit_workers.py)
instead of the Jobs API, and its state comes from its folder and result; uploads of at least
`jobs_min_images` images still go to a Ray job. Both paths stay in one module, the manager, so that
admission, status and cancellation read one way for either (the one module reason for its length).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from premier.users import validate_user_id
from serving.fit_dispatch import ResidentDispatcher, read_progress
from serving.fit_folders import UploadsFolder
from serving.fit_settings import (
    JOB_ID,
    JOB_KIND,
    RUNNING_FILE,
    STATUSES,
    STORE_RESOURCE_SHARE,
    TERMINAL,
    FitBusyError,
    FitConflictError,
    FitSettings,
    FitUnavailableError,
    UnknownJobError,
    UnsupportedMediaError,
    UploadTooLargeError,
    public_reason,
)
from serving.fit_uploads import check_upload, write_upload

log = logging.getLogger("ray.serve")

RECONCILE_EVERY_S = 30.0
"""How often counts() checks the live folders against the Jobs API (admission and status always do)."""
CANCEL_WAIT_S = 5.0
"""How long a cancel waits for the job to end (Ray gives a driver 3 s after SIGTERM before SIGKILL)."""
_LOGGED_MAX = 1000


class FitJobManager:
    """Admits, submits, reports on and cancels fit jobs; safe to use from several threads and several processes."""

    def __init__(
        self,
        settings: FitSettings,
        *,
        store_path: str,
        model: str | None,
        checkpoint: str | None,
        store_resource: str | None = None,
    ):
        self.settings = settings
        self.store_resource = store_resource
        self.store_path = str(Path(store_path).expanduser().resolve())
        self.model = str(Path(model).expanduser().resolve()) if model else None
        self.checkpoint = str(Path(checkpoint).expanduser().resolve()) if checkpoint else None
        self.uploads_dir = Path(settings.uploads_dir or Path(self.store_path) / "fit-uploads").expanduser().resolve()
        self.folder = UploadsFolder(self.uploads_dir, settings.keep_results)
        self._client: Any = None
        self._lock = threading.Lock()
        self._counts: tuple[float, dict[str, int]] | None = None
        self._decoder: ThreadPoolExecutor | None = None
        self._reconciled_at = float("-inf")
        self._logged: OrderedDict[str, None] = OrderedDict()
        self.resident = (
            ResidentDispatcher(settings, self.folder, self.store_path, self.model, self.checkpoint)
            if settings.runner == "workers"
            else None
        )
        self.sweep()

    # ------------------------------------------------------------------ submit
    def submit(self, user_id: str, files: list[tuple[str, bytes]], captions: list[str]) -> str:
        """Check, admit, decode and store the upload, submit the job; returns its id. Nothing is left behind on error.

        Raises InvalidRequestError (400; its subclasses UploadTooLargeError 413, UnsupportedMediaError 415,
        FitConflictError 409), FitBusyError (429) or FitUnavailableError (503).
        """
        validate_user_id(user_id)
        check_upload(self.settings, files, captions)
        s = self.settings
        resident = self.resident is not None and (s.jobs_min_images is None or len(files) < s.jobs_min_images)
        if not resident:
            self._jobs()  # before writing anything: no upload is stored while fitting is unavailable
        job_id = f"fit-{uuid.uuid4().hex[:16]}"
        job_dir = self.folder.admit(job_id, user_id, self._info_or_none, s.max_running_jobs, s.max_queued_jobs)
        try:
            spec = {
                "job_id": job_id,
                "user_id": user_id,
                "store": self.store_path,
                "model": self.model,
                "checkpoint": self.checkpoint,
                "fit_options": s.fit_options(),
                "limits": s.image_limits(),
                "timeout_s": s.job_timeout_s,
                "max_running": s.max_running_jobs,
                "keep_uploads": s.keep_uploads,
                "task": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus, "memory": s.memory_bytes},
            }
            spec["runner"] = "worker" if resident else "jobs"
            job_dir = write_upload(s, job_dir, user_id, files, captions, spec, self._decode_pool())
            if resident:
                assert self.resident is not None
                self.resident.start(job_id, user_id)
                self._counts = None
                log.info("fit job %s for user %r (%d images) handed to the fit workers", job_id, user_id, len(files))
                return job_id
            submit = dict(
                entrypoint=shlex.join([sys.executable, "-m", "serving.fit_job", str(job_dir)]),
                submission_id=job_id,
                metadata={"kind": JOB_KIND, "user_id": user_id, "store": self.store_path},
                runtime_env={"env_vars": self._job_env()},
                entrypoint_num_cpus=0,  # the driver waits for the fitting task and writes the store: no CPU or GPU
                entrypoint_num_gpus=0,
            )
            if self.store_resource:  # the driver writes the store: it runs on the store's node (the head)
                submit["entrypoint_resources"] = {self.store_resource: STORE_RESOURCE_SHARE}
            deadline = time.monotonic() + s.submit_retry_s
            with self._jobs_api("could not submit the fit job to the Ray Jobs API") as client:
                while True:
                    try:
                        client.submit_job(**submit)
                        break
                    except RuntimeError as e:  # a cluster that just started: its job agent registers a little later
                        if "No available agent" not in str(e) or time.monotonic() > deadline:
                            raise
                        time.sleep(0.5)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        self._counts = None
        log.info("fit job %s submitted for user %r (%d images)", job_id, user_id, len(files))
        return job_id

    def _decode_pool(self) -> ThreadPoolExecutor:
        """The threads that decode uploads: `decode_workers` of them, apart from those that serve generation."""
        with self._lock:
            if self._decoder is None:
                self._decoder = ThreadPoolExecutor(self.settings.decode_workers, thread_name_prefix="fit-decode")
            return self._decoder

    def sweep(self) -> None:
        """What killed jobs left: folders of jobs that ended or that the Jobs API does not know, results beyond
        `keep_results`. Called when a manager is made; best effort (a Jobs API that is away: the next admission
        reconciles)."""
        try:
            if not self.uploads_dir.is_dir():
                return
            self.folder.sweep_temporary()
            if self.folder.job_dirs():
                self._reconcile()
            else:
                self.folder.prune_results()
        except Exception as e:  # never fails the server's start
            log.warning("fit uploads sweep of %s skipped: %s", self.uploads_dir, e)

    def _reconcile(self) -> None:
        self.folder.live(self._info_or_none)
        self.folder.prune_results()
        self._reconciled_at = time.monotonic()

    def _job_env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **self.settings.env_vars}

    # ------------------------------------------------------------------ status
    def status(self, job_id: str) -> dict[str, Any]:
        """{"job_id", "user_id", "status", "message", "submitted_at", "finished_at", "user" (on success)}."""
        info = self._info(job_id)
        return self._describe(job_id, info.metadata["user_id"], info)

    def running_here(self, job_id: str) -> bool:
        """Whether this process's resident dispatcher is fitting the job now (a lookup: no I/O)."""
        return self.resident is not None and self.resident.running(job_id)

    def _info_or_none(self, job_id: str) -> Any:
        """The Jobs API's details of a job (the dispatcher's, for a resident one), None if it does not know it."""
        if self.resident is not None:
            info = self.resident.info(job_id)
            if info is not None or self.settings.jobs_min_images is None:
                return info
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            try:
                return client.get_job_info(job_id)
            except RuntimeError as e:
                if "does not exist" in str(e):
                    return None
                raise

    def _info(self, job_id: str) -> Any:
        """The Jobs API's details of one of this store's fit jobs; UnknownJobError for anything else."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise UnknownJobError(str(job_id))
        info = self._info_or_none(job_id)
        meta = (info.metadata or {}) if info is not None else {}
        if info is None or meta.get("kind") != JOB_KIND or meta.get("store") != self.store_path:
            raise UnknownJobError(job_id)
        return info

    def _describe(self, job_id: str, user_id: str, info: Any) -> dict[str, Any]:
        ray_status = str(info.status.value)
        job_dir = self.uploads_dir / job_id
        if ray_status in TERMINAL and job_dir.exists():
            self.folder.reap(job_id, info)  # its driver was killed (or never ran): what it left goes now
        result = self.folder.result(job_id)
        status = ray_status  # Ray's word on where the job is; the result says how it ended
        if result.get("status") in TERMINAL and ray_status != "RUNNING":
            # Ended: a job that committed its user while being stopped is SUCCEEDED (the user is there), one that
            # was cancelled before the cluster ever started it (Ray keeps it PENDING) is STOPPED.
            status = result["status"]
        queued = status == "RUNNING" and not (job_dir / RUNNING_FILE).exists()
        finished = info.end_time / 1000 if info.end_time else result.get("finished_at")
        out: dict[str, Any] = {
            "job_id": job_id,
            "user_id": user_id,
            "status": "PENDING" if queued else status,
            "message": "",
            "submitted_at": info.start_time / 1000 if info.start_time else None,
            "finished_at": finished if status in TERMINAL else None,
        }
        if queued:
            out["message"] = (
                f"queued: waiting for a fitting slot (at most {self.settings.max_running_jobs} jobs fit at once)"
            )
        elif status == "PENDING":
            out["message"] = "waiting for the cluster to start the job"
        elif status == "RUNNING":
            out["message"] = f"fitting user {user_id!r}"
            progress = read_progress(job_dir)
            if progress:
                out["progress"] = progress
        elif status == "SUCCEEDED":
            out["user"] = result.get("user")
            out["message"] = f"user {user_id!r} is fitted and servable"
        elif status == "FAILED":
            detail = result.get("detail") or result.get("reason") or info.message
            reason = public_reason(result.get("reason") or info.message or "the job failed without a message")
            out["message"] = f"fitting failed; user {user_id!r} was not written: {reason}"
            self._log_once(job_id, "fit job %s for user %r failed: %s", job_id, user_id, detail)
        else:  # STOPPED
            reason = public_reason(result.get("reason") or "")
            out["message"] = f"the job was stopped before it finished; user {user_id!r} was not written" + (
                f" ({reason})" if reason else ""
            )
        return out

    def _log_once(self, job_id: str, fmt: str, *args: Any) -> None:
        """The details of a job's failure, once per job (clients poll), in the server log."""
        with self._lock:
            if job_id in self._logged:
                return
            self._logged[job_id] = None
            while len(self._logged) > _LOGGED_MAX:
                self._logged.popitem(last=False)
        log.warning(fmt, *args)

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop a job (SIGTERM, then SIGKILL); True if it was still running."""
        self._info(job_id)  # 404 for jobs that are not ours
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            return bool(client.stop_job(job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Stop a job (DELETE /v1/jobs/{id}) and return its state: ended (STOPPED, or how it ended if it had), or
        still stopping. Its folder goes; no user is written. A job the cluster never started (no node for its
        driver) cannot be stopped by Ray: it is recorded as STOPPED here, and would fail at once if it ever ran."""
        info = self._info(job_id)
        user_id = info.metadata["user_id"]
        state = self._describe(job_id, user_id, info)
        if state["status"] in TERMINAL:
            return state
        if self.resident is not None and self.resident.cancel(job_id):
            self.resident.wait(job_id, CANCEL_WAIT_S)
            self._counts = None
            return self._describe(job_id, user_id, self._info(job_id))
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            client.stop_job(job_id)
        deadline = time.monotonic() + CANCEL_WAIT_S
        while True:
            time.sleep(0.2)
            info = self._info(job_id)
            state = self._describe(job_id, user_id, info)
            if state["status"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                if str(info.status.value) == "PENDING":
                    self.folder.cancelled(job_id, user_id, "cancelled before it started")
                    state = self._describe(job_id, user_id, info)
                break
        self._counts = None
        log.info("fit job %s for user %r cancelled: %s", job_id, user_id, state["status"])
        return state

    def counts(self) -> dict[str, int]:
        """Fit jobs of this server by status (every status present, zeros included), for the metrics.

        Bounded: the live jobs' folders (at most max_running + max_queued, and leftovers until reaped) and the
        kept results (at most keep_results); the Jobs API is asked about the live ones every RECONCILE_EVERY_S.
        """
        cached = self._counts
        if cached is not None and time.monotonic() - cached[0] < self.settings.counts_cache_s:
            return dict(cached[1])
        if self.resident is None or self.settings.jobs_min_images is not None:
            self._jobs()  # a Jobs API that is away: FitUnavailableError, as for every call
        if time.monotonic() - self._reconciled_at > RECONCILE_EVERY_S:
            self._reconcile()
        ended = self.folder.ended()
        tally = Counter(ended.values())
        for job in self.folder.live():
            if job.job_id not in ended:
                tally["RUNNING" if job.running else "PENDING"] += 1
        counts = {s: tally.get(s, 0) for s in STATUSES}
        self._counts = (time.monotonic(), counts)
        return dict(counts)

    def latencies(self) -> list[tuple[str, str, float]]:
        """(runner, status, seconds from upload to end) of the kept results that record it (serving.fit_metrics)."""
        out = []
        for job_id, status in self.folder.ended().items():
            result = self.folder.result(job_id)
            if isinstance(result.get("seconds"), (int, float)):
                out.append((str(result.get("runner") or "jobs"), status, float(result["seconds"])))
        return out

    # ------------------------------------------------------------------ the Jobs API
    def _jobs(self) -> Any:
        """A JobSubmissionClient, made on first use (and again after a failure), so that the server starts without one."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.jobs_address())
                except Exception as e:
                    log.warning("the Ray Jobs API is not reachable: %s", e)
                    raise FitUnavailableError(
                        f"the Ray Jobs API is not reachable: {public_reason(str(e), 300)}"
                    ) from None
            return self._client

    @contextlib.contextmanager
    def _jobs_api(self, failing: str) -> Iterator[Any]:
        """The client; any trouble talking to the Jobs API becomes FitUnavailableError (503) and a fresh client next time."""
        try:
            yield self._jobs()
        except (FitUnavailableError, UnknownJobError):
            raise
        except Exception as e:
            self._forget_client()
            log.warning("%s: %s", failing, e)
            raise FitUnavailableError(f"{failing}: {public_reason(str(e), 300)}") from None

    def _forget_client(self) -> None:
        with self._lock:
            self._client = None

    def jobs_address(self) -> str | None:
        """The configured dashboard URL, else the dashboard of the Ray cluster this process belongs to."""
        if self.settings.jobs_address:
            return self.settings.jobs_address
        import ray

        if not ray.is_initialized():
            return None  # Ray's own discovery: RAY_ADDRESS, then a local cluster
        from ray._private import ray_constants
        from ray.experimental import internal_kv

        url = internal_kv._internal_kv_get(
            ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD
        )
        if not url:
            raise FitUnavailableError(
                "this Ray cluster runs no dashboard, so it has no Jobs API (start it with the dashboard)"
            )
        return f"http://{url.decode()}"


__all__ = [
    "FitSettings",
    "FitJobManager",
    "FitUnavailableError",
    "FitBusyError",
    "FitConflictError",
    "UnknownJobError",
    "UnsupportedMediaError",
    "UploadTooLargeError",
    "JOB_KIND",
    "TERMINAL",
]
