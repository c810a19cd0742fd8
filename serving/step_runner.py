"""Step-level batching inside a generator replica: requests join and leave the running batch at every step.

The scheduler's state lives on the replica's event loop (no locks); each step's torch work
(admitting joiners: prompt encoding, adapters, noise; one transformer forward; decoding the
finished) runs on the pipeline thread, one step at a time. Between steps the loop drops requests
whose caller went away (their future was cancelled) or whose deadline passed, so their slots free
up at the next step, and answers every finished request at once. A request's failure is its own:
a joiner whose preparation raises leaves with its error, and a forward that raises is retried in
halves so only the request that fails alone is answered with the error (see `failure_of`).

Step facts (occupancy, joins, leaves) are handed to the ingress's metrics inside the next answer,
so each step is counted exactly once without a metrics channel from generators to the ingress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from premier.requests import PreparedBatch
from premier.step_profile import StepProfile
from premier.stepping import DenoiseState, StepEngine
from serving.failures import failure_of, release_memory
from serving.protocol import ImageRequest, ImageResult, Outcome, RequestError
from serving.step_scheduler import StepPlan, StepScheduler

log = logging.getLogger("ray.serve")
STEP_LOG_MAX = 4096
"""Step records kept for the metrics while no request finishes (older ones are dropped)."""

Progress = Callable[[int, int], None]
"""Called on the event loop after each of the request's steps with (steps done, steps in all)."""


@dataclass(eq=False)
class Ticket:
    """A request in the step runner, from submission to its answer."""

    request: ImageRequest
    future: asyncio.Future
    progress: Progress | None = None
    state: DenoiseState | None = None
    joined_at: float | None = None
    first_step_at: float | None = None
    first_occupancy: int = 0

    @property
    def key(self) -> str:
        return self.request.request_id

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.request.settings.height, self.request.settings.width)


@dataclass
class TickOutcome:
    """What the pipeline thread did in one step."""

    errors: dict[Ticket, RequestError] = field(default_factory=dict)
    images: dict[Ticket, np.ndarray] = field(default_factory=dict)
    stepped: list[Ticket] = field(default_factory=list)
    decode_s: float = 0.0


