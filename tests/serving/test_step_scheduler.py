"""The step scheduler alone: caps, FIFO within a bucket, fair shares across buckets, no starvation."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from serving.step_scheduler import DeficitRoundRobin, StepScheduler


@dataclass(eq=False)
class Item:
    key: str
    bucket: tuple[int, int]
    steps: int
    done: int = 0


def _scheduler(cap: int = 4, cost=None) -> StepScheduler[Item]:
    return StepScheduler(cap_for=lambda b: cap, cost_of=cost or (lambda b, n: b[0] * b[1] / 1024), quantum=1.0)


def _run(s: StepScheduler[Item], arrivals: dict[int, list[Item]], limit: int = 10_000) -> tuple[list[str], list]:
    """Simulate: arrivals before each step, every running item advances one step, finished ones leave."""
    finished, plans = [], []
    for step in range(limit):
        for item in arrivals.get(step, []):
            s.add(item)
        plan = s.plan()
        if plan is None:
            if step > max(arrivals, default=0):
                break
            continue
        plans.append(plan)
        for item in plan.running:
            item.done += 1
            if item.done == item.steps:
                s.remove(item)
                finished.append(item.key)
    return finished, plans


def test_joins_up_to_the_cap_and_fifo_within_a_bucket():
    s = _scheduler(cap=2)
    items = [Item(str(i), (32, 32), steps=2) for i in range(5)]
    for it in items:
        s.add(it)
    finished, plans = _run(s, {})
    assert [i.key for i in plans[0].joining] == ["0", "1"] and len(plans[0].running) == 2
    assert plans[1].joining == [] and plans[1].running == [items[0], items[1]]  # the batch went on, full
    assert [i.key for i in plans[2].joining] == ["2", "3"] and [i.key for i in plans[4].joining] == ["4"]
    assert finished == ["0", "1", "2", "3", "4"]
    assert all(len(p.running) <= 2 for p in plans)
    assert len(s) == 0 and s.plan() is None


def test_a_long_request_is_not_starved_by_a_stream_of_short_ones():
    s = _scheduler(cap=2)
    long = Item("long", (32, 32), steps=28)
    arrivals = {0: [Item("s0", (32, 32), 2), long]}
    for step in range(1, 200):  # a new short request every step, forever
        arrivals[step] = [Item(f"s{step}", (32, 32), 2)]
    finished, plans = _run(s, arrivals, limit=400)
    assert "long" in finished
    # It joined in the first plan (FIFO) and kept its slot: it ran on 28 consecutive steps.
    ran = [i for i, p in enumerate(plans) if long in p.running]
    assert ran == list(range(ran[0], ran[0] + 28)) and ran[0] == 0


def test_buckets_share_compute_time_fairly_and_small_images_are_not_stuck():
    """A 4x-costlier bucket and a cheap one, both always busy: equal time each, so the cheap one runs ~4x the steps."""
    s = _scheduler(cap=4, cost=lambda b, n: {(64, 64): 4.0, (32, 32): 1.0}[b])
    arrivals = {
        0: [Item(f"big{i}", (64, 64), 1000) for i in range(4)] + [Item(f"small{i}", (32, 32), 1000) for i in range(4)]
    }
    _, plans = _run(s, arrivals, limit=500)
    served = Counter(p.bucket for p in plans)
    time_big, time_small = 4.0 * served[(64, 64)], 1.0 * served[(32, 32)]
    assert time_small == pytest.approx(time_big, rel=0.05)
    # Arriving behind a busy large bucket, a small request runs its first step within a round.
    s2 = _scheduler(cap=4, cost=lambda b, n: {(64, 64): 4.0, (32, 32): 1.0}[b])
    busy = {0: [Item(f"big{i}", (64, 64), 1000) for i in range(4)], 10: [Item("small", (32, 32), 1)]}
    finished, plans2 = _run(s2, busy, limit=30)
    first_small = next(i for i, p in enumerate(plans2) if p.bucket == (32, 32))
    assert "small" in finished and first_small <= 10 + 2


def test_remove_from_waiting_or_running_frees_the_slot():
    s = _scheduler(cap=1)
    a, b = Item("a", (32, 32), 5), Item("b", (32, 32), 5)
    s.add(a)
    s.add(b)
    assert s.plan().running == [a] and s.is_running(a) and not s.is_running(b)
    assert s.remove(b) and not s.remove(b)  # cancelled while waiting
    assert s.remove(a)  # cancelled while running: its slot frees at the next step
    c = Item("c", (32, 32), 1)
    s.add(c)
    assert s.plan().joining == [c]


def test_deficit_round_robin_rules():
    with pytest.raises(ValueError):
        DeficitRoundRobin(0)
    drr: DeficitRoundRobin[str] = DeficitRoundRobin(1.0)
    with pytest.raises(ValueError):
        drr.pick([], lambda k: 1.0)
    picks = [drr.pick(["a", "b"], lambda k: 1.0) for _ in range(6)]
    assert Counter(picks) == {"a": 3, "b": 3}
    drr.pick(["a"], lambda k: 1.0)
    assert "b" not in drr.deficit  # an idle key keeps no credit
