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
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from ray import serve

from premier.logs import quiet_libraries
from premier.requests import GenerationRequest, GenerationSettings, PreparedBatch
from serving.config import ServeConfig
from serving.failures import expired, failure_of, release_memory
from serving.protocol import ImageRequest, ImageResult, ModelInfo, Outcome, Progress, RequestError

if TYPE_CHECKING:
    from premier.pipeline import PremierPipeline
    from serving.step_runner import StepRunner

log = logging.getLogger("ray.serve")
MAX_FORMING_BATCHES = 1024  # batches Ray Serve may hand over at once; each holds >= 1 request, so never reached


class _MergedBatchesWarning(logging.Filter):
    """Drops Ray's warning that max_batch_size x max_concurrent_batches exceeds max_ongoing_requests: by design here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "max_concurrent_batches" not in record.getMessage()


class Generator:
    """Holds the pipeline; `generate` is what the ingress calls, once per image."""

    def __init__(self, args: dict[str, Any], pipe: PremierPipeline | None = None):
        """`pipe`: a pipeline built by the caller (benchmarks and tests in one process); default: from `args`."""
        from premier.pipeline import PremierPipeline

        self.config = c = ServeConfig.model_validate(args)
        if c.torch_threads:
            torch.set_num_threads(c.torch_threads)
        quiet_libraries()
        logging.getLogger("ray.serve").addFilter(_MergedBatchesWarning())
        self.pipe = pipe or PremierPipeline.load(
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
        self._cancelled: set[str] = set()  # request ids whose callers gave up while they waited
        self._pipeline_lock = asyncio.Lock()
        self.pipe(self._warmup_requests(), self.pipe.default_settings(), output_type="np")  # first call pays lazy init
        self.stepper = self._step_runner() if c.batching == "step" else None
        log.info(
            "generator ready: pid %d, %s-level batching, max_batch_size %d", os.getpid(), c.batching, c.max_batch_size
        )

    def _step_runner(self) -> StepRunner:
        """Step-level batching: the engine pads running batches to a few sizes (compiled graphs are reused) and
        the per-bucket caps come from a step-time profile: the configured file, the packaged one of the embedded
        model (measured on a 2-core CPU), else measured now."""
        from premier.step_profile import EMBEDDED_PROFILE, StepProfile, image_tokens, measure_step_profile
        from premier.stepping import StepEngine
        from serving.step_runner import StepRunner

        c = self.config
        pads = tuple(b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < c.max_batch_size) + (c.max_batch_size,)
        engine = StepEngine(self.pipe, pad_sizes=pads, always_deltas=True)
        packaged = EMBEDDED_PROFILE if self.pipe.embedded and not c.step_profile_sizes else None
        if c.step_profile or packaged:
            profile = StepProfile.load(c.step_profile or packaged).with_max_batch_size(c.max_batch_size)
        else:
            sizes = dict.fromkeys([self.pipe.profile.default_size, *c.step_profile_sizes])
            profile = measure_step_profile(
                engine, sizes=pads, max_batch_size=c.max_batch_size, resolutions=tuple(sizes)
            )
        log.info(
            "step profile: %s s per step by image tokens and batch size; caps %s",
            profile.tables,
            {t: profile.cap_for(t) for t in profile.tables},
        )
        self.step_profile = profile
        return StepRunner(engine, self._prepare, self._executor, profile, lambda h, w: image_tokens(self.pipe, h, w))

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

    def stats(self) -> dict[str, Any]:
        """What this replica holds now: for operators and tests (requests waiting and running, steps run, drops)."""
        if self.stepper is None:
            return {"batching": "request", "waiting": len(self._waiting), "batches": self._batches}
        sched = self.stepper.scheduler
        return {
            "batching": "step",
            "waiting": sum(map(len, sched.waiting.values())),
            "running": sum(map(len, sched.running.values())),
            "steps_run": self.stepper.steps_run,
            "dropped": dict(self.stepper.dropped),
            "caps": {t: self.step_profile.cap_for(t) for t in self.step_profile.tables},
        }

    # ------------------------------------------------------------------ generation
    async def generate(self, request: ImageRequest) -> Outcome:
        if self.stepper is not None:
            return await self.stepper.submit(request)  # a cancelled caller frees its slot at the next step
        try:
            return await self._batch(request)
        except asyncio.CancelledError:  # the caller gave up (client gone): drop it before it reaches the model
            self._cancelled.add(request.request_id)
            raise

    async def generate_stream(self, request: ImageRequest) -> AsyncIterator[Progress | Outcome]:
        """Progress after each step (step-level batching; request-level has none), then the answer.

        Called through a streaming handle; a caller that goes away closes this generator, which cancels
        the request (its slot frees at the next step).
        """
        events: asyncio.Queue[Progress] = asyncio.Queue()
        if self.stepper is not None:
            work = asyncio.ensure_future(self.stepper.submit(request, lambda k, n: events.put_nowait(Progress(k, n))))
        else:
            work = asyncio.ensure_future(self.generate(request))
        try:
            while not work.done():
                next_event = asyncio.ensure_future(events.get())
                await asyncio.wait({next_event, work}, return_when=asyncio.FIRST_COMPLETED)
                if next_event.done():
                    yield next_event.result()
                else:
                    next_event.cancel()
            while not events.empty():
                yield events.get_nowait()
            yield work.result()
        finally:
            if not work.done():
                work.cancel()

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
                except Exception as e:  # a bug outside any forward: every request of that batch gets a 500
                    results = [failure_of(e, p) for p, _ in take]
                for (_, f), r in zip(take, results, strict=True):
                    f.set_result(r)
        return [f.result() for f in futures]

    def _run_batch(self, items: list[ImageRequest]) -> list[Outcome]:
        """Drop expired requests, resolve each one's user tokens (a bad one gets its error and leaves), then one
        forward per settings group."""
        self._batches += 1
        batch_id = f"{os.getpid()}-{self._batches}"
        out: list[Outcome | None] = [None] * len(items)
        groups: dict[Any, list[tuple[int, PreparedBatch]]] = {}
        now = time.time()
        for i, item in enumerate(items):
            if item.request_id in self._cancelled:
                self._cancelled.discard(item.request_id)
                out[i] = RequestError(499, f"request {item.request_id} was cancelled by its client", reason="cancelled")
                continue
            if item.deadline is not None and now > item.deadline:
                out[i] = expired(item)
                continue
            try:
                prepared = self._prepare(item)
            except Exception as e:  # whatever a request's preparation raises is that request's own failure
                out[i] = failure_of(e, item)
                continue
            groups.setdefault(item.settings, []).append((i, prepared))
        for settings, members in groups.items():
            self._forward(items, members, settings, batch_id, out)
        return out  # type: ignore[return-value] - every slot was filled

    def _forward(
        self,
        items: list[ImageRequest],
        members: list[tuple[int, PreparedBatch]],
        settings: GenerationSettings,
        batch_id: str,
        out: list[Outcome | None],
    ) -> None:
        """One forward for `members`; when it raises, its halves are retried, so only a request that fails alone
        gets an error and the others are served (each image is the same in any batch)."""
        group_start = time.time()
        try:
            results = self.pipe(PreparedBatch.merge([p for _, p in members]), output_type="np")
        except Exception as e:
            if len(members) == 1:
                i = members[0][0]
                out[i] = failure_of(e, items[i])
                return
            log.warning("a batch of %d failed (%s); retrying it in halves", len(members), type(e).__name__)
            release_memory(e)
            half = len(members) // 2
            self._forward(items, members[:half], settings, batch_id, out)
            self._forward(items, members[half:], settings, batch_id, out)
            return
        for pos, ((i, _), res) in enumerate(zip(members, results, strict=True)):
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
