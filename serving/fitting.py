"""Fitting new users as Ray jobs: the upload checks, the job submission and the job status.

`POST /v1/users/{id}/fit` hands its multipart upload to `FitJobManager.submit`, which checks it,
writes it in the dataset format `premier fit-user` reads (images + captions.jsonl, written to a
temporary folder and renamed, so a job never sees half an upload) and submits
`python -m serving.fit_job JOB_DIR` through the Ray Jobs API. The job's driver runs where the
store is (it asks for `store_resource`, which only the store's node, the Ray head, advertises; it
needs no CPU or GPU of its own); it sends the images as bytes to a Ray task that fits stage 2 on
any node (the `num_cpus`/`num_gpus`/`memory_bytes` of the settings) and returns the record's
bytes, and the driver puts the record into the store in one SQLite transaction. The ingress
resolves users from the store per request, so the user is servable without a restart.

The manager keeps no state of its own: a job is its Ray submission id (`fit-<hex>`) plus
metadata (user id, store), and its outcome is the Jobs API status plus the `result.json` the job
writes into its folder. `uploads_dir` must be seen by the ingress and the job driver, both on the
store's node; the fitting task gets the images as bytes, so no other node needs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from premier.users import validate_user_id
from serving.fit_settings import (
    JOB_ID,
    JOB_KIND,
    MAX_MESSAGE_CHARS,
    RESULT_FILE,
    STATUSES,
    STORE_RESOURCE_SHARE,
    FitSettings,
    FitUnavailableError,
    UnknownJobError,
    UploadTooLargeError,
)
from serving.fit_uploads import check_upload, write_upload


class FitJobManager:
    """Submits fit jobs and reports on them; safe to use from several threads and several processes."""

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
        self._client: Any = None
        self._lock = threading.Lock()
        self._counts: tuple[float, dict[str, int]] | None = None

    # ------------------------------------------------------------------ submit
    def submit(self, user_id: str, files: list[tuple[str, bytes]], captions: list[str]) -> str:
        """Check and store the upload, submit the job; returns its id. Nothing is left behind on error."""
        validate_user_id(user_id)
        check_upload(self.settings, files, captions)
        self._jobs()  # before writing anything: no upload is stored while fitting is unavailable
        job_id = f"fit-{uuid.uuid4().hex[:16]}"
        spec = {
            "job_id": job_id,
            "user_id": user_id,
            "store": self.store_path,
            "model": self.model,
            "checkpoint": self.checkpoint,
            "fit_options": self.settings.fit_options(),
            "keep_uploads": self.settings.keep_uploads,
            "task": {
                "num_cpus": self.settings.num_cpus,
                "num_gpus": self.settings.num_gpus,
                "memory": self.settings.memory_bytes,
            },
        }
        job_dir = write_upload(self.settings, self.uploads_dir / job_id, user_id, files, captions, spec)
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
        deadline = time.monotonic() + self.settings.submit_retry_s
        try:
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
        return job_id

    def _job_env(self) -> dict[str, str]:
        root = str(Path(__file__).resolve().parent.parent)
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        return {"PYTHONPATH": path, "HF_HUB_OFFLINE": "1", **self.settings.env_vars}

    # ------------------------------------------------------------------ status
    def status(self, job_id: str) -> dict[str, Any]:
        """{"job_id", "user_id", "status", "message", "submitted_at", "finished_at", "user" (on success)}."""
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise UnknownJobError(str(job_id))
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            try:
                info = client.get_job_info(job_id)
            except RuntimeError as e:
                if "does not exist" in str(e):
                    raise UnknownJobError(job_id) from None
                raise
        meta = info.metadata or {}
        if meta.get("kind") != JOB_KIND or meta.get("store") != self.store_path:
            raise UnknownJobError(job_id)
        return self._describe(job_id, meta["user_id"], str(info.status.value), info)

    def _describe(self, job_id: str, user_id: str, status: str, info: Any) -> dict[str, Any]:
        result = self._result(job_id)
        out: dict[str, Any] = {
            "job_id": job_id,
            "user_id": user_id,
            "status": status,
            "message": "",
            "submitted_at": info.start_time / 1000 if info.start_time else None,
            "finished_at": info.end_time / 1000 if info.end_time else None,
        }
        if status == "PENDING":
            out["message"] = "waiting for the cluster to start the job"
        elif status == "RUNNING":
            out["message"] = f"fitting user {user_id!r}"
        elif status == "SUCCEEDED":
            out["user"] = result.get("user")
            out["message"] = f"user {user_id!r} is fitted and servable"
        elif status == "FAILED":
            reason = result.get("reason") or info.message or "the job failed without a message"
            if len(reason) > MAX_MESSAGE_CHARS:  # Ray's message ends with the job's log tail: keep the end
                reason = "..." + reason[-MAX_MESSAGE_CHARS:]
            out["message"] = f"fitting failed; user {user_id!r} was not written: {reason}"
        else:  # STOPPED
            out["message"] = f"the job was stopped before it finished; user {user_id!r} was not written"
        return out

    def _result(self, job_id: str) -> dict[str, Any]:
        try:
            data = json.loads((self.uploads_dir / job_id / RESULT_FILE).read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop a job (SIGTERM, then SIGKILL); True if it was still running."""
        self.status(job_id)  # 404 for jobs that are not ours
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            return bool(client.stop_job(job_id))

    def counts(self) -> dict[str, int]:
        """Fit jobs of this store by status (every status present, zeros included), for the metrics."""
        cached = self._counts
        if cached is not None and time.monotonic() - cached[0] < self.settings.counts_cache_s:
            return dict(cached[1])
        with self._jobs_api("could not reach the Ray Jobs API") as client:
            jobs = client.list_jobs()
        tally = Counter(
            str(j.status.value)
            for j in jobs
            if (j.metadata or {}).get("kind") == JOB_KIND and (j.metadata or {}).get("store") == self.store_path
        )
        counts = {s: tally.get(s, 0) for s in STATUSES}
        self._counts = (time.monotonic(), counts)
        return dict(counts)

    # ------------------------------------------------------------------ the Jobs API
    def _jobs(self) -> Any:
        """A JobSubmissionClient, made on first use (and again after a failure), so that the server starts without one."""
        with self._lock:
            if self._client is None:
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.jobs_address())
                except Exception as e:
                    raise FitUnavailableError(f"the Ray Jobs API is not reachable: {e}") from None
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
            raise FitUnavailableError(f"{failing}: {e}") from None

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


__all__ = ["FitSettings", "FitJobManager", "FitUnavailableError", "UnknownJobError", "UploadTooLargeError", "JOB_KIND"]
