"""The fit job: `python -m serving.fit_job JOB_DIR`, submitted by `serving.fitting.FitJobManager`.

The job's driver (this module's `main`) runs on the store's node: the Ray head, where the upload
and the store are (the manager asks for the resource only that node advertises; the driver takes
no CPU or GPU). It sends the images of JOB_DIR/images as bytes to a Ray task that may run on any
node, with the fitting resources of the settings (`num_gpus` 0 on a CPU cluster): the task runs
`premier fit-user` on them (the same command, checks and exit codes as on the command line) in a
temporary folder and returns the record's bytes and `premier`'s exit code and error. The driver
then writes the record to JOB_DIR and puts it into the store in one SQLite transaction, so a user
is either fully there or absent: a job that fails or is stopped at any point before the commit
leaves no trace in the store (stopping the driver ends its task; a refit leaves the old record).
How it ended goes to JOB_DIR/result.json, which the manager reads for the reason of a failure
and the summary of a success; the exit code is `premier`'s (2 bad input, 3 model or checkpoint,
4 fitting stopped, 1 anything else). The images are deleted when the job ends unless the
settings keep uploads (a killed job leaves them; the folder names the job).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any

from premier.files import atomic_write_bytes
from serving.fitting import IMAGES_DIR, RECORD_FILE, RESULT_FILE, SPEC_FILE

EXIT_FAILED = 1
_ERROR_PREFIX = "premier fit-user: error: "


class _Tee(io.TextIOBase):
    """stderr that is also kept, so the reason `premier fit-user` prints ends up in result.json."""

    def __init__(self, stream: Any):
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, s: str) -> int:
        self.stream.write(s)
        self.kept.write(s)
        return len(s)

    def flush(self) -> None:
        self.stream.flush()


class _JobFailed(Exception):
    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason = reason
        self.code = code


def record_summary(record: Any) -> dict[str, Any]:
    fit = record.fit
    keys = ("images", "train_images", "steps", "stopped_early", "final_loss", "held_out_loss", "seconds")
    return {"user_id": record.user_id, "mode": record.mode, "checkpoint_id": record.checkpoint_id,
            "created_at": record.created_at, "updated_at": record.updated_at, **{k: fit.get(k) for k in keys}}  # fmt: skip


def fit_user(user_id: str, files: dict[str, bytes], model: str | None, checkpoint: str | None,
             fit_args: list[str]) -> dict[str, Any]:
    """`premier fit-user` on images given as bytes (a folder's files by name, captions.jsonl included).

    Runs in the fitting task, on any node; returns {"code", "error" (its last error line or ''),
    "record" (the record file's bytes, on success)}.
    """
    import tempfile

    from premier.cli import main as premier_main

    with tempfile.TemporaryDirectory(prefix="premier-fit-") as tmp:
        images = Path(tmp) / IMAGES_DIR
        images.mkdir()
        for name, data in files.items():
            if Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"not a plain file name: {name!r}")
            (images / name).write_bytes(data)
        record_path = Path(tmp) / RECORD_FILE
        argv = ["fit-user", "--images", str(images), "--user-id", user_id, "-o", str(record_path), "--no-progress"]
        if model:
            argv += ["--model", model]
        if checkpoint:
            argv += ["--checkpoint", checkpoint]
        argv += fit_args
        tee = _Tee(sys.stderr)
        with contextlib.redirect_stderr(tee):
            try:
                code = premier_main(argv)
            except SystemExit as e:  # argparse refusing an option
                code = e.code if isinstance(e.code, int) else 2
        said = [line[len(_ERROR_PREFIX):] for line in tee.kept.getvalue().splitlines() if line.startswith(_ERROR_PREFIX)]
        out: dict[str, Any] = {"code": code, "error": said[-1] if said else ""}
        if code == 0:
            out["record"] = record_path.read_bytes()
        return out


def _fit_remotely(spec: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """`fit_user` as a Ray task with the settings' resources; the driver waits for it (stopping the job ends it)."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)  # the job's cluster (RAY_ADDRESS is set for a job's driver)
    task = spec.get("task") or {}
    options: dict[str, Any] = {"num_cpus": task.get("num_cpus", 0), "num_gpus": task.get("num_gpus", 0), "max_retries": 0}
    if task.get("memory"):
        options["memory"] = task["memory"]
    from serving.fit_job import fit_user as task_fn  # by its module name (this file runs as __main__): pickled by reference

    remote = ray.remote(task_fn).options(**options)
    ref = remote.remote(spec["user_id"], files, spec.get("model"), spec.get("checkpoint"), spec.get("fit_args", []))
    return ray.get(ref)


def run(job_dir: Path) -> dict[str, Any]:
    """Fit (in a Ray task) and store (here); returns the stored record's summary. Raises _JobFailed with the reason."""
    from premier.user_record import UserRecord
    from serving.users import load_basis
    from store.user_store import UserStore

    spec = json.loads((job_dir / SPEC_FILE).read_text())
    user_id, record_path = spec["user_id"], job_dir / RECORD_FILE
    files = {p.name: p.read_bytes() for p in sorted((job_dir / IMAGES_DIR).iterdir()) if p.is_file()}
    outcome = _fit_remotely(spec, files)
    code = outcome["code"]
    if code != 0:
        raise _JobFailed(outcome.get("error") or f"premier fit-user exited with code {code}", code)
    atomic_write_bytes(record_path, outcome["record"])
    record = UserRecord.load(record_path)
    if record.user_id != user_id:
        raise _JobFailed(f"the fitted record is for {record.user_id!r}, not {user_id!r}", EXIT_FAILED)
    basis, checkpoint_id = load_basis(spec.get("checkpoint"))  # the user basis only: no adapters on the head
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
