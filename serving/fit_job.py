"""The fit job: `python -m serving.fit_job JOB_DIR`, submitted by `serving.fitting.FitJobManager`.

The job's driver (this module's `main`) runs on the store's node: the Ray head, where the upload
and the store are (the manager asks for the resource only that node advertises; the driver takes
no CPU or GPU). It waits for one of the server's `max_running_jobs` fitting slots (lock files in
UPLOADS/slots: the kernel releases a killed driver's slot), marks its folder running, reads the
user folder JOB_DIR/images (images + captions.jsonl) and sends the images as bytes, with their
captions, to a Ray task that may run on any node, with the fitting resources of the settings
(`num_gpus` 0 on a CPU cluster): the task checks the image limits again (formats, pixels before
decoding: `Image.MAX_IMAGE_PIXELS` is the settings' there) and fits stage 2 with
`premier.training.fit.fit_new_user` (the library call behind `premier fit-user`: the same checks and
errors), and returns the record, or the exit code and the reason of an error. The fit has
`job_timeout_s` from when the slot is held; past it the task is cancelled and the job fails. The
driver then writes the record to JOB_DIR and puts it into the store in one SQLite transaction, so a
user is either fully there or absent: a job that fails, times out or is stopped at any point before
the commit leaves no trace in the store (a stop during the commit waits for it: the user is then
written and the job recorded SUCCEEDED; a refit leaves the old record).

How it ended goes to UPLOADS/results/<job id>.json (the reason as a client may see it, without
paths or tracebacks, and the details for the server log), which the manager reads; the exit code is
`premier`'s (premier.commands.exit_code: 2 bad input, 3 model or checkpoint, 4 fitting stopped or
timed out; 1 anything else). Then the job's folder is removed, in every state (SIGTERM, which is how
Ray stops a job, included); with `keep_uploads` a succeeded job's images move to
UPLOADS/kept/<job id>/. A killed driver (SIGKILL) leaves its folder to the manager, which reaps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from premier.errors import EXIT_STOPPED, PremierError, exit_code
from premier.files import atomic_write_bytes
from premier.training.dataset import read_user_folder
from serving.fit_settings import (
    CLAIM_FILE,
    IMAGES_DIR,
    KEPT_DIR,
    RECORD_FILE,
    RESULTS_DIR,
    RUNNING_FILE,
    SLOTS_DIR,
    SPEC_FILE,
    public_reason,
)

EXIT_FAILED = 1
SLOT_POLL_S = 0.5


class _JobFailed(Exception):
    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason = reason
        self.code = code


class _Stopped(BaseException):
    """SIGTERM (Ray stopping the job): not an Exception, so that no handler on the way swallows it."""


class _StopSignal:
    """SIGTERM raises _Stopped, except while the store commits (the stop then waits for the commit)."""

    def __init__(self) -> None:
        self.committing = False
        self.requested = False

    def install(self) -> None:
        self.committing = self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            return  # once is enough: the job is already on its way out
        self.requested = True
        if not self.committing:
            raise _Stopped()

    @contextlib.contextmanager
    def commit(self) -> Iterator[None]:
        self.committing = True
        try:
            yield
        finally:
            self.committing = False


_STOP = _StopSignal()


def record_summary(record: Any) -> dict[str, Any]:
    fit = record.fit
    keys = ("images", "train_images", "steps", "stopped_early", "final_loss", "held_out_loss", "seconds")
    return {
        "user_id": record.user_id,
        "mode": record.mode,
        "checkpoint_id": record.checkpoint_id,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        **{k: fit.get(k) for k in keys},
    }


def fit_user(
    user_id: str,
    images: list[tuple[str, bytes]],
    captions: list[str],
    model: str | None,
    checkpoint: str | None,
    options: dict[str, Any],
    limits: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stage 2 on images given as (file name, bytes) with their captions: the fitting task, on any node.

    `options`: keyword arguments of `fit_new_user` (the settings' stage-2 options). `limits`: the
    settings' image limits (`FitSettings.image_limits`), checked again here before anything is decoded,
    and Pillow's own decompression-bomb limit set to them in this process. Returns
    {"code": 0, "error": "", "record": the UserRecord} or, for an error `premier` reports with an exit
    code, {"code", "error": its one-line reason}; any other error propagates (the job fails with code 1).
    """
    from premier.training.fit import fit_new_user  # torch and diffusers load in the task, not in the driver

    try:
        if limits is not None:
            _check_limits(images, limits)
        record = fit_new_user(
            user_id,
            images,
            captions,
            model=model,
            checkpoint=checkpoint,
            progress=False,
            on_skip=_print_skipped,
            **options,
        )
    except PremierError as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"premier fit-user: error: {e}", file=sys.stderr)  # in the job's log, as the command says it
        return {"code": code, "error": str(e)}
    return {"code": 0, "error": "", "record": record}


