"""What fitting through the server is configured by (`FitSettings`), its errors and the job folder's file names.

Shared by the job manager (serving/fitting.py), the upload checks (serving/fit_uploads.py), the job
itself (serving/fit_job.py) and the serve config.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from premier.errors import InvalidRequestError, PremierError

JOB_KIND = "premier-fit"
JOB_ID = re.compile(r"fit-[0-9a-f]{16}")
STATUSES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")
SPEC_FILE = "job.json"  # what the job does (written by submit)
RESULT_FILE = "result.json"  # how it ended (written by the job)
IMAGES_DIR = "images"  # the user folder: images + captions.jsonl
RECORD_FILE = "record.safetensors"
MAX_MESSAGE_CHARS = 4000
MAX_NAME_BYTES = 200
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
        64 * 2**20, ge=1, description="decoded width x height above which an image is refused"
    )
    max_caption_chars: int = Field(2000, ge=1)
    keep_uploads: bool = Field(
        False, description="keep a finished job's images (default: only job.json and result.json stay)"
    )
    # stage-2 options (`premier fit-user` flags; defaults: the reference release)
    mode: Literal["coefficients", "direct"] = "coefficients"
    steps: int = Field(5000, ge=1)
    batch_size: int = Field(2, ge=1)
    eval_every: int = Field(50, ge=1)
    patience: int = Field(10, ge=1)
    resolution: int | None = Field(
        None, ge=16, description="square training resolution (default: 32 embedded, 512 FLUX)"
    )
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
    submit_retry_s: float = Field(
        10.0, ge=0, description="how long a submission waits for a starting cluster's job agent"
    )
    counts_cache_s: float = Field(
        2.0, ge=0, description="how long counts() may reuse a Jobs API listing (metrics scrapes)"
    )

    def fit_options(self) -> dict[str, Any]:
        """These options as keyword arguments of `premier.training.fit.fit_new_user` (what a fit job passes)."""
        names = (
            "mode",
            "steps",
            "batch_size",
            "eval_every",
            "patience",
            "resolution",
            "precision",
            "seed",
            "optimizer",
            "lr",
            "device",
            "dtype",
        )
        return {n: getattr(self, n) for n in names}


__all__ = [
    "FitSettings",
    "FitUnavailableError",
    "UnknownJobError",
    "UploadTooLargeError",
    "JOB_KIND",
    "JOB_ID",
    "STATUSES",
    "SPEC_FILE",
    "RESULT_FILE",
    "IMAGES_DIR",
    "RECORD_FILE",
    "MAX_MESSAGE_CHARS",
    "MAX_NAME_BYTES",
    "STORE_RESOURCE_SHARE",
]