class StepRunner:
    def __init__(
        self,
        engine: StepEngine,
        prepare: Callable[[ImageRequest], PreparedBatch],
        executor: Executor,
        profile: StepProfile,
        tokens_of: Callable[[int, int], int],
    ):
        self.engine = engine
        self.prepare = prepare
        self.executor = executor
        self.profile = profile
        self.tokens_of = tokens_of
        self.scheduler: StepScheduler[Ticket] = StepScheduler(
            cap_for=self.cap_for, cost_of=self.cost_of, quantum=min(min(t.values()) for t in profile.tables.values())
        )
        self.steps_run = 0
        self.dropped: dict[str, int] = {"cancelled": 0, "expired": 0}
        self._step_log: deque[tuple[int, int, int]] = deque(maxlen=STEP_LOG_MAX)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # ------------------------------------------------------------------ costs
    def cap_for(self, bucket: tuple[int, int]) -> int:
        return self.profile.cap_for(self.tokens_of(*bucket))

    def cost_of(self, bucket: tuple[int, int], n: int) -> float:
        return self.profile.step_seconds(self.tokens_of(*bucket), n)

    # ------------------------------------------------------------------ submission
    async def submit(self, request: ImageRequest, progress: Progress | None = None) -> Outcome:
        """Queue the request and wait for its answer; cancelling the caller frees its slot at the next step."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())
        ticket = Ticket(request, loop.create_future(), progress)
        self.scheduler.add(ticket)
        assert self._wake is not None
        self._wake.set()
        return await ticket.future

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            self._drop_gone(time.time())
            plan = self.scheduler.plan()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                outcome = await loop.run_in_executor(self.executor, self._tick, plan)
            except Exception as e:  # a bug outside any forward: the step's requests get a 500 each
                outcome = TickOutcome(errors={t: failure_of(e, t.request) for t in plan.running})
            self._apply(plan, outcome)

    def _drop_gone(self, now: float) -> None:
        """Requests whose caller gave up, or whose deadline passed, leave before the next step."""
        for t in list(self.scheduler.items()):
            if t.future.cancelled():
                self.scheduler.remove(t)
                self.dropped["cancelled"] += 1
            elif t.request.deadline is not None and now > t.request.deadline:
                self.scheduler.remove(t)
                self.dropped["expired"] += 1
                where = "while it ran" if t.state is not None else "before it reached the model"
                t.future.set_result(
                    RequestError(
                        503,
                        f"request {t.request.request_id} was dropped: its deadline passed {where}",
                        reason="expired",
                    )
                )

    # ------------------------------------------------------------------ on the pipeline thread
    def _tick(self, plan: StepPlan[Ticket]) -> TickOutcome:
        out = TickOutcome()
        now = time.time()
        for t in plan.joining:
            t.joined_at = now
            try:
                t.state = self.engine.start(self.prepare(t.request))[0]
            except Exception as e:  # the joiner's own input (or fault): it leaves, the others step
                out.errors[t] = failure_of(e, t.request)
        runnable = [t for t in plan.running if t.state is not None and t not in out.errors]
        self._step(runnable, out)
        out.stepped = [t for t in runnable if t not in out.errors]
        finished = [t for t in out.stepped if t.state is not None and t.state.done]
        started = time.perf_counter()
        self._decode(finished, out)
        out.decode_s = time.perf_counter() - started
        return out

    def _step(self, tickets: list[Ticket], out: TickOutcome) -> None:
        """One forward; when it raises, halves are retried so only a request that fails alone gets the error."""
        if not tickets:
            return
        try:
            self.engine.step([t.state for t in tickets])  # type: ignore[misc] - runnable tickets have states
        except Exception as e:
            if len(tickets) == 1:
                out.errors[tickets[0]] = failure_of(e, tickets[0].request)
                return
            log.warning("a step of %d failed (%s); retrying it in halves", len(tickets), type(e).__name__)
            release_memory(e)
            half = len(tickets) // 2
            self._step(tickets[:half], out)
            self._step(tickets[half:], out)

    def _decode(self, tickets: list[Ticket], out: TickOutcome) -> None:
        if not tickets:
            return
        try:
            images = self.engine.finish([t.state for t in tickets])  # type: ignore[misc]
        except Exception as e:
            if len(tickets) == 1:
                out.errors[tickets[0]] = failure_of(e, tickets[0].request)
                return
            half = len(tickets) // 2
            self._decode(tickets[:half], out)
            self._decode(tickets[half:], out)
            return
        for t, image in zip(tickets, images):
            out.images[t] = image

    # ------------------------------------------------------------------ back on the event loop
    def _apply(self, plan: StepPlan[Ticket], out: TickOutcome) -> None:
        now = time.time()
        self.steps_run += 1
        occupancy = len(out.stepped)
        joins = sum(1 for t in plan.joining if t not in out.errors)
        self._step_log.append((occupancy, joins, len(out.errors) + len(out.images)))
        for t in out.stepped:
            if t.first_step_at is None:
                t.first_step_at, t.first_occupancy = now, occupancy
            if t.progress is not None and t not in out.images and not t.future.done():
                t.progress(t.state.step, t.state.steps)  # type: ignore[union-attr]
        for t, error in out.errors.items():
            self.scheduler.remove(t)
            if not t.future.done():
                t.future.set_result(error)
        for t, image in out.images.items():
            self.scheduler.remove(t)
            if not t.future.done():
                t.future.set_result(self._result(t, image, now, out.decode_s))

    def _result(self, t: Ticket, image: np.ndarray, now: float, decode_s: float) -> ImageResult:
        r, s = t.request, t.state
        assert s is not None and t.joined_at is not None and t.first_step_at is not None
        received = r.received_at or t.joined_at
        timings = dict(s.timings)
        timings.update(
            queue_wait_s=max(0.0, t.joined_at - received),
            first_step_s=max(0.0, t.first_step_at - received),
            decode_s=decode_s,
            pipeline_s=max(0.0, now - t.joined_at),
        )
        steps = tuple(self._step_log)
        self._step_log.clear()
        return ImageResult(
            image=image,
            seed=r.seed,
            settings=r.settings,
            batch_size=t.first_occupancy,
            batch_id=f"{os.getpid()}-step",
            batch_position=-1,  # step-level: batch facts arrive as `step_log`
            timings=timings,
            user_cache=r.user_cache,
            step_log=steps,
        )


__all__ = ["Progress", "StepRunner", "Ticket"]
