"""Fitting new users as Ray jobs (serving/fitting.py, serving/fit_job.py) against a real local Ray with its Jobs API.

Jobs fit a few dozen steps on the embedded model, so each takes seconds (most of it the job's
Python start-up and imports). The server's own fitting allows 1 running and 1 queued job, so the
HTTP tests meet its caps; the manager tests use their own settings and uploads folders.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import struct
import time
import zlib
from pathlib import Path

import pytest
import torch
from serving_harness import free_port, serve_app
from training_data import user_images

from premier.errors import InvalidRequestError
from premier.models.embedded import build_embedded_premier
from serving.fitting import FitJobManager, FitSettings, FitUnavailableError, UnknownJobError, UploadTooLargeError
from store.user_store import UserStore

FIT = dict(runner="jobs", steps=30, eval_every=10)  # the Ray Jobs path (resident workers: test_fit_workers.py)
STORE_RESOURCE = "premier_store"  # what the local Ray of serving.server declares, as a KubeRay head does
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@pytest.fixture(scope="module")
def server():
    """The Serve app on a fresh local Ray with its dashboard (the Jobs API lives there); stopped after the module.

    The manager tests use the same cluster, each with its own store folder.
    """
    app = {  # the ingress and the job drivers on the store's node
        "fitting": {**FIT, "max_running_jobs": 1, "max_queued_jobs": 1},
        "store_resource": STORE_RESOURCE,
    }
    with _dashboard_agent_port(free_port()), serve_app(app, include_dashboard=True) as running:
        _wait_for_job_agent(running.dashboard_url)
        yield running


@contextlib.contextmanager
def _dashboard_agent_port(port: int):
    """ray.init has no option for the dashboard agent's HTTP port (fixed 52365): a second cluster on this machine
    (another test run) would leave its agent without HTTP, and the Jobs API with "No available agent". Point the
    default at a free port while the cluster starts."""
    from ray._private.parameter import RayParams

    init = RayParams.__init__
    names = [n for n, p in inspect.signature(init).parameters.items() if p.default is not inspect.Parameter.empty]
    saved = init.__defaults__
    assert saved is not None and len(saved) == len(names)
    init.__defaults__ = tuple(port if n == "dashboard_agent_listen_port" else d for n, d in zip(names, saved))
    try:
        yield
    finally:
        init.__defaults__ = saved


def _wait_for_job_agent(address: str, timeout_s: float = 120.0) -> None:
    """A fresh cluster's dashboard answers before its job agent registers; a no-op job goes through once it has."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.monotonic() + timeout_s
    while True:
        try:
            client.submit_job(entrypoint="true")
            return
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@pytest.fixture()
def cluster(server):
    return server


def png_upload(n: int, colour=(200, 40, 40), seed: int = 0, fmt: str = "PNG") -> list[tuple[str, bytes]]:
    files = []
    for i, im in enumerate(user_images(colour, n, seed=seed)):
        buf = io.BytesIO()
        im.save(buf, format=fmt)
        files.append((f"{i:02d}.{fmt.lower()}", buf.getvalue()))
    return files


