"""The Generator deployment: one PremierPipeline per replica, many users per forward.

A request goes straight into ONE `@serve.batch` queue (the event loop does no per-request work,
so arrivals reach it even while a forward holds the GIL). Batches Ray Serve forms while the
pipeline is busy are merged, so a forward takes everything waiting, up to max_batch_size (see
`_batch`). On the pipeline thread each request is validated and its user resolved (a bad one gets
its own error and leaves: it never fails the batch); the rest are grouped by `GenerationSettings`
(size, steps and guidance fix the tensor shapes and schedule) with one pipeline call per group,
different users and prompts together. One queue rather than one per settings key: the common
case (one setting) fills batches fastest; a mixed batch costs one forward per distinct setting.

Users are resolved by the ingress (on the Ray head, the only node that opens the user store; see
serving/users.py): a request arrives with `user` = the embedding (N x U float tensor), a training-user
id of the checkpoint, or None, or with `user_error` (the result dict of a failed lookup, answered here
after the settings and prompt checks, in the order the checks always ran). Generators never open the
store, so their replicas can run on any node.
Results are plain dicts (never exceptions) so the ingress maps errors without unpickling
exception types across processes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from premier.errors import CheckpointError, InvalidEmbeddingError, InvalidRequestError, UnknownUserError
from serving.config import ServeConfig

log = logging.getLogger("ray.serve")
MAX_FORMING_BATCHES = 1024  # batches Ray Serve may hand over at once; each holds >= 1 request, so never reached


class _MergedBatchesWarning(logging.Filter):
    """Drops Ray's warning that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


