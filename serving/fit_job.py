"""The fit job: `python -m serving.fit_job JOB_DIR`, submitted by `serving.fitting.FitJobManager`.

The job's driver (this module's `main`) runs on the store's node: the Ray head, where the upload
and the store are (the manager asks for the resource only that node advertises; the driver takes
no CPU or GPU). It reads the user folder JOB_DIR/images (images + captions.jsonl) and sends the
images as bytes, with their captions, to a Ray task that may run on any node, with the fitting
resources of the settings (`num_gpus` 0 on a CPU cluster): the task fits stage 2 with
`premier.training.fit.fit_new_user` (the library call behind `premier fit-user`: the same checks and
errors) and returns the record, or the exit code and the reason of an error. The driver then
writes the record to JOB_DIR and puts it into the store in one SQLite transaction, so a user is
either fully there or absent: a job that fails or is stopped at any point before the commit leaves
no trace in the store (stopping the driver ends its task; a refit leaves the old record).
How it ended goes to JOB_DIR/result.json, which the manager reads for the reason of a failure
and the summary of a success; the exit code is `premier`'s (premier.commands.exit_code: 2 bad
input, 3 model or checkpoint, 4 fitting stopped; 1 anything else). The images are deleted when
the job ends unless the settings keep uploads (a killed job leaves them; the folder names the job).
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from premier.errors import PremierError, exit_code
from premier.files import atomic_write_bytes
from premier.training.dataset import read_user_folder
from serving.fit_settings import IMAGES_DIR, RECORD_FILE, RESULT_FILE, SPEC_FILE

EXIT_FAILED = 1


class _JobFailed(Exception):
    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason = reason
        self.code = code


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
) -> dict[str, Any]:
    """Stage 2 on images given as (file name, bytes) with their captions: the fitting task, on any node.

    `options`: keyword arguments of `fit_new_user` (the settings' stage-2 options). Returns
    {"code": 0, "error": "", "record": the UserRecord} or, for an error `premier` reports with an exit
    code, {"code", "error": its one-line reason}; any other error propagates (the job fails with code 1).
    """
    from premier.training.fit import fit_new_user  # torch and diffusers load in the task, not in the driver

    try:
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


def _print_skipped(file: str, reason: str) -> None:
    print(f"skipped {file}: {reason}", file=sys.stderr)


def _fit_remotely(spec: dict[str, Any], images: list[tuple[str, bytes]], captions: list[str]) -> dict[str, Any]:
    """`fit_user` as a Ray task with the settings' resources; the driver waits for it (stopping the job ends it)."""
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
        spec["user_id"], images, captions, spec.get("model"), spec.get("checkpoint"), spec.get("fit_options") or {}
    )
    return ray.get(ref)


def run(job_dir: Path) -> dict[str, Any]:
    """Fit (in a Ray task) and store (here); returns the stored record's summary. Raises _JobFailed with the reason."""
    from premier.served import load_served_basis
    from premier.user_record import UserRecord
    from store.user_store import UserStore

    spec = json.loads((job_dir / SPEC_FILE).read_text())
    user_id, record_path = spec["user_id"], job_dir / RECORD_FILE
    try:
        examples = read_user_folder(job_dir / IMAGES_DIR, user_id=user_id)  # checked at upload: this is a formality
    except PremierError as e:
        raise _JobFailed(str(e), exit_code(e) or EXIT_FAILED) from None
    outcome = _fit_remotely(spec, [(e.file, e.path.read_bytes()) for e in examples], [e.prompt for e in examples])
    code = outcome["code"]
    if code != 0:
        raise _JobFailed(outcome.get("error") or f"premier fit-user exited with code {code}", code)
    record: UserRecord = outcome["record"]
    record.save(record_path)
    if record.user_id != user_id:
        raise _JobFailed(f"the fitted record is for {record.user_id!r}, not {user_id!r}", EXIT_FAILED)
    basis, checkpoint_id = load_served_basis(spec.get("checkpoint"))  # the user basis only: no adapters on the head
    with UserStore(spec["store"], basis, checkpoint_id) as store:
        stored = store.put(record)
    return record_summary(stored)


def _write_result(job_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_bytes(job_dir / RESULT_FILE, (json.dumps(result, indent=1) + "\n").encode())


def _tidy(job_dir: Path) -> None:
    """Drop the images and the record file (the store holds the user now) unless the spec keeps uploads."""
    try:
        if json.loads((job_dir / SPEC_FILE).read_text()).get("keep_uploads"):
            return
    except (OSError, ValueError):
        return
    shutil.rmtree(job_dir / IMAGES_DIR, ignore_errors=True)
    (job_dir / RECORD_FILE).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or not (Path(argv[0]) / SPEC_FILE).is_file():
        print(f"usage: python -m serving.fit_job JOB_DIR (a folder holding {SPEC_FILE})", file=sys.stderr)
        return 2
    job_dir = Path(argv[0])
    try:
        return _run_and_report(job_dir)
    finally:
        _tidy(job_dir)


def _run_and_report(job_dir: Path) -> int:
    try:
        summary = run(job_dir)
    except _JobFailed as e:
        _write_result(job_dir, {"status": "FAILED", "reason": e.reason})
        print(f"fit job failed: {e.reason}", file=sys.stderr)
        return e.code
    except Exception as e:  # the store or an unexpected error: still say why
        traceback.print_exc()
        reason = f"{type(e).__name__}: {e}"
        _write_result(job_dir, {"status": "FAILED", "reason": reason})
        return EXIT_FAILED
    _write_result(job_dir, {"status": "SUCCEEDED", "user": summary})
    print(f"stored user {summary['user_id']!r} ({summary['mode']}, {summary['steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