def wait(manager: FitJobManager, job_id: str, timeout: float = 120.0, until=TERMINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = manager.status(job_id)
        if status["status"] in until:
            return status
        assert time.monotonic() < deadline, f"job {job_id} still {status['status']} after {timeout}s"
        time.sleep(0.3)


@pytest.fixture()
def manager(cluster, tmp_path):
    return FitJobManager(
        FitSettings(**FIT),
        store_path=str(tmp_path / "store"),
        model=None,
        checkpoint=None,
        store_resource=STORE_RESOURCE,
    )


def test_fit_job_stores_a_servable_user(cluster, manager, tmp_path):
    job_id = manager.submit("alice", png_upload(4), ["a cat", "a house", "a tree", "a cat"])
    assert job_id.startswith("fit-")
    status = wait(manager, job_id)
    assert status["status"] == "SUCCEEDED", status["message"]
    assert status["user_id"] == "alice" and status["finished_at"] >= status["submitted_at"] > 0
    summary = status["user"]
    model = build_embedded_premier()
    ckpt = model.checkpoint_id()
    assert summary["checkpoint_id"] == ckpt and summary["mode"] == "coefficients"
    assert summary["images"] == 4 and summary["steps"] <= FIT["steps"]
    with UserStore.open(tmp_path / "store") as store:
        record = store.get("alice")
        assert record.checkpoint_id == ckpt and record.vector.shape == (len(model.users),)
        assert torch.isfinite(store.materialise("alice")).all()
    assert manager.counts()["SUCCEEDED"] == 1 and manager.counts()["FAILED"] == 0
    uploads = tmp_path / "store" / "fit-uploads"
    assert not (uploads / job_id).exists()  # the job's folder goes when it ends (uploads are not kept by default)
    assert (uploads / "results" / f"{job_id}.json").is_file()
    # The fitting ran as a Ray task of the job (the driver only wrote the store).
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_tasks

    info = JobSubmissionClient(cluster.dashboard_url).get_job_info(job_id)
    tasks = list_tasks(address=cluster.dashboard_url, filters=[("func_or_class_name", "=", "fit_user")], detail=True)
    assert any(t.job_id == info.job_id and t.state == "FINISHED" for t in tasks), tasks
    # Another manager (another ingress replica) sees the same job: the state is in Ray and the files.
    other = FitJobManager(FitSettings(**FIT), store_path=str(tmp_path / "store"), model=None, checkpoint=None)
    assert other.status(job_id)["status"] == "SUCCEEDED"


BAD_UPLOADS = [
    ("bad id", "../evil", lambda: (png_upload(1), ["x"]), InvalidRequestError, "user_id"),
    ("no images", "bob", lambda: ([], []), InvalidRequestError, "at least one image"),
    ("caption count", "bob", lambda: (png_upload(2), ["only one"]), InvalidRequestError, "1 captions for 2 images"),
    (
        "undecodable",
        "bob",
        lambda: ([("a.png", b"\x89PNG\r\n\x1a\nnot really")], ["x"]),
        InvalidRequestError,
        "not a readable image",
    ),
    (
        "truncated",
        "bob",
        lambda: ([("a.png", png_upload(1)[0][1][:200])], ["x"]),
        InvalidRequestError,
        "not a readable image",
    ),
    (
        "path in name",
        "bob",
        lambda: ([("../a.png", png_upload(1)[0][1])], ["x"]),
        InvalidRequestError,
        "plain file name",
    ),
    (
        "folder in name",
        "bob",
        lambda: ([("d/a.png", png_upload(1)[0][1])], ["x"]),
        InvalidRequestError,
        "plain file name",
    ),
    (
        "not an image name",
        "bob",
        lambda: ([("a.exe", png_upload(1)[0][1])], ["x"]),
        InvalidRequestError,
        "must end in one of",
    ),
    (
        "long name",
        "bob",
        lambda: ([("a" * 300 + ".png", png_upload(1)[0][1])], ["x"]),
        InvalidRequestError,
        "at most 200 bytes",
    ),
    ("control char", "bob", lambda: ([("a\x00.png", png_upload(1)[0][1])], ["x"]), InvalidRequestError, "printable"),
    (
        "hidden name",
        "bob",
        lambda: ([(".a.png", png_upload(1)[0][1])], ["x"]),
        InvalidRequestError,
        "must end in one of",
    ),
    ("duplicate", "bob", lambda: ([png_upload(1)[0]] * 2, ["x", "y"]), InvalidRequestError, "used twice"),
    ("empty file", "bob", lambda: ([("a.png", b"")], ["x"]), InvalidRequestError, "is empty"),
    ("too many", "bob", lambda: (png_upload(5), ["x"] * 5), UploadTooLargeError, "at most 4 per upload"),
    ("too big", "bob", lambda: ([("a.png", bytes(12_000))], ["x"]), UploadTooLargeError, "bytes; at most"),
    ("upload too big", "bob", lambda: (png_upload(2), ["x", "y"]), UploadTooLargeError, "the upload is"),
    ("long caption", "bob", lambda: (png_upload(1), ["x" * 101]), InvalidRequestError, "at most 100 allowed"),
    ("too many pixels", "bob", lambda: ([("big.png", _big_png())], ["x"]), InvalidRequestError, "pixels"),
]


def _big_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 200)).save(buf, format="PNG")  # small file, 40,000 pixels > the limit below
    return buf.getvalue()


