"""The time budget: run rows in order, and when the rest no longer fits, skip the least important.

A row is one measurement (a kernel table row, a step, a generation, a check). Before each row
the scheduler adds up the estimates of it and every remaining row, plus each shared set-up
(building a model, quantizing it) once, and while that overshoots the budget it sets aside the
remaining row of lowest importance (the latest of equal importance). If the row whose turn it is
was set aside, it is skipped and listed under "skipped" with the reason; the others are weighed
again at their turn. Estimates are functions, re-evaluated every time, so they improve as
measurements come in. A row that raises is listed as skipped with the error and the run goes on.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Estimate = Callable[[], float]


@dataclass
class Row:
    name: str
    priority: int
    """1 = most important; a larger number is dropped first."""
    run: Callable[[], Any]
    estimate: Estimate
    setups: list[tuple[str, Estimate]] = field(default_factory=list)
    """Shared set-up this row needs, by key: counted once in the total, done by whichever row runs
    first; its estimate returns 0 once it is done."""
    unavailable: str | None = None
    """Why the row cannot run at all here (a missing package, no GPU): skipped with this reason, never timed."""


class Scheduler:
    def __init__(self, budget_s: float, report: Any, clock: Callable[[], float] = time.perf_counter):
        self.budget_s = budget_s
        self.report = report
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining_cost(self, rows: list[Row]) -> float:
        setups: dict[str, float] = {}
        for r in rows:
            for key, est in r.setups:
                if key not in setups:
                    setups[key] = est()
        return sum(r.estimate() for r in rows) + sum(setups.values())

    def kept(self, rows: list[Row]) -> list[Row]:
        """The rows that fit: drop the least important (the latest of equal importance) until the rest does."""
        keep = list(rows)
        while keep and self.elapsed() + self.remaining_cost(keep) > self.budget_s:
            keep.remove(max(keep, key=lambda r: (r.priority, keep.index(r))))
        return keep

    def run(self, rows: list[Row]) -> None:
        remaining = []
        for r in rows:
            if r.unavailable:
                self.report.skip(r.name, r.unavailable)
            else:
                remaining.append(r)
        while remaining:
            # Decided row by row: a row further ahead is weighed again when its turn comes, with the
            # estimates that the measurements before it have corrected.
            row = remaining.pop(0)
            if row not in self.kept([row, *remaining]):
                self.report.skip(
                    row.name,
                    f"time budget: {self.elapsed():.0f} s of {self.budget_s:.0f} s used, this and the more important "
                    f"rest estimated at {self.remaining_cost([r for r in self.kept([row, *remaining])] + [row]):.0f} s "
                    f"(importance {row.priority})",
                )
                continue
            t0 = self.clock()
            try:
                row.run()
            except Exception as e:  # one broken measurement must not cost the others
                detail = traceback.format_exc(limit=-3).strip().splitlines()
                self.report.skip(row.name, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                print("\n".join(detail[-6:]), flush=True)
            print(f"  ({row.name}: {self.clock() - t0:.1f} s; {self.elapsed():.0f} s of {self.budget_s:.0f} s)")
