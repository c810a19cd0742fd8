"""Resident fit workers: long-lived Ray actors that hold the frozen model and fit new users in batches.

A Ray job per fit pays a new Python process, its imports and a model load (about 19 s on the
embedded model) before the first step. A `FitWorker` pays that once: it loads FLUX (or the embedded
model), the stage-1 checkpoint and the encoders when it starts, and then takes fits as calls. Its
fits share forward passes (`premier.training.multifit.MultiUserFitter`, at most `worker_max_users`
at once): a loop thread runs rounds while any fit is active; a fit joins at the next round and
leaves when it converges or is cancelled, without disturbing the others.

Each upload is decoded and encoded once (VAE latents, T5 and CLIP states), with the encodings kept
in a bounded cache keyed by the bytes' SHA-256 and the caption, so a retried fit or an upload
identical to another user's encodes nothing again. The worker returns the record; it never writes
the store (the dispatcher on the store's node does, in one transaction: serving/fit_dispatch.py).
"""

from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("ray.serve")

ENCODE_CACHE_ITEMS = 4096
"""Encoded images kept per worker (embedded model: ~40 KB each; FLUX.1-dev at 512 tokens: ~4.5 MB each)."""
NAMESPACE = "premier-fit"


class FitWorker:
    """One resident worker (a threaded Ray actor): `fit` blocks its caller until that fit ends."""

    def __init__(self, model: str | None, checkpoint: str | None, settings: dict[str, Any]):
        import torch

        from premier.checkpoint import PremierModel
        from premier.models.embedded import build_embedded_premier
        from premier.training.base_model import default_resolution, load_pipeline, resolve_device
        from premier.training.config import Stage2Config
        from premier.training.multifit import MultiUserFitter
        from premier.training.prepared import DataEncoder
        from serving.fit_settings import FitSettings

        self.settings = FitSettings(**settings)
        s = self.settings
        if s.worker_threads:
            torch.set_num_threads(s.worker_threads)
        if checkpoint:
            premier, checkpoint_id = PremierModel.load(checkpoint)
        else:
            premier = build_embedded_premier()
            checkpoint_id = premier.checkpoint_id()
        device = resolve_device(s.device)
        pipe = load_pipeline(model, device, getattr(torch, s.dtype) if s.dtype else None)
        premier.config.check_fits(pipe.transformer.config)
        premier.to(device)
        self.encoder = DataEncoder(pipe, s.resolution or default_resolution(model))
        self.config = Stage2Config(**s.worker_stage2())
        self.fitter = MultiUserFitter(pipe.transformer, premier, checkpoint_id, self.config)
        self._cache: OrderedDict[str, tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._joining: list[tuple[str, str, Any, list[str], Future]] = []
        self._leaving: set[str] = set()
        self._futures: dict[str, Future] = {}  # job id -> its outcome
        self._progress: dict[str, dict[str, Any]] = {}
        self._users: dict[str, str] = {}  # job id -> user id (the fitter's slot key)
        self.fits_done = 0
        threading.Thread(target=self._loop, name="fit-rounds", daemon=True).start()

    def ready(self) -> dict[str, Any]:
        """For the dispatcher's first call: the model is loaded once this answers."""
        return {"checkpoint_id": self.fitter.checkpoint_id, "max_users": self.settings.worker_max_users}

    def load(self) -> int:
        """Fits active or about to join (how the dispatcher picks the least loaded worker)."""
        with self._lock:
            return len(self._futures)

    def progress(self, job_id: str) -> dict[str, Any] | None:
        return self._progress.get(job_id)

    def cancel(self, job_id: str) -> bool:
        """Stop a fit: its `fit` call answers STOPPED at the next round; True if it was here."""
        with self._lock:
            if job_id not in self._futures:
                return False
            self._leaving.add(job_id)
            self._wake.notify()
            return True

    def fit(
        self, job_id: str, user_id: str, images: list[tuple[str, bytes]], captions: list[str], limits: dict[str, Any]
    ) -> dict[str, Any]:
        """Decode, encode (cached) and fit; {"code": 0, "record"} or {"code", "error"} or {"status": "STOPPED"}."""
        from premier.errors import PremierError, exit_code
        from serving.fit_job import _check_limits

        try:
            _check_limits(images, limits)
            samples, files = self._encode(user_id, images, captions)
        except PremierError as e:
            code = exit_code(e)
            if code is None:
                raise
            return {"code": code, "error": str(e)}
        future: Future = Future()
        with self._lock:
            self._futures[job_id] = future
            self._users[job_id] = user_id
            self._joining.append((job_id, user_id, samples, files, future))
            self._wake.notify()
        try:
            return future.result()
        finally:
            with self._lock:
                self._futures.pop(job_id, None)
                self._users.pop(job_id, None)
                self._progress.pop(job_id, None)

    # ------------------------------------------------------------------ internals
    def _encode(self, user_id: str, images: list[tuple[str, bytes]], captions: list[str]) -> tuple[Any, list[str]]:
        import torch

        from premier.errors import InvalidRequestError
        from premier.training.prepared import Batch, load_image

        rows, files, todo = {}, [], []
        for i, ((name, data), caption) in enumerate(zip(images, captions)):
            key = hashlib.sha256(data + b"\0" + caption.encode()).hexdigest()
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            if hit is not None:
                rows[i] = hit
            else:
                image, reason = load_image(io.BytesIO(data))
                if image is None:
                    log.warning("fit of %r: skipped %s: %s", user_id, name, reason)
                    continue
                todo.append((i, key, image, caption))
        if todo:
            latents = self.encoder.encode_images([t[2] for t in todo])
            text, pooled = self.encoder.encode_prompts([t[3] for t in todo])
            for j, (i, key, _, _) in enumerate(todo):
                rows[i] = (latents[j : j + 1].clone(), text[j : j + 1].clone(), pooled[j : j + 1].clone())
                with self._lock:
                    self._cache[key] = rows[i]
                    while len(self._cache) > ENCODE_CACHE_ITEMS:
                        self._cache.popitem(last=False)
        if not rows:
            raise InvalidRequestError("images", f"none of the {len(images)} images could be decoded")
        kept = sorted(rows)
        files = [images[i][0] for i in kept]
        cat = [torch.cat([rows[i][k] for i in kept]) for k in range(3)]
        return Batch(cat[0], cat[1], cat[2], torch.zeros(len(kept), dtype=torch.long)), files

    def _loop(self) -> None:
        """Rounds while any fit is active; joins and cancellations between rounds."""
        while True:
            with self._lock:
                while not self._joining and not self._leaving and not self.fitter.slots:
                    self._wake.wait()
                joining = []
                while self._joining and len(self.fitter.slots) + len(joining) < self.settings.worker_max_users:
                    joining.append(self._joining.pop(0))
                leaving, self._leaving = self._leaving, set()
            for job_id in leaving:
                if self.fitter.remove(job_id):
                    self._settle(job_id, {"status": "STOPPED"})
                else:  # not joined yet
                    with self._lock:
                        waiting = [j for j in self._joining if j[0] == job_id]
                        self._joining = [j for j in self._joining if j[0] != job_id]
                    for j in waiting:
                        j[4].set_result({"status": "STOPPED"})
            for job_id, user_id, samples, files, future in joining:
                try:  # the slot is keyed by job id: a user's refit cannot collide with its own leftover
                    self.fitter.add(
                        job_id, samples, files=files, on_progress=lambda p, j=job_id: self._progress.__setitem__(j, p)
                    )
                except Exception as e:
                    future.set_result(_failure(e))
            if not self.fitter.slots:
                continue
            try:
                ended = self.fitter.round()
            except Exception:  # the shared pass failed: each fit alone, so that only a fit that fails by itself fails
                log.exception("a shared fit round failed; retrying its fits one by one")
                ended = {}
                for job_id in list(self.fitter.slots):
                    try:
                        ended.update(self.fitter.round(only=[job_id]))
                    except Exception as e:
                        ended[job_id] = e
                        self.fitter.remove(job_id)
            for job_id, outcome in ended.items():
                self.fits_done += 1
                if isinstance(outcome, Exception):
                    self._settle(job_id, _failure(outcome))
                else:
                    record = outcome.record
                    with self._lock:
                        user_id = self._users.get(job_id, record.user_id)
                    record = type(record)(user_id, record.mode, record.vector, record.checkpoint_id, record.fit)
                    self._settle(job_id, {"code": 0, "error": "", "record": record})

    def _settle(self, job_id: str, outcome: dict[str, Any]) -> None:
        with self._lock:
            future = self._futures.get(job_id)
        if future is not None and not future.done():
            future.set_result(outcome)


def _failure(e: BaseException) -> dict[str, Any]:
    from premier.errors import PremierError, exit_code

    code = exit_code(e) if isinstance(e, PremierError) else None
    return {"code": code or 1, "error": f"{type(e).__name__}: {e}" if code is None else str(e)}


def worker_handles(settings: Any, store_path: str, model: str | None, checkpoint: str | None) -> list[Any]:
    """The server's resident workers (named actors: every ingress replica of a store gets the same ones), made
    on first use with the settings' resources. A dead one is made again by the next call."""
    import ray

    from serving.fit_settings import FitSettings

    s: FitSettings = settings
    tag = hashlib.sha256(store_path.encode()).hexdigest()[:12]
    options: dict[str, Any] = {
        "num_cpus": s.num_cpus,
        "num_gpus": s.num_gpus,
        "max_concurrency": 4 * s.worker_max_users + 8,  # fit calls block; progress and cancel must still get in
        "namespace": NAMESPACE,
        "get_if_exists": True,
        "max_restarts": 0,
    }
    if s.memory_bytes:
        options["memory"] = s.memory_bytes
    if s.env_vars:
        options["runtime_env"] = {"env_vars": dict(s.env_vars)}
    actor = ray.remote(FitWorker)
    args = (model, checkpoint, s.model_dump(mode="json"))
    return [actor.options(name=f"fit-worker-{tag}-{k}", **options).remote(*args) for k in range(s.workers)]


__all__ = ["FitWorker", "worker_handles", "ENCODE_CACHE_ITEMS", "NAMESPACE"]