@pytest.mark.parametrize("name,user,upload,error,words", BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_bad_uploads_are_refused_and_leave_nothing(cluster, tmp_path, name, user, upload, error, words):
    limits = dict(
        max_images=4,
        max_image_bytes=11_000 + 152,
        max_upload_bytes=20_000,
        max_caption_chars=100,
        max_image_pixels=20_000,
    )
    manager = FitJobManager(
        FitSettings(**FIT, **limits), store_path=str(tmp_path / "store"), model=None, checkpoint=None
    )
    files, captions = upload()
    with pytest.raises(error) as e:
        manager.submit(user, files, captions)
    assert words in str(e.value)
    uploads = tmp_path / "store" / "fit-uploads"
    assert not uploads.exists() or not any(uploads.iterdir())
    assert manager.counts() == {s: 0 for s in ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")}


def test_failed_job_says_why_and_writes_no_user(cluster, tmp_path):
    ckpt = tmp_path / "ckpt"
    build_embedded_premier().save(ckpt)
    adapters = ckpt / "adapters.safetensors"
    adapters.write_bytes(adapters.read_bytes()[:1000])  # a corrupted checkpoint: the job fails to load it
    manager = FitJobManager(FitSettings(**FIT), store_path=str(tmp_path / "store"), model=None, checkpoint=str(ckpt))
    job_id = manager.submit("mallory", png_upload(2), ["a cat", "a tree"])
    status = wait(manager, job_id)
    assert status["status"] == "FAILED"
    assert "was not written" in status["message"] and "unreadable" in status["message"], status["message"]
    assert str(tmp_path) not in status["message"] and "Traceback" not in status["message"]  # no paths, no logs
    assert "last available logs" not in status["message"]
    assert not (tmp_path / "store" / "fit-uploads" / job_id).exists()
    assert manager.counts()["FAILED"] == 1
    with UserStore.open(tmp_path / "store") as store:  # (the embedded checkpoint: the store is readable)
        assert "mallory" not in store and len(store) == 0


def test_job_driver_waits_for_the_store_node(cluster, tmp_path):
    """The driver (the store's writer) asks for the store's custom resource: where no node advertises it, the job
    is not started (on a KubeRay cluster only the head does, so the driver lands there)."""
    manager = FitJobManager(
        FitSettings(**FIT),
        store_path=str(tmp_path / "store"),
        model=None,
        checkpoint=None,
        store_resource="premier_store_elsewhere",
    )
    job_id = manager.submit("nomad", png_upload(1), ["a cat"])
    time.sleep(3.0)
    assert manager.status(job_id)["status"] == "PENDING"
    manager.stop(job_id)  # (Ray keeps a never-scheduled job PENDING until the cluster goes)
    with UserStore.open(tmp_path / "store") as store:
        assert "nomad" not in store


def test_stopped_job_writes_no_user(cluster, tmp_path):
    manager = FitJobManager(
        FitSettings(runner="jobs", steps=100_000, patience=100_000),
        store_path=str(tmp_path / "store"),
        model=None,
        checkpoint=None,
    )
    job_id = manager.submit("quitter", png_upload(2), ["a cat", "a tree"])
    wait(manager, job_id, until=("RUNNING",) + TERMINAL)
    time.sleep(1.0)
    assert manager.stop(job_id)
    status = wait(manager, job_id)
    assert status["status"] == "STOPPED" and "was not written" in status["message"]
    assert not (tmp_path / "store" / "fit-uploads" / job_id).exists()
    with UserStore.open(tmp_path / "store") as store:
        assert "quitter" not in store


def test_timed_out_job_fails_cleanly(cluster, tmp_path):
    settings = FitSettings(runner="jobs", steps=100_000, patience=100_000, job_timeout_s=2.0)
    manager = FitJobManager(settings, store_path=str(tmp_path / "store"), model=None, checkpoint=None)
    job_id = manager.submit("slowpoke", png_upload(2), ["a cat", "a tree"])
    status = wait(manager, job_id)
    assert status["status"] == "FAILED", status
    assert "timed out" in status["message"] and "was not written" in status["message"], status["message"]
    assert not (tmp_path / "store" / "fit-uploads" / job_id).exists()
    with UserStore.open(tmp_path / "store") as store:
        assert "slowpoke" not in store and len(store) == 0
    assert manager.submit("slowpoke", png_upload(1), ["a cat"])  # the user may fit again


def test_unknown_jobs(manager, tmp_path):
    for job_id in ("fit-0123456789abcdef", "../../etc/passwd", "", "FIT-0123456789ABCDEF"):
        with pytest.raises(UnknownJobError):
            manager.status(job_id)
    # A job of another store (another application on the same cluster) is not this manager's.
    other = FitJobManager(FitSettings(**FIT), store_path=str(tmp_path / "elsewhere"), model=None, checkpoint=None)
    job_id = other.submit("carol", png_upload(1), ["a cat"])
    with pytest.raises(UnknownJobError):
        manager.status(job_id)
    assert other.status(job_id)["user_id"] == "carol"
    other.stop(job_id)


def test_jobs_api_unreachable(tmp_path):
    settings = FitSettings(**FIT, jobs_address=f"http://127.0.0.1:{free_port()}")
    manager = FitJobManager(settings, store_path=str(tmp_path / "store"), model=None, checkpoint=None)
    with pytest.raises(FitUnavailableError, match="not reachable"):
        manager.submit("dave", png_upload(1), ["a cat"])
    with pytest.raises(FitUnavailableError):
        manager.status("fit-0123456789abcdef")
    with pytest.raises(FitUnavailableError):
        manager.counts()
    uploads = tmp_path / "store" / "fit-uploads"
    assert not uploads.exists() or not any(uploads.iterdir())


def test_settings_are_validated(tmp_path):
    import pydantic

    from serving import fit_job

    assert fit_job.main([str(tmp_path)]) == 2  # not a job folder

    with pytest.raises(pydantic.ValidationError, match="steps"):
        FitSettings(steps=0)
    with pytest.raises(pydantic.ValidationError, match="stepz"):
        FitSettings(stepz=3)
    with pytest.raises(pydantic.ValidationError, match="mode"):
        FitSettings(mode="lora")
    options = FitSettings(steps=7, lr=0.5, optimizer="adamw").fit_options()
    assert options["steps"] == 7 and options["lr"] == 0.5 and options["resolution"] is None


# ---------------------------------------------------------------------- through the HTTP API
def _multipart(files: list[tuple[str, bytes]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("images", (name, data, "application/octet-stream")) for name, data in files]


def test_fit_through_http_then_generate(server):
    import requests

    url = server.http_url
    plain = requests.post(url + "/v1/generate", json={"prompt": "a cat", "seed": 3, "format": "json"}, timeout=60)
    assert plain.status_code == 200, plain.text
    r = requests.post(
        url + "/v1/users/newcomer/fit",
        files=_multipart(png_upload(3, colour=(40, 60, 220))),
        data={"captions": ["a cat", "a house", "a tree"]},
        headers=server.headers(),
        timeout=60,
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    deadline = time.monotonic() + 120
    while (status := requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    assert status["status"] == "SUCCEEDED" and status["user"]["user_id"] == "newcomer", status
    # Servable at once, without a restart: the generators read the store.
    r = requests.post(
        url + "/v1/generate", json={"prompt": "a cat", "user_id": "newcomer", "seed": 3, "format": "json"}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["user_id"] == "newcomer" and r.json()["image"] != plain.json()["image"]
    user = requests.get(url + "/v1/users/newcomer", timeout=30).json()
    assert user["source"] == "store" and user["servable"] and user["fit"]["images"] == 3
    deadline = time.monotonic() + 10  # fit-job counts may be cached for a couple of seconds
    while 'premier_fit_jobs{status="SUCCEEDED"} 1.0' not in (
        metrics := requests.get(url + "/metrics", timeout=30).text
    ):
        assert time.monotonic() < deadline, [line for line in metrics.splitlines() if "fit_jobs" in line]
        time.sleep(0.5)


def test_fit_route_bad_input_is_4xx_with_a_reason(server):
    import requests

    url, png = server.http_url, png_upload(2)
    cases = [
        ("/v1/users/newbie/fit", {"files": [], "data": {"captions": ["x"]}}, "images"),
        ("/v1/users/newbie/fit", {"files": _multipart(png), "data": {}}, "captions"),
        ("/v1/users/newbie/fit", {"files": _multipart(png), "data": {"captions": ["x"]}}, "caption"),
        ("/v1/users/bad..id/fit", {"files": _multipart(png[:1]), "data": {"captions": ["x"]}}, "user_id"),
        (
            "/v1/users/newbie/fit",
            {"files": _multipart([("a.png", b"not an image")]), "data": {"captions": ["x"]}},
            "not a readable image",
        ),
        (
            "/v1/users/newbie/fit",
            {"files": _multipart([("a.txt", png[0][1])]), "data": {"captions": ["x"]}},
            "must end in one of",
        ),
        (
            "/v1/users/newbie/fit",
            {"files": _multipart([(".png", png[0][1])]), "data": {"captions": ["x"]}},
            "must end in one of",
        ),
    ]
    for path, kwargs, words in cases:
        r = requests.post(url + path, timeout=60, **kwargs)
        assert 400 <= r.status_code < 500 and words in r.text, (path, r.status_code, r.text)
    for job_id in ("fit-0123456789abcdef", "nope", "fit-..%2F..%2Fetc"):
        r = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30)
        assert r.status_code == 404 and r.json()["error"], r.text
        assert "unknown fit job" in r.json()["error"] or "%2F" in job_id, r.text
    assert requests.get(url + "/v1/users/newbie", timeout=30).status_code == 404  # nothing was submitted


def _flat_png(width: int, height: int) -> bytes:
    """A flat black RGB PNG compressed row by row: 8192x8192 is ~200 KB that would decode to 256 MiB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z, row = zlib.compressobj(9), b"\x00" * (1 + 3 * width)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _still_serving(server) -> None:
    import requests

    r = requests.post(
        server.http_url + "/v1/generate", json={"prompt": "a cat", "seed": 1, "format": "json"}, timeout=60
    )
    assert r.status_code == 200, r.text


def _fit(server, user: str, files: list[tuple[str, bytes]], timeout: float = 60):
    import requests

    return requests.post(
        f"{server.http_url}/v1/users/{user}/fit",
        files=_multipart(files),
        data={"captions": ["a cat"] * len(files)},
        headers=server.headers(),
        timeout=timeout,
    )


def _other_format(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n0 0 moveto showpage\n%%EOF\n"


def test_fit_route_refuses_other_formats_and_bombs_before_decoding(server):
    ok = png_upload(1)[0]
    cases = [  # (files, status, field, words)
        ([ok, ("b.png", EPS)], 415, "images[1]", "EPS"),
        ([("a.gif", _other_format("GIF"))], 415, "images[0]", "must end in one of"),
        ([("a.png", _other_format("GIF"))], 415, "images[0]", "GIF"),
        ([("a.png", _other_format("BMP"))], 415, "images[0]", "BMP"),
        ([("flat.png", _flat_png(8192, 8192))], 413, "images[0]", "8192x8192"),
    ]
    for files, status, field, words in cases:
        r = _fit(server, "newbie", files)
        assert r.status_code == status and r.json()["field"] == field and words in r.json()["error"], r.text
        _still_serving(server)
    uploads = Path(server.config.store) / "fit-uploads"
    assert not uploads.exists() or not any(p.name.startswith("fit-") for p in uploads.iterdir())


def _wait_http(server, job_id: str, timeout: float = 120.0) -> dict:
    import requests

    deadline = time.monotonic() + timeout
    while (status := requests.get(f"{server.http_url}/v1/jobs/{job_id}", timeout=30).json())["status"] not in TERMINAL:
        assert time.monotonic() < deadline, status
        time.sleep(0.3)
    return status


def test_fit_job_caps_conflicts_and_cancel(server):
    """The server's caps (1 running, 1 queued): a third job is 429 with Retry-After, a second job for a user 409;
    DELETE stops a job (STOPPED, no user, no folder); the server keeps serving and fitting afterwards."""
    import requests

    url, uploads = server.http_url, Path(server.config.store) / "fit-uploads"
    first = _fit(server, "cap-a", png_upload(2))
    second = _fit(server, "cap-b", png_upload(2))
    assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
    a, b = first.json()["job_id"], second.json()["job_id"]
    busy = _fit(server, "cap-c", png_upload(1))
    assert busy.status_code == 429 and int(busy.headers["Retry-After"]) > 0, busy.text
    assert "busy" in busy.json()["error"] and "field" not in busy.json()
    again = _fit(server, "cap-a", png_upload(1))
    assert again.status_code == 409 and again.json()["field"] == "user_id" and a in again.json()["error"], again.text
    # Cancel the queued job.
    r = requests.delete(f"{url}/v1/jobs/{b}", headers=server.headers(), timeout=60)
    assert r.status_code in (200, 202) and r.json()["job_id"] == b, r.text
    status = _wait_http(server, b)
    assert status["status"] == "STOPPED" and "was not written" in status["message"], status
    assert not (uploads / b).exists()
    assert requests.get(f"{url}/v1/users/cap-b", timeout=30).status_code == 404
    r = requests.delete(f"{url}/v1/jobs/fit-0123456789abcdef", headers=server.headers(), timeout=30)
    assert r.status_code == 404 and r.json()["field"] == "job_id", r.text
    assert _wait_http(server, a)["status"] == "SUCCEEDED"
    assert requests.delete(f"{url}/v1/jobs/{a}", timeout=30).json()["status"] == "SUCCEEDED"  # ended: as it was
    _still_serving(server)
    third = _fit(server, "cap-c", png_upload(1))  # room again
    assert third.status_code == 202, third.text
    assert _wait_http(server, third.json()["job_id"])["status"] == "SUCCEEDED"
    assert not any(p.name.startswith("fit-") for p in uploads.iterdir())
