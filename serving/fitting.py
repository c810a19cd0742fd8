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
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from premier.errors import InvalidRequestError, PremierError
from premier.users import validate_user_id

JOB_KIND = "premier-fit"
JOB_ID = re.compile(r"fit-[0-9a-f]{16}")
STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
SPEC_FILE = "job.json"  # what the job does (written by submit)
RESULT_FILE = "result.json"  # how it ended (written by the job)
IMAGES_DIR = "images"  # the user folder: images + captions.jsonl
RECORD_FILE = "record.safetensors"
MAX_MESSAGE_CHARS = 4000
MAX_NAME_BYTES = 200
STORE_RESOURCE_SHARE = 0.001  # of the store's custom resource per store opener (ingress, fit driver): placement, not a limit


class FitUnavailableError(PremierError, RuntimeError):
    """The Ray Jobs API cannot be reached (no dashboard, cluster down); the request may be retried (503)."""


class UnknownJobError(PremierError, LookupError):
    """No fit job with this id (404)."""

    def __init__(self, job_id: str):
        super().__init__(f"unknown fit job {job_id!r}")
        self.job_id = job_id


class UploadTooLargeError(InvalidRequestError):
    """An upload over the configured limits (an ingress may answer 413 instead of 400)."""


class FitSettings(BaseModel):
    """Fitting through the server: where uploads go, how jobs are reached, upload limits, stage-2 options."""

    model_config = ConfigDict(extra="forbid")

    uploads_dir: Path | None = Field(None, description="where uploads and job folders live (default: STORE/fit-uploads); on the store's node")
    jobs_address: str | None = Field(None, description="Ray dashboard URL for the Jobs API (default: the cluster this process runs in)")
    # upload limits
    max_images: int = Field(64, ge=1)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_upload_bytes: int = Field(200 * 2**20, ge=1)
    max_image_pixels: int = Field(64 * 2**20, ge=1, description="decoded width x height above which an image is refused")
    max_caption_chars: int = Field(2000, ge=1)
    keep_uploads: bool = Field(False, description="keep a finished job's images (default: only job.json and result.json stay)")
    # stage-2 options (`premier fit-user` flags; defaults: the reference release)
    mode: Literal["coefficients", "direct"] = "coefficients"
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(2, ge=1)
    eval_every: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    resolution: int | None = Field(None, ge=16, description="square training resolution (default: 32 embedded, 512 FLUX)")
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    optimizer: Literal["prodigy", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # resources of the fitting task (a Ray task on any node; the job's driver itself takes none) and the job's
    # environment (no runtime_env downloads)
    num_cpus: float = Field(0, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_bytes: int | None = Field(None, ge=0)
    env_vars: dict[str, str] = Field(default_factory=dict)
    submit_retry_s: float = Field(10.0, ge=0, description="how long a submission waits for a starting cluster's job agent")
    counts_cache_s: float = Field(2.0, ge=0, description="how long counts() may reuse a Jobs API listing (metrics scrapes)")

    def fit_user_args(self) -> list[str]:
        """These options as `premier fit-user` flags."""
        args = ["--mode", self.mode, "--steps", str(self.steps), "--batch-size", str(self.batch_size),
                "--eval-every", str(self.eval_every), "--patience", str(self.patience),
                "--precision", self.precision, "--seed", str(self.seed)]  # fmt: skip
        for flag, value in (("--resolution", self.resolution), ("--optimizer", self.optimizer), ("--lr", self.lr),
                            ("--device", self.device), ("--dtype", self.dtype)):  # fmt: skip
            if value is not None:
                args += [flag, str(value)]
        return args


class FitJobManager:
    """Submits fit jobs and reports on them; safe to use from several threads and several processes."""

    def __init__(self, settings: FitSettings, *, store_path: str, model: str | None, checkpoint: str | None,
                 store_resource: str | None = None):  # fmt: skip
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
        self._check_upload(files, captions)
        self._jobs()  # before writing anything: no upload is stored while fitting is unavailable
        job_id = f"fit-{uuid.uuid4().hex[:16]}"
        job_dir = self._write_upload(job_id, user_id, files, captions)
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

    def _check_upload(self, files: list[tuple[str, bytes]], captions: list[str]) -> None:
        from premier.training.dataset import CAPTIONS_FILE, IMAGE_SUFFIXES

        s = self.settings
        if not files:
            raise InvalidRequestError("images", "at least one image is needed to fit a user")
        if len(files) > s.max_images:
            raise UploadTooLargeError("images", f"{len(files)} images; at most {s.max_images} per upload")
        if len(captions) != len(files):
            raise InvalidRequestError("captions", f"{len(captions)} captions for {len(files)} images: give one caption per image, in order")
        total, seen = 0, set()
        for i, (name, data) in enumerate(files):
            where = f"images[{i}]"
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", "..") or "\\" in name or name == CAPTIONS_FILE:
                raise InvalidRequestError(where, f"file name {name!r} must be a plain file name (no folders)")
            if len(name.encode()) > MAX_NAME_BYTES or not name.isprintable():
                raise InvalidRequestError(where, f"file name {name[:40]!r}... must be printable and at most {MAX_NAME_BYTES} bytes")
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                raise InvalidRequestError(where, f"file name {name!r} must end in one of {', '.join(sorted(IMAGE_SUFFIXES))}")
            if name in seen:
                raise InvalidRequestError(where, f"file name {name!r} is used twice")
            seen.add(name)
            if not isinstance(data, (bytes, bytearray)) or not data:
                raise InvalidRequestError(where, f"{name!r} is empty")
            if len(data) > s.max_image_bytes:
                raise UploadTooLargeError(where, f"{name!r} is {len(data)} bytes; at most {s.max_image_bytes} allowed")
            total += len(data)
        if total > s.max_upload_bytes:
            raise UploadTooLargeError("images", f"the upload is {total} bytes; at most {s.max_upload_bytes} allowed")
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise InvalidRequestError(f"captions[{i}]", "must be a string")
            if len(caption) > s.max_caption_chars:
                raise InvalidRequestError(f"captions[{i}]", f"is {len(caption)} characters; at most {s.max_caption_chars} allowed")

    def _write_upload(self, job_id: str, user_id: str, files: list[tuple[str, bytes]], captions: list[str]) -> Path:
        """JOB_DIR/{job.json, images/} written beside, checked (every image decodes), then renamed into place."""
        from premier.training.dataset import CAPTIONS_FILE, read_user_folder

        try:
            self.uploads_dir.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{job_id}.", dir=self.uploads_dir))
        except OSError as e:
            raise FitUnavailableError(f"cannot store uploads in {self.uploads_dir}: {e.strerror}") from None
        try:
            images = tmp / IMAGES_DIR
            images.mkdir()
            for name, data in files:
                (images / name).write_bytes(data)
            lines = [json.dumps({"file": name, "prompt": caption}) for (name, _), caption in zip(files, captions)]
            (images / CAPTIONS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            for i, (name, _) in enumerate(files):
                reason = self._undecodable(images / name).replace(str(images / name), name)  # no server paths in replies
                if reason:
                    raise InvalidRequestError(f"images[{i}]", f"{name!r} is not a readable image ({reason})")
            read_user_folder(images, user_id=user_id)  # the job reads it the same way
            spec = {"job_id": job_id, "user_id": user_id, "store": self.store_path, "model": self.model,
                    "checkpoint": self.checkpoint, "fit_args": self.settings.fit_user_args(),
                    "keep_uploads": self.settings.keep_uploads,
                    "task": {"num_cpus": self.settings.num_cpus, "num_gpus": self.settings.num_gpus,
                             "memory": self.settings.memory_bytes}}  # fmt: skip
            (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=1) + "\n")
            job_dir = self.uploads_dir / job_id
            os.replace(tmp, job_dir)
            return job_dir
        except OSError as e:  # a full or read-only disk: the server's trouble, not the request's
            shutil.rmtree(tmp, ignore_errors=True)
            raise FitUnavailableError(f"cannot store the upload: {e.strerror}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _undecodable(self, path: Path) -> str:
        """Why the image cannot be used ('' if it can): it must decode fully and stay within the pixel limit."""
        from PIL import Image

        from premier.training.prepared import load_image

        try:
            with Image.open(path) as im:
                if im.width * im.height > self.settings.max_image_pixels:
                    return f"{im.width}x{im.height} pixels; at most {self.settings.max_image_pixels} allowed"
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            return f"{type(e).__name__}: {e}"
        image, reason = load_image(path)
        return "" if image is not None else reason

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
            str(j.status.value) for j in jobs
            if (j.metadata or {}).get("kind") == JOB_KIND and (j.metadata or {}).get("store") == self.store_path
        )  # fmt: skip
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

        url = internal_kv._internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
        if not url:
            raise FitUnavailableError("this Ray cluster runs no dashboard, so it has no Jobs API (start it with the dashboard)")
        return f"http://{url.decode()}"


__all__ = ["FitSettings", "FitJobManager", "FitUnavailableError", "UnknownJobError", "UploadTooLargeError", "JOB_KIND"]
