"""What fitting through the server is configured by (`FitSettings`), its errors and the job folder's file names.

Shared by the job manager (serving/fitting.py), the upload checks (serving/fit_uploads.py), the job
itself (serving/fit_job.py) and the serve config.

The uploads folder (`uploads_dir`) holds one folder per live job (`fit-<hex>/`: `claim.json`,
`job.json`, `images/`, `running.json` once the job holds a fitting slot), removed when the job ends
in any state; `results/<job id>.json`, how each ended (the newest `keep_results`); `slots/`, the
lock files that bound the running jobs; and `kept/<job id>/`, a succeeded job's images where
`keep_uploads` is set.

Errors and their HTTP answers (serving/api_users.py): UploadTooLargeError 413, UnsupportedMediaError
415, FitConflictError 409 (one live job per user), FitBusyError 429 with Retry-After (the server's
job caps), FitUnavailableError 503, UnknownJobError 404, other InvalidRequestError 400.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from premier.errors import InvalidRequestError, PremierError

JOB_KIND = "premier-fit"
JOB_ID = re.compile(r"fit-[0-9a-f]{16}")
STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
SPEC_FILE = "job.json"  # what the job does (written by submit)
RESULT_FILE = "result.json"  # how a job ended, inside its folder (the layout before RESULTS_DIR; read when reaped)
IMAGES_DIR = "images"  # the user folder: images + captions.jsonl
RECORD_FILE = "record.safetensors"
PROGRESS_FILE = "progress.json"  # a resident fit's progress (step, loss, expected seconds left), rewritten as it goes
OWNER_FILE = "owner.json"  # the process dispatching a resident fit (pid, host): a dead owner's job is reaped
CLAIM_FILE = "claim.json"  # who a job folder is for (written when the job is admitted, before the upload)
RUNNING_FILE = "running.json"  # written by the job once it holds a fitting slot
RESULTS_DIR = "results"  # beside the job folders: <job id>.json, how each job ended
SLOTS_DIR = "slots"  # beside the job folders: slot-<k>.lock, one per running job
KEPT_DIR = "kept"  # beside the job folders: <job id>/images of succeeded jobs (keep_uploads)
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
MAX_MESSAGE_CHARS = 1000
MAX_NAME_BYTES = 200
FORMAT_SUFFIXES = {"PNG": (".png",), "JPEG": (".jpg", ".jpeg"), "WEBP": (".webp",)}
"""The image formats an upload may hold (Pillow's names) and the file name endings of each."""
DECODED_BYTES_PER_PIXEL = 4
"""What Pillow holds per decoded pixel at most for these formats (RGB is stored as 4 bytes, as RGBA and CMYK)."""
STORE_RESOURCE_SHARE = (
    0.001  # of the store's custom resource per store opener (ingress, fit driver): placement, not a limit
)


class FitUnavailableError(PremierError, RuntimeError):
    """The Ray Jobs API cannot be reached (no dashboard, cluster down); the request may be retried (503)."""


class UnknownJobError(PremierError, LookupError):
    """No fit job with this id (404)."""

    def __init__(self, job_id: str):
        super().__init__(f"unknown fit job {job_id!r}")
        self.job_id = job_id


class UploadTooLargeError(InvalidRequestError):
    """An upload over the configured limits (an ingress may answer 413 instead of 400)."""


class UnsupportedMediaError(InvalidRequestError):
    """An image that is not of an allowed format (PNG, JPEG, WebP): 415, naming images[i]."""


class FitConflictError(InvalidRequestError):
    """The user already has a fit job that has not ended (409: one live job per user)."""

    def __init__(self, user_id: str, job_id: str):
        super().__init__(
            "user_id",
            f"user {user_id!r} already has a fit job that has not ended ({job_id}): "
            f"wait for it (GET /v1/jobs/{job_id}) or cancel it (DELETE /v1/jobs/{job_id})",
        )
        self.user_id = user_id
        self.job_id = job_id


class FitBusyError(PremierError, RuntimeError):
    """The server holds as many fit jobs as it may (running and queued): 429 with Retry-After."""


class FitSettings(BaseModel):
    """Fitting through the server: where uploads go, how jobs are reached, upload limits, stage-2 options."""

    model_config = ConfigDict(extra="forbid")

    uploads_dir: Path | None = Field(
        None, description="where uploads and job folders live (default: STORE/fit-uploads); on the store's node"
    )
    jobs_address: str | None = Field(
        None, description="Ray dashboard URL for the Jobs API (default: the cluster this process runs in)"
    )
    # upload limits
    max_images: int = Field(64, ge=1)
    max_image_bytes: int = Field(20 * 2**20, ge=1)
    max_upload_bytes: int = Field(200 * 2**20, ge=1)
    max_image_pixels: int = Field(
        32 * 2**20,
        ge=1,
        description="width x height above which an image is refused, read from its header before it is decoded "
        "(default 32 Mi pixels: a 30-megapixel photo passes; an 8192x8192 image does not)",
    )
    max_decoded_bytes: int = Field(
        2 * 2**30,
        ge=1,
        description="the decoded size of one job's images together, counted as width x height x 4 bytes and read "
        "from their headers before anything is decoded (default 2 GiB: 40 twelve-megapixel photos)",
    )
    image_formats: list[Literal["PNG", "JPEG", "WEBP"]] = Field(
        default_factory=lambda: ["PNG", "JPEG", "WEBP"],
        min_length=1,
        description="the image formats accepted, by their content (and names ending in .png, .jpg/.jpeg, .webp); "
        "anything else (GIF, BMP, TIFF, EPS, ...) is answered 415",
    )
    decode_workers: int = Field(
        2, ge=1, description="threads per server decoding uploads (every image once before a job is submitted)"
    )
    max_caption_chars: int = Field(2000, ge=1)
    keep_uploads: bool = Field(
        False,
        description="keep a succeeded job's images under UPLOADS/kept/<job id>/images (default: a job's folder is "
        "removed when it ends, in any state)",
    )
    # job limits: per server (its uploads folder), whatever the number of ingress replicas
    max_running_jobs: int = Field(  # type: ignore[assignment]  # None only until the validator below
        None,
        ge=1,
        description="fit jobs fitting at once; more wait for a slot (queued). Default: workers x worker_max_users "
        "with runner workers (the fits the workers batch), 2 with runner jobs (each a process with the model)",
    )
    max_queued_jobs: int = Field(  # type: ignore[assignment]
        None,
        ge=0,
        description="fit jobs admitted beyond the running ones; a submission beyond that is answered 429. "
        "Default: 2 x max_running_jobs with runner workers, 8 with runner jobs (each a waiting driver process)",
    )
    job_timeout_s: float = Field(
        3 * 3600.0,
        gt=0,
        description="how long a job may fit, from when it has a slot; a job that takes longer fails (no user written)",
    )
    keep_results: int = Field(
        1000, ge=1, description="how many ended jobs' outcomes are kept (for GET /v1/jobs/{id} and the metrics)"
    )
    # stage-2 options (`premier fit-user` flags; defaults: the reference release)
    mode: Literal["coefficients", "direct"] = "coefficients"
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(2, ge=1)
    eval_every: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    early_stop: bool = Field(
        False,
        description="hold one image out and stop when its loss stops improving (default: all `steps`, the paper's)",
    )
    init: Literal["scratch", "mean"] | None = Field(
        None, description="where a direct-mode fit starts (default: scratch, the paper's; mean: the mean training user)"
    )
    resolution: int | None = Field(
        None, ge=16, description="square training resolution (default: 32 embedded, 512 FLUX)"
    )
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    optimizer: Literal["prodigy", "adamw"] | None = None
    lr: float | None = Field(None, gt=0)
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    # resident fit workers (serving/fit_workers.py, docs/onboarding.md): long-lived Ray actors that hold the frozen
    # model and fit several users in the same forward passes, instead of a Ray job (a new process) per fit
    runner: Literal["jobs", "workers"] = Field(
        "workers",
        description="workers (default): resident fit workers, the model loaded once, fits batched; jobs: a Ray job "
        "per fit (a new process with its own model load: for very large fits, or a cluster without spare memory)",
    )
    workers: int = Field(1, ge=1, description="resident fit workers (Ray actors, each with the model loaded)")
    worker_max_users: int = Field(8, ge=1, description="fits one worker runs in the same forward passes")
    worker_threads: int | None = Field(None, ge=1, description="torch threads of a worker (default: torch's)")
    worker_retries: int = Field(
        1, ge=0, description="times a fit is started again on a fresh worker when its worker dies mid-fit"
    )
    fast: bool = Field(
        True,
        description="workers fit with the onboarding preset (Stage2Config.fast: warm start, convergence stop); "
        "false: with the stage-2 options below, as a job would",
    )
    jobs_min_images: int | None = Field(
        None, ge=1, description="with runner workers, uploads of at least this many images still go to a Ray job"
    )
    # resources of the fitting task (a Ray task on any node; the job's driver itself takes none) and the job's
    # environment (no runtime_env downloads)
    num_cpus: float = Field(0, ge=0)
    num_gpus: float = Field(0, ge=0)
    memory_bytes: int | None = Field(None, ge=0)
    env_vars: dict[str, str] = Field(default_factory=dict)
    submit_retry_s: float = Field(
        10.0, ge=0, description="how long a submission waits for a starting cluster's job agent"
    )
    counts_cache_s: float = Field(
        2.0, ge=0, description="how long counts() may reuse a Jobs API listing (metrics scrapes)"
    )

    @model_validator(mode="after")
    def _job_caps(self) -> FitSettings:
        """Caps that follow the runner where not given (a resident fit is a batch slot; a job is a process)."""
        workers = self.runner == "workers"
        if self.max_running_jobs is None:
            self.max_running_jobs = self.workers * self.worker_max_users if workers else 2
        if self.max_queued_jobs is None:
            self.max_queued_jobs = 2 * self.max_running_jobs if workers else 8
        return self

    def fit_options(self) -> dict[str, Any]:
        """These options as keyword arguments of `premier.training.fit.fit_new_user` (what a fit job passes)."""
        names = (
            "mode",
            "steps",
            "batch_size",
            "eval_every",
            "patience",
            "early_stop",
            "init",
            "resolution",
            "precision",
            "seed",
            "optimizer",
            "lr",
            "device",
            "dtype",
        )
        return {n: getattr(self, n) for n in names}

    def worker_stage2(self) -> dict[str, Any]:
        """Stage2Config keyword arguments of a resident worker's fits (the onboarding preset, or the options)."""
        from premier.training.config import OptimConfig, Stage2Config

        base = {"mode": self.mode, "seed": self.seed, "precision": self.precision}
        if self.fast:
            return {**Stage2Config.fast().to_dict(), **base, "optim": Stage2Config.fast().optim}
        optim = {k: v for k, v in (("optimizer", self.optimizer), ("lr", self.lr)) if v is not None}
        return {
            **base,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "eval_every": self.eval_every,
            "patience": self.patience,
            "early_stop": self.early_stop,
            "init": self.init,
            "optim": OptimConfig(**{"weight_decay": 0.0, **optim}),
        }

    def image_limits(self) -> dict[str, Any]:
        """The image limits, as the fit job passes them to its fitting task (which checks them again)."""
        return self.model_dump(include={"max_image_pixels", "max_decoded_bytes", "image_formats"})

    def suffixes(self) -> tuple[str, ...]:
        """The file name endings of the allowed formats, sorted."""
        return tuple(sorted(x for f in self.image_formats for x in FORMAT_SUFFIXES[f]))


# "/abs/path/to/file" (not a URL's path, not a relative one): replaced by ".../file" in public messages
_PATH = re.compile(r"(?<![\w.~:/-])/(?:[^\s'\"/:,;()\[\]{}<>]+/)+([^\s'\"/:,;()\[\]{}<>]*)")
_LOG_TAIL = re.compile(r"[,;:.]?\s*last available logs.*", re.IGNORECASE | re.DOTALL)
_TRACEBACK = "Traceback (most recent call last):"


def public_reason(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A failure's reason as a client may see it: no log tail, no traceback, no server path, one line, bounded.

    Ray's message for a failed job ends with the job's log tail ("... last available logs ..."): dropped.
    A traceback is replaced by its last line (the exception). Absolute paths keep their last part only.
    """
    text = _LOG_TAIL.sub("", str(text or ""))
    if _TRACEBACK in text:
        head, _, tail = text.partition(_TRACEBACK)
        lines = [line.strip() for line in tail.splitlines() if line.strip() and not line.startswith((" ", "\t"))]
        text = head.strip() or (lines[-1] if lines else "")
    text = _PATH.sub(lambda m: ".../" + m.group(1) if m.group(1) else "...", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "FitSettings",
    "FitUnavailableError",
    "UnknownJobError",
    "UploadTooLargeError",
    "UnsupportedMediaError",
    "FitConflictError",
    "FitBusyError",
    "public_reason",
    "JOB_KIND",
    "JOB_ID",
    "STATUSES",
    "SPEC_FILE",
    "RESULT_FILE",
    "IMAGES_DIR",
    "RECORD_FILE",
    "PROGRESS_FILE",
    "OWNER_FILE",
    "CLAIM_FILE",
    "RUNNING_FILE",
    "RESULTS_DIR",
    "SLOTS_DIR",
    "KEPT_DIR",
    "TERMINAL",
    "FORMAT_SUFFIXES",
    "DECODED_BYTES_PER_PIXEL",
    "MAX_MESSAGE_CHARS",
    "MAX_NAME_BYTES",
    "STORE_RESOURCE_SHARE",
]
