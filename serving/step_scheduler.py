"""Which requests run the next denoising step: the scheduler of step-level batching (no torch, no Ray).

Requests wait in one FIFO queue per resolution bucket and run in that bucket's running batch,
which they join at a step boundary while it has room (its cap) and leave when they finish, fail,
expire or are cancelled. Each step serves one bucket, chosen by deficit round robin over the
buckets with work, charged by the step's estimated cost: buckets get equal shares of compute
time, so small images are not stuck behind large ones and a large one is never starved. Within a
bucket admission is FIFO and a running request keeps its slot to the end, so a long request
(many steps) is never overtaken into starvation by a stream of short ones.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

K = TypeVar("K", bound=Hashable)


class Schedulable(Protocol):
    @property
    def key(self) -> str: ...

    @property
    def bucket(self) -> Hashable: ...


T = TypeVar("T", bound=Schedulable)


class DeficitRoundRobin(Generic[K]):
    """Deficit round robin over keys (Shreedhar & Varghese): each key's turn adds `quantum` to its credit and
    it is served while its credit covers the cost; a key that goes idle loses its credit."""

    def __init__(self, quantum: float):
        if quantum <= 0:
            raise ValueError("quantum must be positive")
        self.quantum = quantum
        self.deficit: dict[K, float] = {}
        self._order: list[K] = []
        self._pos = 0

    def pick(self, active: Sequence[K], cost: Callable[[K], float]) -> K:
        if not active:
            raise ValueError("no key has work")
        for k in active:
            if k not in self.deficit:
                self.deficit[k] = 0.0
                self._order.append(k)
        live = set(active)
        for k in [k for k in self._order if k not in live]:  # idle keys keep no credit
            i = self._order.index(k)
            self._order.remove(k)
            del self.deficit[k]
            if i < self._pos:
                self._pos -= 1
        quantum = max(self.quantum, max(cost(k) for k in active))  # every key can be served within one round
        while True:
            self._pos %= len(self._order)
            k = self._order[self._pos]
            c = cost(k)
            if self.deficit[k] >= c:
                self.deficit[k] -= c
                return k
            self.deficit[k] += quantum
            self._pos += 1


@dataclass
class StepPlan(Generic[T]):
    """One step: the bucket it serves, who joins its running batch now, who runs (joiners included)."""

    bucket: Hashable
    joining: list[T]
    running: list[T]


@dataclass
class StepScheduler(Generic[T]):
    """Queues and running batches per bucket; `plan` decides the next step, `finish` takes requests out."""

    cap_for: Callable[[Hashable], int]
    """The running-batch cap of a bucket (from the step-time profile)."""
    cost_of: Callable[[Hashable, int], float]
    """Estimated cost of one step of a bucket with n requests (seconds or any consistent unit)."""
    quantum: float = 1.0
    waiting: dict[Hashable, deque[T]] = field(default_factory=dict)
    running: dict[Hashable, list[T]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._drr: DeficitRoundRobin[Hashable] = DeficitRoundRobin(self.quantum)

    def add(self, item: T) -> None:
        self.waiting.setdefault(item.bucket, deque()).append(item)

    def __len__(self) -> int:
        return sum(map(len, self.waiting.values())) + sum(map(len, self.running.values()))

    def items(self) -> Iterator[T]:
        for q in self.waiting.values():
            yield from q
        for r in self.running.values():
            yield from r

    def is_running(self, item: T) -> bool:
        return item in self.running.get(item.bucket, ())

    def plan(self) -> StepPlan[T] | None:
        """The next step, admitting waiting requests of the chosen bucket up to its cap; None when idle."""
        active = [b for b in {**self.waiting, **self.running} if self.waiting.get(b) or self.running.get(b)]
        if not active:
            return None

        def cost(bucket: Hashable) -> float:
            n = len(self.running.get(bucket, ())) + len(self.waiting.get(bucket, ()))
            return self.cost_of(bucket, min(max(n, 1), self.cap_for(bucket)))

        bucket = self._drr.pick(active, cost)
        running = self.running.setdefault(bucket, [])
        queue = self.waiting.get(bucket, deque())
        joining = []
        while queue and len(running) < max(1, self.cap_for(bucket)):
            item = queue.popleft()
            running.append(item)
            joining.append(item)
        return StepPlan(bucket, joining, list(running))

    def remove(self, item: T) -> bool:
        """Take a request out, waiting or running (finished, failed, expired, cancelled); False if absent."""
        running = self.running.get(item.bucket, [])
        if item in running:
            running.remove(item)
            return True
        queue = self.waiting.get(item.bucket)
        if queue is not None and item in queue:
            queue.remove(item)
            return True
        return False


__all__ = ["DeficitRoundRobin", "Schedulable", "StepPlan", "StepScheduler"]
