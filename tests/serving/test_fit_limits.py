"""Limits before work on fit uploads and jobs, without a cluster: formats, pixels before decoding, decoded bytes,
admission (one live job per user, at most running + queued per server), reaping, the sweep, bounded counts,
cancel, public messages and the job driver's end in every state. A fake Jobs API stands in for Ray's.

The same behaviours through the HTTP API and a real Ray (429 + Retry-After, DELETE, the timeout) are in
test_serving_fit.py.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import zlib
from types import SimpleNamespace

import pytest
from PIL import Image, ImageFile

from premier.errors import InvalidRequestError
from serving import fit_job
from serving.fit_folders import RESERVATION_GRACE_S
from serving.fit_settings import public_reason
from serving.fit_uploads import check_upload
from serving.fitting import (
    FitBusyError,
    FitConflictError,
    FitJobManager,
    FitSettings,
    UnsupportedMediaError,
    UploadTooLargeError,
)

STORE = "premier-fit-limits-store"


# ---------------------------------------------------------------------- images
def image_bytes(fmt: str, size=(16, 16), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (200, 40, 40) if mode == "RGB" else 0).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(width: int, height: int, idat: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def flat_png(width: int, height: int) -> bytes:
    """A flat (all-black) RGB PNG, compressed row by row: 8192x8192 is ~200 KB that decodes to 256 MiB."""
    z, row, parts = zlib.compressobj(9), b"\x00" * (1 + 3 * width), []
    for _ in range(height):
        parts.append(z.compress(row))
    parts.append(z.flush())
    return png(width, height, b"".join(parts))


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
    b"/Helvetica findfont 12 scalefont setfont 0 0 moveto (x) show showpage\n%%EOF\n"
)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = flat_png(8192, 8192)
    assert 150_000 < len(data) < 300_000
    return data


@pytest.fixture()
def no_decoding(monkeypatch):
    """Any attempt to decode pixels fails the test: the refusals below happen from headers only."""

    def refuse(*a, **k):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image, "_getdecoder", refuse)


OTHER_FORMATS = [
    ("eps", EPS, "PostScript/EPS"),
    ("eps-binary", b"\xc5\xd0\xd3\xc6" + bytes(40), "EPS"),
    ("gif", None, "GIF"),
    ("bmp", None, "BMP"),
    ("tiff", None, "TIFF"),
]


@pytest.mark.parametrize("name,data,what", OTHER_FORMATS, ids=[c[0] for c in OTHER_FORMATS])
def test_other_formats_are_415_by_their_content(no_decoding, name, data, what):
    data = data if data is not None else image_bytes(name.upper())
    with pytest.raises(UnsupportedMediaError) as e:  # named .png: refused by what it holds, not by its name
        check_upload(FitSettings(), [("ok.png", image_bytes("PNG")), ("x.png", data)], ["a", "b"])
    assert e.value.field == "images[1]" and what in str(e.value) and "PNG, JPEG, WebP only" in str(e.value)


@pytest.mark.parametrize("name", ["x.gif", "x.bmp", "x.eps", "x.tiff", "x.exe"])
def test_other_formats_are_415_by_their_name(no_decoding, name):
    with pytest.raises(UnsupportedMediaError, match="must end in one of .jpeg, .jpg, .png, .webp") as e:
        check_upload(FitSettings(), [(name, image_bytes("PNG"))], ["a"])
    assert e.value.field == "images[0]"


def test_allowed_formats_pass_without_decoding(no_decoding):
    files = [("a.png", image_bytes("PNG")), ("b.jpg", image_bytes("JPEG")), ("c.webp", image_bytes("WEBP"))]
    check_upload(FitSettings(), files, ["a", "b", "c"])
    with pytest.raises(UnsupportedMediaError, match="JPEG data"):  # the allowlist is configurable
        check_upload(FitSettings(image_formats=["PNG"]), [("b.png", image_bytes("JPEG"))], ["b"])


def test_garbage_is_refused_and_named(no_decoding):
    with pytest.raises(UnsupportedMediaError, match="not a readable image") as e:
        check_upload(FitSettings(), [("a.png", b"not an image at all")], ["a"])
    assert e.value.field == "images[0]"
    with pytest.raises(InvalidRequestError, match="not a readable image") as e:  # a PNG signature, no header
        check_upload(FitSettings(), [("a.png", b"\x89PNG\r\n\x1a\nnot really")], ["a"])
    assert e.value.field == "images[0]" and "BytesIO" not in str(e.value)


def test_decompression_bomb_is_refused_before_decoding(no_decoding, bomb):
    with pytest.raises(UploadTooLargeError) as e:  # the default limit (no_decoding: any decode would fail it)
        check_upload(FitSettings(), [("ok.png", image_bytes("PNG")), ("flat.png", bomb)], ["a", "b"])
    assert e.value.field == "images[1]" and "8192x8192" in str(e.value) and "before decoding" in str(e.value)
    # Above Pillow's own bomb limit (twice MAX_IMAGE_PIXELS) too: still a 413, not an unreadable image.
    huge = png(20_000, 20_000, zlib.compress(b"\x00" * 100))  # a header that claims 20000x20000
    with pytest.raises(UploadTooLargeError) as e:
        check_upload(FitSettings(max_image_pixels=10**12), [("huge.png", huge)], ["a"])
    assert e.value.field == "images[0]"


def test_decoded_bytes_of_a_job_are_bounded(no_decoding):
    files = [(f"{i}.png", image_bytes("PNG", (100, 100))) for i in range(3)]
    check_upload(FitSettings(max_decoded_bytes=3 * 100 * 100 * 4), files, ["a"] * 3)
    with pytest.raises(UploadTooLargeError, match="decode to more than") as e:
        check_upload(FitSettings(max_decoded_bytes=3 * 100 * 100 * 4 - 1), files, ["a"] * 3)
    assert e.value.field == "images"


def test_the_fitting_task_checks_the_limits_again(bomb, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    limits = FitSettings().image_limits()
    out = fit_job.fit_user("eve", [("flat.png", bomb)], ["x"], None, None, {}, limits)
    assert out["code"] == 2 and "8192x8192" in out["error"] and "record" not in out
    assert Image.MAX_IMAGE_PIXELS == limits["max_image_pixels"]
    out = fit_job.fit_user("eve", [("a.png", EPS)], ["x"], None, None, {}, limits)
    assert out["code"] == 2 and "EPS" in out["error"]


def test_settings_defaults_are_safe():
    s = FitSettings()
    assert s.max_image_pixels < 8192 * 8192 and s.image_formats == ["PNG", "JPEG", "WEBP"]
    assert s.max_running_jobs >= 1 and s.max_queued_jobs >= 0 and s.job_timeout_s > 0 and s.decode_workers >= 1
    with pytest.raises(ValueError):
        FitSettings(image_formats=["GIF"])
    with pytest.raises(ValueError):
        FitSettings(image_formats=[])


# ---------------------------------------------------------------------- messages
def test_public_reason_keeps_the_reason_only():
    ray_message = (
        "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
        'Traceback (most recent call last):\n  File "/home/ray/app/serving/fit_job.py", line 3\nValueError: x'
    )
    assert public_reason(ray_message) == "Job entrypoint command failed with exit code 1"
    tb = 'Traceback (most recent call last):\n  File "/srv/a.py", line 3, in f\n    f()\nOSError: no /srv/data/x.bin'
    assert public_reason(tb) == "OSError: no .../x.bin"
    text = public_reason("checkpoint /data/store/ckpt/adapters.safetensors is unreadable (http://head:8265/api)")
    assert text == "checkpoint .../adapters.safetensors is unreadable (http://head:8265/api)"
    assert len(public_reason("x" * 10_000)) <= 1000


# ---------------------------------------------------------------------- admission, reaping, counts, cancel
class FakeJobs:
    """The part of ray.job_submission.JobSubmissionClient the manager uses, in memory."""

    def __init__(self, store: str):
        self.store, self.jobs, self.stopped = store, {}, []

    def info(self, job_id, status, user_id="u", message=""):
        self.jobs[job_id] = SimpleNamespace(
            status=SimpleNamespace(value=status),
            metadata={"kind": "premier-fit", "user_id": user_id, "store": self.store},
            message=message,
            start_time=1000,
            end_time=2000 if status in ("SUCCEEDED", "FAILED", "STOPPED") else None,
        )

    def submit_job(self, **kw):
        self.info(kw["submission_id"], "PENDING", kw["metadata"]["user_id"])

    def get_job_info(self, job_id):
        if job_id not in self.jobs:
            raise RuntimeError(f"Job {job_id} does not exist")
        return self.jobs[job_id]

    def stop_job(self, job_id):
        self.stopped.append(job_id)
        if self.jobs[job_id].status.value == "PENDING":
            return True  # a job the cluster never started stays PENDING (Ray cannot stop it)
        self.info(job_id, "STOPPED", self.jobs[job_id].metadata["user_id"])
        return True

    def list_jobs(self):
        raise AssertionError("the manager must not list every job of the cluster")


def fake_manager(tmp_path, monkeypatch, jobs: FakeJobs | None = None, **settings) -> tuple[FitJobManager, FakeJobs]:
    store = tmp_path / "store"
    jobs = jobs or FakeJobs(str(store.resolve()))
    monkeypatch.setattr(FitJobManager, "_jobs", lambda self: jobs)
    manager = FitJobManager(
        FitSettings(**{"runner": "jobs", **settings}), store_path=str(store), model=None, checkpoint=None
    )
    return manager, jobs


def upload(n=1):
    return [(f"{i}.png", image_bytes("PNG")) for i in range(n)], ["a cat"] * n


def test_one_live_job_per_user_and_caps_per_server(tmp_path, monkeypatch):
    manager, jobs = fake_manager(tmp_path, monkeypatch, max_running_jobs=1, max_queued_jobs=1)
    first = manager.submit("alice", *upload())
    with pytest.raises(FitConflictError, match=first) as e:
        manager.submit("alice", *upload())
    assert e.value.field == "user_id"
    second = manager.submit("bob", *upload())
    with pytest.raises(FitBusyError, match=r"1 running, 1 queued"):
        manager.submit("carol", *upload())
    assert sorted(p.name for p in manager.uploads_dir.iterdir()) == sorted([first, second])
    assert manager.counts() == {"PENDING": 2, "RUNNING": 0, "SUCCEEDED": 0, "FAILED": 0, "STOPPED": 0}
    # The first job ends (its driver killed: no result, its folder left): the next admission reaps it.
    jobs.info(first, "FAILED", "alice", "Job entrypoint command failed with exit code -9, last available logs: ...")
    third = manager.submit("carol", *upload())
    assert not (manager.uploads_dir / first).exists() and (manager.uploads_dir / third).is_dir()
    status = manager.status(first)
    assert status["status"] == "FAILED" and status["message"].endswith("exit code -9"), status


def test_refused_uploads_leave_nothing_and_take_no_slot(tmp_path, monkeypatch):
    manager, jobs = fake_manager(tmp_path, monkeypatch, max_running_jobs=1, max_queued_jobs=0)
    truncated = image_bytes("PNG", (64, 64))
    with pytest.raises(InvalidRequestError, match="not a readable image"):  # decoded after admission: then undone
        manager.submit("alice", [("a.png", truncated[: len(truncated) - 30])], ["x"])
    assert not any(manager.uploads_dir.iterdir()) and not jobs.jobs
    manager.submit("alice", *upload())  # the slot was not taken


def test_sweep_at_start_removes_what_killed_jobs_left(tmp_path, monkeypatch):
    manager, jobs = fake_manager(tmp_path, monkeypatch)
    ended, running, unknown_old, unknown_new = (manager.submit(u, *upload()) for u in ("a", "b", "c", "d"))
    jobs.info(ended, "STOPPED", "a")
    jobs.info(running, "RUNNING", "b")
    del jobs.jobs[unknown_old], jobs.jobs[unknown_new]
    claim = manager.uploads_dir / unknown_old / "claim.json"
    claim.write_text(json.dumps({**json.loads(claim.read_text()), "created_at": time.time() - RESERVATION_GRACE_S - 1}))
    (manager.uploads_dir / ".fit-0123456789abcdef.x").mkdir()  # a half-written upload of the old layout
    os.utime(manager.uploads_dir / ".fit-0123456789abcdef.x", (0, 0))
    fresh, _ = fake_manager(tmp_path, monkeypatch, jobs=jobs)  # a new manager: the server (re)starting
    left = sorted(p.name for p in fresh.uploads_dir.iterdir() if p.name.startswith(("fit-", ".fit-")))
    assert left == sorted([running, unknown_new])  # a submission still in progress keeps its grace
    assert fresh.status(ended)["status"] == "STOPPED"


def test_counts_are_bounded_and_results_pruned(tmp_path, monkeypatch):
    manager, jobs = fake_manager(tmp_path, monkeypatch, keep_results=3, counts_cache_s=0)
    ids = []
    for i in range(5):
        ids.append(manager.submit(f"u{i}", *upload()))
        jobs.info(ids[-1], "FAILED", f"u{i}", "boom")
        manager.status(ids[-1])  # reaped: the result recorded, the folder gone
        time.sleep(0.01)
    manager._reconciled_at = float("-inf")
    assert manager.counts()["FAILED"] == 3  # the newest keep_results (FakeJobs.list_jobs is never called)
    assert len(list((manager.uploads_dir / "results").iterdir())) == 3


def test_cancel(tmp_path, monkeypatch):
    manager, jobs = fake_manager(tmp_path, monkeypatch)
    running = manager.submit("alice", *upload())
    jobs.info(running, "RUNNING", "alice")
    state = manager.cancel(running)
    assert state["status"] == "STOPPED" and "was not written" in state["message"]
    assert not (manager.uploads_dir / running).exists()
    assert manager.cancel(running)["status"] == "STOPPED"  # again: its state, nothing else
    # A job Ray never started (no node for its driver) is recorded STOPPED by the manager.
    monkeypatch.setattr("serving.fitting.CANCEL_WAIT_S", 0.3)
    stuck = manager.submit("bob", *upload())
    state = manager.cancel(stuck)
    assert state["status"] == "STOPPED" and "cancelled before it started" in state["message"]
    assert not (manager.uploads_dir / stuck).exists() and stuck in jobs.stopped
    manager.submit("bob", *upload())  # bob may fit again


# ---------------------------------------------------------------------- the job's driver
def job_folder(tmp_path, **spec) -> os.PathLike:
    job_dir = tmp_path / "uploads" / "fit-0123456789abcdef"
    (job_dir / "images").mkdir(parents=True)
    (job_dir / "images" / "a.png").write_bytes(image_bytes("PNG"))
    base = {"job_id": job_dir.name, "user_id": "zed", "max_running": 1, "timeout_s": 60.0, "keep_uploads": False}
    (job_dir / "job.json").write_text(json.dumps({**base, **spec}))
    return job_dir


def result_of(job_dir) -> dict:
    return json.loads((job_dir.parent / "results" / f"{job_dir.name}.json").read_text())


@pytest.mark.parametrize(
    "outcome,status",
    [
        (
            lambda: (_ for _ in ()).throw(fit_job._JobFailed("checkpoint /srv/ckpt/a.safetensors is unreadable", 3)),
            "FAILED",
        ),
        (lambda: (_ for _ in ()).throw(OSError("disk /srv/store/users.db is full")), "FAILED"),
        (lambda: (_ for _ in ()).throw(fit_job._Stopped()), "STOPPED"),
        (lambda: {"user_id": "zed", "mode": "coefficients", "steps": 3}, "SUCCEEDED"),
    ],
    ids=["failed", "crashed", "stopped", "succeeded"],
)
def test_driver_records_the_end_and_removes_its_folder(tmp_path, monkeypatch, outcome, status):
    job_dir = job_folder(tmp_path)
    seen = {}

    def run(folder, deadline):
        seen["running"] = (folder / "running.json").is_file()
        seen["left"] = deadline - time.monotonic()
        return outcome()

    monkeypatch.setattr(fit_job, "run", run)
    monkeypatch.setattr(fit_job.signal, "signal", lambda *a: None)  # not this test process's SIGTERM
    fit_job.main([str(job_dir)])
    result = result_of(job_dir)
    assert result["status"] == status and result["user_id"] == "zed"
    assert seen["running"] and 50 < seen["left"] <= 60
    assert not job_dir.exists()
    assert "/srv/" not in result.get("reason", "") and "Traceback" not in result.get("reason", "")
    if status == "FAILED":
        assert "is unreadable" in result["reason"] or "is full" in result["reason"]


def test_driver_keeps_a_succeeded_jobs_images_when_asked(tmp_path, monkeypatch):
    job_dir = job_folder(tmp_path, keep_uploads=True)
    monkeypatch.setattr(fit_job, "run", lambda folder, deadline: {"user_id": "zed", "mode": "c", "steps": 1})
    monkeypatch.setattr(fit_job.signal, "signal", lambda *a: None)
    assert fit_job.main([str(job_dir)]) == 0
    assert not job_dir.exists() and (job_dir.parent / "kept" / job_dir.name / "images" / "a.png").is_file()


def test_driver_waits_for_a_slot_and_stops_if_cancelled(tmp_path, monkeypatch):
    import fcntl

    job_dir = job_folder(tmp_path)
    slots = job_dir.parent / "slots"
    slots.mkdir()
    held = os.open(slots / "slot-0.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # another job fits
    monkeypatch.setattr(fit_job, "SLOT_POLL_S", 0.05)
    calls = []

    def sleep(s):
        calls.append(s)
        if len(calls) == 3:
            (job_dir / "job.json").unlink()  # the manager cancelled it while it waited

    monkeypatch.setattr(fit_job.time, "sleep", sleep)
    monkeypatch.setattr(fit_job, "run", lambda *a: pytest.fail("ran without a slot"))
    monkeypatch.setattr(fit_job.signal, "signal", lambda *a: None)
    try:
        fit_job.main([str(job_dir)])
    finally:
        os.close(held)
    assert len(calls) == 3 and not job_dir.exists()


def test_driver_stopped_by_sigterm_records_it_and_removes_its_folder(tmp_path):
    """How Ray stops a job: SIGTERM to the driver, which records STOPPED and removes its folder before it exits."""
    import signal
    import subprocess
    import sys

    job_dir = job_folder(tmp_path)
    script = (
        "import sys, time\n"
        "from serving import fit_job\n"
        "def run(folder, deadline):\n"
        "    print('fitting', flush=True)\n"
        "    time.sleep(60)\n"
        "fit_job.run = run\n"
        "sys.exit(fit_job.main([sys.argv[1]]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(job_dir)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "fitting"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 1
    finally:
        proc.kill()
    assert result_of(job_dir)["status"] == "STOPPED" and not job_dir.exists()
