"""How long one denoising step takes per batch size: the step-level batch caps and step costs come from it.

Batching stops paying once the hardware is saturated: past that batch size a step takes
proportionally longer and every request in it waits longer. The profile records seconds per step
for a few batch sizes at one or more resolutions (measured at start-up or read from a committed
JSON file) and finds, per resolution, the batch size where throughput stops growing; a
resolution it did not measure takes the nearest measured one's saturating work (batch x image
tokens: a compute-bound step's work is roughly proportional to it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from premier.stepping import StepEngine

EMBEDDED_PROFILE = Path(__file__).resolve().parent / "assets" / "step_profile_embedded.json"
"""The embedded model's profile, measured on a 2-core CPU (one torch thread): its servers skip the measurement."""
SATURATION = 0.9
"""A batch size saturates the hardware when it gives 90 % of the best measured samples per second."""


@dataclass(frozen=True)
class StepProfile:
    tables: dict[int, dict[int, float]]
    """Image tokens per sample (one per measured resolution) -> batch size -> seconds per step."""
    max_batch_size: int

    def __post_init__(self) -> None:
        if not self.tables or self.max_batch_size < 1:
            raise ValueError("a step profile needs at least one table and max_batch_size >= 1")
        for tokens, seconds in self.tables.items():
            if tokens < 1 or not seconds:
                raise ValueError("each table needs tokens >= 1 and at least one batch size")
            if any(b < 1 or s <= 0 or not math.isfinite(s) for b, s in seconds.items()):
                raise ValueError("a step profile needs positive batch sizes and finite, positive seconds")

    @classmethod
    def single(cls, tokens: int, seconds: dict[int, float], max_batch_size: int) -> StepProfile:
        return cls({tokens: seconds}, max_batch_size)

    def nearest(self, tokens: int) -> int:
        """The measured resolution closest to `tokens` (by ratio)."""
        return min(self.tables, key=lambda t: abs(math.log(t / max(tokens, 1))))

    def saturation_batch(self, tokens: int | None = None) -> int:
        """At a measured resolution (default: the smallest), the smallest batch size whose throughput reaches
        SATURATION x the best measured: past it, batching more mostly lengthens every request's step. (Robust to
        a noisy measurement, unlike stopping at the first size that gains little.)"""
        seconds = self.tables[min(self.tables) if tokens is None else tokens]
        best = max(b / s for b, s in seconds.items())
        size = min(b for b, s in seconds.items() if b / s >= SATURATION * best)
        return min(size, self.max_batch_size)

    def cap_for(self, tokens: int) -> int:
        """Running-batch cap at `tokens` image tokens per sample: measured there, else the nearest measured
        resolution's saturating amount of work (batch x tokens) in samples of this size."""
        ref = self.nearest(tokens)
        cap = math.floor(self.saturation_batch(ref) * ref / max(tokens, 1))
        return max(1, min(self.max_batch_size, cap))

    def step_seconds(self, tokens: int, n: int) -> float:
        """Estimated seconds of one step of n samples of `tokens` tokens (from the nearest measured resolution)."""
        ref = self.nearest(tokens)
        seconds = self.tables[ref]
        work = n * tokens / ref  # in samples of the measured resolution
        sizes = sorted(seconds)
        for b in sizes:
            if b >= work:
                return seconds[b]
        return seconds[sizes[-1]] * work / sizes[-1]

    def with_max_batch_size(self, max_batch_size: int) -> StepProfile:
        return StepProfile(self.tables, max_batch_size)

    def to_json(self) -> str:
        tables = {str(t): {str(b): s for b, s in sec.items()} for t, sec in self.tables.items()}
        return json.dumps({"tables": tables, "max_batch_size": self.max_batch_size}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StepProfile:
        d = json.loads(text)
        try:
            tables = {int(t): {int(b): float(s) for b, s in sec.items()} for t, sec in d["tables"].items()}
            return cls(tables, int(d["max_batch_size"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"not a step profile: {e}") from None

    @classmethod
    def load(cls, path: str | Path) -> StepProfile:
        return cls.from_json(Path(path).read_text())


def image_tokens(pipe: Any, height: int, width: int) -> int:
    """Packed latent tokens of an image (FLUX: (H / 16) x (W / 16))."""
    multiple = pipe.profile.size_multiple
    return (height // multiple) * (width // multiple)


def measure_step_profile(
    engine: StepEngine,
    sizes: tuple[int, ...] = (1, 2, 4, 8),
    max_batch_size: int = 8,
    repeats: int = 5,
    resolutions: tuple[int, ...] | None = None,
) -> StepProfile:
    """Time one step per batch size at each square resolution (default: the model's default size): the fastest
    of `repeats` after a warm-up (other work on the machine only ever adds time, so the minimum is the
    capacity's best estimate)."""
    from premier.requests import GenerationRequest

    pipe = engine.pipe
    sizes = tuple(b for b in sizes if b <= max_batch_size) or (1,)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
    tables: dict[int, dict[int, float]] = {}
    for size in resolutions or (pipe.profile.default_size,):
        settings = pipe.default_settings(height=size, width=size)
        seconds = {}
        for b in sizes:
            batch = pipe.prepare([GenerationRequest("profile", None, i) for i in range(b)], settings)
            states = engine.start(batch)
            times = []
            for _ in range(repeats + 1):
                for s in states:
                    s.step = 0
                sync()
                t0 = time.perf_counter()
                engine.step(states)
                sync()
                times.append(time.perf_counter() - t0)
            seconds[b] = min(times[1:])
        tables[image_tokens(pipe, size, size)] = seconds
    return StepProfile(tables, max_batch_size)


__all__ = ["EMBEDDED_PROFILE", "StepProfile", "SATURATION", "image_tokens", "measure_step_profile"]
