"""Shared benchmark plumbing: robust timing, machine labels and JSON results.

Every benchmark compares against a baseline measured in the same run and reports the ratio,
because the machines are noisy; absolute times are kept for context.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_label() -> str:
    """'cpu-2core', 'h100', ...: the folder name results are committed under."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0).lower()
        for card in ("h200", "h100", "a100", "l40s", "a10g", "l4"):
            if card in name:
                return card
        return name.replace(" ", "-")
    return f"cpu-{os.cpu_count()}core"


def environment() -> dict[str, Any]:
    return {
        "machine": machine_label(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def time_fn(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median and spread of `repeats` calls after `warmup` calls, in seconds."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "repeats": repeats,
    }


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, dict[str, float]]:
    """Time several variants round-robin so that machine noise hits them alike."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_fn(fn, repeats=1, warmup=0)["median_s"])
    return {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v), "repeats": repeats}
        for k, v in samples.items()
    }


def write_result(name: str, payload: dict[str, Any], out: str | Path | None = None) -> Path:
    path = Path(out) if out else RESULTS / machine_label() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