def error_result(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": message, "field": field}


def error_for(e: BaseException) -> dict[str, Any]:
    """The HTTP status and message for an error a request caused (the gRPC side maps the status)."""
    if isinstance(e, UnknownUserError):
        return error_result(404, str(e), e.field)
    if isinstance(e, InvalidRequestError):
        return error_result(400, str(e), e.field)
    if isinstance(e, InvalidEmbeddingError):
        return error_result(400, str(e), "user")
    if isinstance(e, CheckpointError):
        return error_result(409, str(e), "user")
    from store.errors import StoreError

    if isinstance(e, StoreError):  # busy or unreadable store: the request may succeed later
        return error_result(503, f"user store unavailable: {e}")
    raise e


class Generator:
    """Holds the pipeline; `generate` is what the ingress calls, once per image."""

    def __init__(self, args: dict[str, Any]):
        import torch

        from premier.cli import _quiet_libraries
        from premier.pipeline import PremierPipeline

        self.config = c = ServeConfig.model_validate(args)
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        _quiet_libraries()
        logging.getLogger("ray.serve").addFilter(_MergedBatchesWarning())
        self.pipe = PremierPipeline.load(model=c.model, checkpoint=c.checkpoint, device=c.device,
                                         dtype=getattr(torch, c.dtype) if c.dtype else None,
                                         compile=c.compile, quantize=c.quantize)  # fmt: skip
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="premier-pipeline")  # the pipeline is not re-entrant
        self._batch.set_max_batch_size(c.max_batch_size)
        self._batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        self._batches = 0
        self._waiting: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._pipeline_lock = asyncio.Lock()
        self.pipe(self._warmup_requests(), self.pipe.default_settings(), output_type="np")  # first call pays lazy init
        log.info("generator ready: pid %d, max_batch_size %d", os.getpid(), c.max_batch_size)

    def _warmup_requests(self) -> list:
        from premier.requests import GenerationRequest

        return [GenerationRequest("warm up", None, 0)]

    # ------------------------------------------------------------------ info
    def info(self) -> dict[str, Any]:
        """What the ingress needs to know about the model (it does not load one)."""
        p = self.pipe.profile
        return {"pid": os.getpid(), "checkpoint_id": self.pipe.checkpoint_id,
                "default_settings": vars(self.pipe.default_settings()),
                "limits": {"size_multiple": p.size_multiple, "min_size": p.min_size, "max_size": p.max_size,
                           "max_steps": p.max_steps, "max_guidance": p.max_guidance,
                           "max_sequence_length": p.max_sequence_length},
                "training_users": self.pipe.user_ids, "max_batch_size": self.config.max_batch_size}  # fmt: skip

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ generation
    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        """params: prompt, user_id, seed, steps, height, width, guidance (None: model default), received_at."""
        return await self._batch(params)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_FORMING_BATCHES)
    async def _batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Deposit this batch's requests; whoever holds the pipeline runs everything waiting, max_batch_size at a time.

        Ray Serve forms a batch as soon as its wait ends, also while the pipeline is busy
        (max_concurrent_batches only caps how many run), so with one pipeline the batches formed
        during a forward would be small. Letting them all in and merging what waits when the
        pipeline frees up gives full batches under load and no added wait at low load.
        """
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._waiting.extend(zip(items, futures))
        while not all(f.done() for f in futures):
            async with self._pipeline_lock:
                take = self._waiting[: self.config.max_batch_size]
                del self._waiting[: len(take)]
                if not take:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run_batch, [p for p, _ in take])
                except Exception as e:  # a bug, not bad input: every request of that forward gets it
                    results = [e] * len(take)
                for (_, f), r in zip(take, results):
                    f.set_exception(r) if isinstance(r, Exception) else f.set_result(r)
        return [f.result() for f in futures]

    def _run_batch(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Validate each request (a bad one gets its error and leaves), then one forward per settings group."""
        self._batches += 1
        batch_id = f"{os.getpid()}-{self._batches}"
        out: list[dict[str, Any]] = [{} for _ in items]
        groups: dict[Any, list[tuple[int, Any, str]]] = {}
        for i, params in enumerate(items):
            try:
                request, settings, cache = self._prepare(params)
            except (InvalidRequestError, InvalidEmbeddingError, CheckpointError) as e:
                out[i] = error_for(e)
                continue
            except UserLookupFailed as e:
                out[i] = dict(e.result)
                continue
            groups.setdefault(settings, []).append((i, request, cache))
        for settings, members in groups.items():
            group_start = time.time()
            try:
                results = self.pipe([m[1] for m in members], settings, output_type="np")
            except (InvalidRequestError, InvalidEmbeddingError, CheckpointError) as e:
                for i, _, _ in members:
                    out[i] = error_for(e)
                continue
            for pos, ((i, _, cache), res) in enumerate(zip(members, results)):
                timings = {k: v for k, v in res.timings.items() if k != "batch_size"}
                timings["pipeline_s"] = timings.pop("total_s")
                timings["queue_wait_s"] = max(0.0, group_start - (items[i].get("received_at") or group_start))
                out[i] = {"ok": True, "image": res.image, "seed": res.seed, "user_cache": cache,
                          "batch_size": len(members), "batch_id": batch_id, "batch_position": pos,
                          "settings": vars(settings), "timings": timings}  # fmt: skip
        return out

    def _prepare(self, params: dict[str, Any]):
        from premier.requests import GenerationRequest

        settings = self.pipe.default_settings(
            height=params.get("height"), width=params.get("width"), steps=params.get("steps"), guidance=params.get("guidance")
        ).validate(self.pipe.profile)
        seed = params.get("seed")
        request = GenerationRequest(params.get("prompt"), None, 0 if seed is None else seed).validate_basic()
        request.user, cache = self._user(params)
        self.pipe.validate([request], settings)  # token count, embedding shape
        return request, settings, cache

    def _user(self, params: dict[str, Any]):
        """(embedding or checkpoint user id or None, cache outcome) as the ingress resolved it."""
        import torch

        failed = params.get("user_error")
        if failed is not None:
            raise UserLookupFailed(failed)
        user = params.get("user")
        if user is None:
            return None, "none"
        if isinstance(user, str):
            if user not in self.pipe.user_ids:  # the ingress and this replica serve different checkpoints
                raise UnknownUserError(user)
            return user, "checkpoint"
        if not isinstance(user, torch.Tensor):
            raise InvalidEmbeddingError(f"user embedding must be a tensor, got {type(user).__name__}")
        return user, params.get("user_cache") or "miss"

    def check_health(self) -> None:
        """Ray Serve calls this periodically (the store's health is the ingress's: it alone opens it)."""


class UserLookupFailed(Exception):
    """The ingress could not resolve the request's user; `result` is the error result it made."""

    def __init__(self, result: dict[str, Any]):
        super().__init__(result.get("error"))
        self.result = result


__all__ = ["Generator", "UserLookupFailed", "error_for", "error_result"]