def _check_limits(images: list[tuple[str, bytes]], limits: dict[str, Any]) -> None:
    """The upload's image limits, again, in the process that decodes: formats and pixels from the headers, and
    Pillow's bomb limit (a warning that `load_image` turns into a refusal) at the settings' pixel limit."""
    from PIL import Image

    from serving.fit_settings import FitSettings
    from serving.fit_uploads import check_images

    settings = FitSettings(**limits)
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # this worker is the job's own
    check_images(settings, images)


def _print_skipped(file: str, reason: str) -> None:
    print(f"skipped {file}: {reason}", file=sys.stderr)


def _fit_remotely(
    spec: dict[str, Any], images: list[tuple[str, bytes]], captions: list[str], deadline: float | None = None
) -> dict[str, Any]:
    """`fit_user` as a Ray task with the settings' resources; the driver waits for it until `deadline` (monotonic
    seconds; past it the task is cancelled and the job fails). Stopping the job ends it too."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)  # the job's cluster (RAY_ADDRESS is set for a job's driver)
    task = spec.get("task") or {}
    options: dict[str, Any] = {
        "num_cpus": task.get("num_cpus", 0),
        "num_gpus": task.get("num_gpus", 0),
        "max_retries": 0,
    }
    if task.get("memory"):
        options["memory"] = task["memory"]
    from serving.fit_job import (
        fit_user as task_fn,  # by its module name (this file runs as __main__): pickled by reference
    )

    remote = ray.remote(task_fn).options(**options)
    ref = remote.remote(
        spec["user_id"],
        images,
        captions,
        spec.get("model"),
        spec.get("checkpoint"),
        spec.get("fit_options") or {},
        spec.get("limits"),
    )
    try:
        while True:  # short waits: a stop (SIGTERM) is handled between them
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                timeout = spec.get("timeout_s")
                raise _JobFailed(
                    f"timed out: the fit did not finish within the job timeout ({timeout:g} s)", EXIT_STOPPED
                )
            ready, _ = ray.wait([ref], timeout=1.0 if left is None else min(1.0, left))
            if ready:
                return ray.get(ref)
    except BaseException:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)  # the fitting task goes with the job
        raise


def run(job_dir: Path, deadline: float | None = None) -> dict[str, Any]:
    """Fit (in a Ray task, until `deadline`) and store (here); returns the stored record's summary.

    Raises _JobFailed with the reason."""
    from premier.served import load_served_basis
    from premier.user_record import UserRecord
    from store.user_store import UserStore

    spec = json.loads((job_dir / SPEC_FILE).read_text())
    user_id, record_path = spec["user_id"], job_dir / RECORD_FILE
    try:
        examples = read_user_folder(job_dir / IMAGES_DIR, user_id=user_id)  # checked at upload: this is a formality
    except PremierError as e:
        raise _JobFailed(str(e), exit_code(e) or EXIT_FAILED) from None
    outcome = _fit_remotely(
        spec, [(e.file, e.path.read_bytes()) for e in examples], [e.prompt for e in examples], deadline
    )
    code = outcome["code"]
    if code != 0:
        raise _JobFailed(outcome.get("error") or f"premier fit-user exited with code {code}", code)
    record: UserRecord = outcome["record"]
    record.save(record_path)
    if record.user_id != user_id:
        raise _JobFailed(f"the fitted record is for {record.user_id!r}, not {user_id!r}", EXIT_FAILED)
    basis, checkpoint_id = load_served_basis(spec.get("checkpoint"))  # the user basis only: no adapters on the head
    with _STOP.commit(), UserStore(spec["store"], basis, checkpoint_id) as store:
        stored = store.put(record)
    return record_summary(stored)


@contextlib.contextmanager
def _slot(job_dir: Path, spec: dict[str, Any]) -> Iterator[int]:
    """One of the server's `max_running` fitting slots (an flock'ed file: released when this process ends, however
    it ends); waits for one, then marks the folder running. A folder removed meanwhile (cancelled) stops the job."""
    slots = job_dir.parent / SLOTS_DIR
    slots.mkdir(exist_ok=True)
    count = max(1, int(spec.get("max_running") or 1))
    fd = slot = None
    while fd is None:
        if not (job_dir / SPEC_FILE).exists():
            raise _Stopped()
        for k in range(count):
            candidate = os.open(slots / f"slot-{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(candidate, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(candidate)
                continue
            fd, slot = candidate, k
            break
        else:
            time.sleep(SLOT_POLL_S)
    try:
        marker = {"slot": slot, "pid": os.getpid(), "started_at": time.time()}
        atomic_write_bytes(job_dir / RUNNING_FILE, json.dumps(marker).encode())
        yield slot
    finally:
        os.close(fd)


def _write_result(job_dir: Path, result: dict[str, Any]) -> None:
    """UPLOADS/results/<job id>.json, beside the job folders (it outlives the job's folder)."""
    result = {"job_id": job_dir.name, "finished_at": time.time(), **result}
    path = job_dir.parent / RESULTS_DIR / f"{job_dir.name}.json"
    atomic_write_bytes(path, (json.dumps(result, indent=1) + "\n").encode())


def _tidy(job_dir: Path, succeeded: bool) -> None:
    """Remove the job's folder; with keep_uploads, a succeeded job's images (and job.json) move to UPLOADS/kept."""
    try:
        keep = succeeded and json.loads((job_dir / SPEC_FILE).read_text()).get("keep_uploads")
    except (OSError, ValueError):
        keep = False
    if keep:
        kept = job_dir.parent / KEPT_DIR / job_dir.name
        try:
            kept.mkdir(parents=True, exist_ok=True)
            for name in (IMAGES_DIR, SPEC_FILE):
                os.replace(job_dir / name, kept / name)
        except OSError as e:
            print(f"could not keep the uploads in {kept}: {e}", file=sys.stderr)
    shutil.rmtree(job_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / SPEC_FILE).is_file():
        print(f"usage: python -m serving.fit_job JOB_DIR (a folder holding {SPEC_FILE})", file=sys.stderr)
        return 2
    job_dir = Path(argv[0]).resolve()
    _STOP.install()
    code, result = EXIT_FAILED, {"status": "FAILED", "reason": "the job ended without a result"}
    try:
        code, result = _run_and_report(job_dir)
    except (_Stopped, KeyboardInterrupt):
        print("fit job stopped", file=sys.stderr)
        code, result = EXIT_FAILED, {"status": "STOPPED", "reason": ""}
    finally:
        _STOP.committing = True  # recording the end: a stop now waits for it (Ray's SIGKILL comes 3 s later anyway)
        try:
            spec = json.loads((job_dir / SPEC_FILE).read_text())
            result.setdefault("user_id", spec.get("user_id"))
            admitted = json.loads((job_dir / CLAIM_FILE).read_text()).get("created_at")
            result.update(runner="jobs", **({"seconds": time.time() - admitted} if admitted else {}))
        except (OSError, ValueError):
            pass
        try:
            _write_result(job_dir, result)
        except OSError as e:
            print(f"could not record the result: {e}", file=sys.stderr)
        _tidy(job_dir, result.get("status") == "SUCCEEDED")
    return code


def _run_and_report(job_dir: Path) -> tuple[int, dict[str, Any]]:
    """(exit code, result); the result's `reason` is fit for a client, its `detail` for the server log."""
    spec = json.loads((job_dir / SPEC_FILE).read_text())
    try:
        with _slot(job_dir, spec):
            timeout = spec.get("timeout_s")
            summary = run(job_dir, time.monotonic() + timeout if timeout else None)
    except _JobFailed as e:
        print(f"fit job failed: {e.reason}", file=sys.stderr)
        return e.code, {"status": "FAILED", "reason": public_reason(e.reason), "detail": e.reason}
    except Exception as e:  # the store or an unexpected error: still say why
        detail = traceback.format_exc()
        print(detail, file=sys.stderr)
        return EXIT_FAILED, {"status": "FAILED", "reason": public_reason(f"{type(e).__name__}: {e}"), "detail": detail}
    print(f"stored user {summary['user_id']!r} ({summary['mode']}, {summary['steps']} steps)")
    return 0, {"status": "SUCCEEDED", "user": summary}


if __name__ == "__main__":
    sys.exit(main())
