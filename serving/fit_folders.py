"""The uploads folder of a server's fit jobs: admission, live job folders, results, reaping and the sweep.

UPLOADS/fit-<hex>/ is a live job: made at admission with `claim.json` (its user), filled with the
upload (`images/`, then `job.json`), marked `running.json` by the job once it holds a fitting slot,
and removed when the job ends, in any state. UPLOADS/results/<job id>.json is how a job ended (the
newest `keep_results` are kept). Admission is exclusive across threads and processes (every
ingress replica of a server shares the folder): a file lock on the folder itself, or on a lock file
in it where the file system cannot lock a folder (NFS).

`info_of(job_id)` is the manager's question to the Ray Jobs API (its details, None if it does not
know the job); with it, `live` reconciles: an ended job's folder is reaped (its result recorded if
its driver could not, e.g. killed), and a folder the Jobs API does not know is removed once older
than RESERVATION_GRACE_S (a submission that never happened: its replica died).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from premier.files import atomic_write_bytes
from serving.fit_settings import (
    CLAIM_FILE,
    JOB_ID,
    RESULT_FILE,
    RESULTS_DIR,
    RUNNING_FILE,
    SPEC_FILE,
    TERMINAL,
    FitBusyError,
    FitConflictError,
    FitUnavailableError,
    public_reason,
)

log = logging.getLogger("ray.serve")

RESERVATION_GRACE_S = 300.0
"""A job folder the Jobs API does not know is a submission in progress for this long, then a leftover."""

InfoOf = Callable[[str], Any]


@dataclass(frozen=True)
class LiveJob:
    job_id: str
    user_id: str | None
    running: bool


class UploadsFolder:
    def __init__(self, path: Path, keep_results: int):
        self.path = path
        self.keep_results = keep_results
        self._lock = threading.Lock()
        self._results: dict[str, tuple[int, str]] = {}  # job id -> (mtime_ns, status) of the kept results

    # ------------------------------------------------------------------ admission
    def admit(self, job_id: str, user_id: str, info_of: InfoOf, max_running: int, max_queued: int) -> Path:
        """The job's folder, made once the job is admitted: FitConflictError if the user has a live job,
        FitBusyError if the server holds max_running + max_queued live jobs."""
        with self._admission():
            live = self.live(info_of)
            for job in live:
                if job.user_id == user_id:
                    raise FitConflictError(user_id, job.job_id)
            if len(live) >= max_running + max_queued:
                running = sum(j.running for j in live)
                raise FitBusyError(
                    f"the server is busy fitting: {running} fit job(s) running and {len(live) - running} queued, "
                    f"its most ({max_running} running, {max_queued} queued); retry later"
                )
            job_dir = self.path / job_id
            try:
                job_dir.mkdir()
                claim = {"job_id": job_id, "user_id": user_id, "created_at": time.time()}
                atomic_write_bytes(job_dir / CLAIM_FILE, json.dumps(claim).encode())
            except OSError as e:
                shutil.rmtree(job_dir, ignore_errors=True)
                raise self._unavailable(e) from None
            return job_dir

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        with self._lock:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = self._locked_fd()
            except OSError as e:
                raise self._unavailable(e) from None
            try:
                yield
            finally:
                os.close(fd)  # releases the lock

    def _locked_fd(self) -> int:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EBADF, errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP):
                raise
        fd = os.open(self.path / ".admission.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _unavailable(self, e: OSError) -> FitUnavailableError:
        log.warning("cannot store fit uploads in %s: %s", self.path, e)
        return FitUnavailableError(f"cannot store uploads: {e.strerror or type(e).__name__}")

    # ------------------------------------------------------------------ live jobs and their ends
    def job_dirs(self) -> list[Path]:
        try:
            return [p for p in self.path.iterdir() if JOB_ID.fullmatch(p.name) and p.is_dir()]
        except FileNotFoundError:
            return []

    def live(self, info_of: InfoOf | None = None) -> list[LiveJob]:
        """The jobs that have not ended, by their folders; with `info_of`, reconciled with the Jobs API first."""
        live = []
        for job_dir in self.job_dirs():
            job_id = job_dir.name
            claim = read_json(job_dir / CLAIM_FILE) or read_json(job_dir / SPEC_FILE)
            if self.result_path(job_id).exists():  # ended: its driver is tidying up, or it was cancelled
                if info_of is not None:
                    info = info_of(job_id)
                    if info is None or str(info.status.value) in TERMINAL:
                        shutil.rmtree(job_dir, ignore_errors=True)
                continue
            if info_of is not None:
                info = info_of(job_id)
                if info is None:
                    if time.time() - (claim.get("created_at") or mtime(job_dir)) > RESERVATION_GRACE_S:
                        log.info("fit uploads: removing %s, a job the Jobs API does not know", job_id)
                        shutil.rmtree(job_dir, ignore_errors=True)
                        continue
                elif str(info.status.value) in TERMINAL:
                    self.reap(job_id, info)
                    continue
            live.append(LiveJob(job_id, claim.get("user_id"), (job_dir / RUNNING_FILE).exists()))
        return live

    def reap(self, job_id: str, info: Any) -> None:
        """A job that ended but left its folder (its driver was killed, or never ran): record how, remove the folder."""
        job_dir = self.path / job_id
        if not self.result_path(job_id).exists():
            status = str(info.status.value)
            legacy = read_json(job_dir / RESULT_FILE)  # a folder of the layout before results/
            if legacy.get("status") in TERMINAL:
                result = legacy
            elif status == "FAILED":
                message = info.message or "the job failed without a message"
                result = {"status": status, "reason": public_reason(message), "detail": message}
            elif status == "SUCCEEDED":  # its driver ended well but recorded nothing: say so rather than guess
                result = {"status": "FAILED", "reason": "the job ended without recording its result"}
            else:
                result = {"status": "STOPPED", "reason": ""}
            self.write_result(job_id, {"job_id": job_id, "user_id": (info.metadata or {}).get("user_id"), **result})
        shutil.rmtree(job_dir, ignore_errors=True)

    def cancelled(self, job_id: str, user_id: str, reason: str) -> None:
        """Record a job as STOPPED and remove its folder (a job Ray cannot stop: it never started)."""
        if not self.result_path(job_id).exists():
            self.write_result(job_id, {"job_id": job_id, "user_id": user_id, "status": "STOPPED", "reason": reason})
        shutil.rmtree(self.path / job_id, ignore_errors=True)

    # ------------------------------------------------------------------ results
    def result_path(self, job_id: str) -> Path:
        return self.path / RESULTS_DIR / f"{job_id}.json"

    def write_result(self, job_id: str, result: dict[str, Any]) -> None:
        result.setdefault("finished_at", time.time())
        try:
            atomic_write_bytes(self.result_path(job_id), (json.dumps(result, indent=1) + "\n").encode())
        except OSError as e:
            log.warning("fit job %s: cannot record its result: %s", job_id, e)

    def result(self, job_id: str) -> dict[str, Any]:
        return read_json(self.result_path(job_id))

    def prune_results(self) -> None:
        """Keep the newest keep_results results."""
        try:
            entries = [(p.stat().st_mtime_ns, p) for p in (self.path / RESULTS_DIR).iterdir() if p.suffix == ".json"]
        except FileNotFoundError:
            return
        excess = len(entries) - self.keep_results
        if excess > 0:
            for _, path in sorted(entries)[:excess]:
                path.unlink(missing_ok=True)

    def ended(self) -> dict[str, str]:
        """Job id -> status of the kept results (at most keep_results files, each read once)."""
        try:
            entries = [p for p in (self.path / RESULTS_DIR).iterdir() if JOB_ID.fullmatch(p.stem)]
        except FileNotFoundError:
            entries = []
        known = {}
        for path in entries:
            stamp = mtime_ns(path)
            cached = self._results.get(path.stem)
            if cached is None or cached[0] != stamp:
                cached = (stamp, str(read_json(path).get("status", "")))
            known[path.stem] = cached
        self._results = known
        return {job_id: status for job_id, (_, status) in known.items() if status in TERMINAL}

    def sweep_temporary(self) -> None:
        """Half-written uploads of the layout before reservations (.fit-<hex>.<random>/), once past the grace."""
        for tmp in self.path.glob(".fit-*"):
            if tmp.is_dir() and time.time() - mtime(tmp) > RESERVATION_GRACE_S:
                shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def mtime_ns(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


__all__ = ["UploadsFolder", "LiveJob", "RESERVATION_GRACE_S", "read_json"]
