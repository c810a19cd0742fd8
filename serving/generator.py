"""The Generator deployment: one PremierPipeline per replica, many users per forward.

It receives `serving.protocol.ImageRequest`s that the ingress validated and whose users it
resolved (the ingress is the one serving process that opens the user store; generators never do,
so their replicas run on any node), and answers each with an `ImageResult` or a `RequestError`,
never an exception.

A request goes straight into ONE `@serve.batch` queue (the event loop does no per-request work,
so arrivals reach it even while a forward holds the GIL). Batches Ray Serve forms while the
pipeline is busy are merged, so a forward takes everything waiting, up to max_batch_size (see
`_batch`). On the pipeline thread each request's user is turned into tokens (a bad one gets its
own error and leaves: it never fails the batch); the rest are grouped by `GenerationSettings`
(size, steps and guidance fix the tensor shapes and schedule) with one pipeline call per group,
different users and prompts together. One queue rather than one per settings key: the common
case (one setting) fills batches fastest; a mixed batch costs one forward per distinct setting.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ray import serve

from premier.logs import quiet_libraries
from premier.requests import GenerationRequest, PreparedBatch
from serving.config import ServeConfig
from serving.protocol import REQUEST_ERRORS, ImageRequest, ImageResult, ModelInfo, Outcome, error_for

log = logging.getLogger("ray.serve")
MAX_FORMING_BATCHES = 1024  # batches Ray Serve may hand over at once; each holds >= 1 request, so never reached


class _MergedBatchesWarning(logging.Filter):
    """Drops Ray's warning that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


class Generator:
    """Holds the pipeline; `generate` is what the ingress calls, once per image."""

    def __init__(self, args: dict[str, Any]):
        import torch

        from premier.pipeline import PremierPipeline

        self.config = c = ServeConfig.model_validate(args)
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        quiet_libraries()
        logging.getLogger("ray.serve").addFilter(_MergedBatchesWarning())
        self.pipe = PremierPipeline.load(
            model=c.model,
            checkpoint=c.checkpoint,
            device=c.device,
            dtype=getattr(torch, c.dtype) if c.dtype else None,
            compile=c.compile,
            quantize=c.quantize,
        )
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="premier-pipeline")  # the pipeline is not re-entrant
        self._batch.set_max_batch_size(c.max_batch_size)
        self._batch.set_batch_wait_timeout_s(c.batch_wait_timeout_s)
        self._batches = 0
        self._waiting: list[tuple[ImageRequest, asyncio.Future]] = []
        self._pipeline_lock = asyncio.Lock()
        self.pipe(self._warmup_requests(), self.pipe.default_settings(), output_type="np")  # first call pays lazy init
        log.info("generator ready: pid %d, max_batch_size %d", os.getpid(), c.max_batch_size)

    def _warmup_requests(self) -> list[GenerationRequest]:
        return [GenerationRequest("warm up", None, 0)]

    # ------------------------------------------------------------------ info
    def info(self) -> ModelInfo:
        """What the ingress needs to know about the model (it does not load one), its tokenizer included."""
        return ModelInfo(
            pid=os.getpid(),
            checkpoint_id=self.pipe.checkpoint_id,
            profile=self.pipe.profile,
            training_users=self.pipe.user_ids,
            max_batch_size=self.config.max_batch_size,
            tokenizer=self.pipe.flux_pipe.tokenizer_2,
        )

    def pid(self) -> int:
        return os.getpid()

    # ------------------------------------------------------------------ generation
    async def generate(self, request: ImageRequest) -> Outcome:
        return await self._batch(request)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002, max_concurrent_batches=MAX_FORMING_BATCHES)
    async def _batch(self, items: list[ImageRequest]) -> list[Outcome]:
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

    def _run_batch(self, items: list[ImageRequest]) -> list[Outcome]:
        """Resolve each request's user tokens (a bad one gets its error and leaves), then one forward per settings group."""
        self._batches += 1
        batch_id = f"{os.getpid()}-{self._batches}"
        out: list[Outcome | None] = [None] * len(items)
        groups: dict[Any, list[tuple[int, PreparedBatch]]] = {}
        for i, item in enumerate(items):
            try:
                prepared = self._prepare(item)
            except REQUEST_ERRORS as e:
                out[i] = error_for(e)
                continue
            groups.setdefault(item.settings, []).append((i, prepared))
        for settings, members in groups.items():
            group_start = time.time()
            try:
                results = self.pipe(PreparedBatch.merge([p for _, p in members]), output_type="np")
            except REQUEST_ERRORS as e:
                for i, _ in members:
                    out[i] = error_for(e)
                continue
            for pos, ((i, _), res) in enumerate(zip(members, results)):
                timings = {k: v for k, v in res.timings.items() if k != "batch_size"}
                timings["pipeline_s"] = timings.pop("total_s")
                timings["queue_wait_s"] = max(0.0, group_start - (items[i].received_at or group_start))
                out[i] = ImageResult(
                    image=res.image,
                    seed=res.seed,
                    settings=settings,
                    batch_size=len(members),
                    batch_id=batch_id,
                    batch_position=pos,
                    timings=timings,
                    user_cache=items[i].user_cache,
                )
        return out  # type: ignore[return-value] - every slot was filled

    def _prepare(self, item: ImageRequest) -> PreparedBatch:
        """The request as a one-request batch: the ingress checked everything but the user's tokens."""
        user = item.user
        if isinstance(user, str) and user not in self.pipe.user_ids:  # ingress and replica serve different checkpoints
            from premier.errors import UnknownUserError

            raise UnknownUserError(user)
        return self.pipe.prepare([GenerationRequest(item.prompt, user, item.seed)], item.settings, checked=True)

    def check_health(self) -> None:
        """Ray Serve calls this periodically (the store's health is the ingress's: it alone opens it)."""


__all__ = ["Generator"]
