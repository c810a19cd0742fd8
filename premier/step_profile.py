"""How long one denoising step takes per batch size: the step-level batch caps and step costs come from it.

Batching stops paying once the hardware is saturated: past that batch size a step takes
proportionally longer and every request in it waits longer. The profile records seconds per step
at a reference resolution for a few batch sizes (measured at start-up or read from a committed
JSON file), finds the batch size where throughput stops growing, and scales it to other
resolutions by image tokens (a step's work is roughly proportional to batch x tokens).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from premier.stepping import StepEngine

EMBEDDED_PROFILE = Path(__file__).resolve().parent / "assets" / "step_profile_embedded.json"
"""The embedded model's profile, measured on a 2-core CPU (one torch thread): its servers skip the measurement."""
THROUGHPUT_GAIN = 1.10
"""A batch size pays when it gives at least 10 % more samples per second than the one below it."""


@dataclass(frozen=True)
class StepProfile:
    tokens: int
    """Image tokens per sample at the measured resolution."""
    seconds: dict[int, float]
    """Batch size -> seconds per step."""
    max_batch_size: int

    def __post_init__(self) -> None:
        if not self.seconds or any(b < 1 or s <= 0 or not math.isfinite(s) for b, s in self.seconds.items()):
            raise ValueError("a step profile needs positive batch sizes and finite, positive seconds")
        if self.tokens < 1 or self.max_batch_size < 1:
            raise ValueError("tokens and max_batch_size must be >= 1")

    @property
    def saturation_batch(self) -> int:
        """The largest measured batch size reached through sizes each giving >= THROUGHPUT_GAIN x the throughput
        of the one before: past it, batching more only lengthens every request's step."""
        sizes = sorted(self.seconds)
        best = sizes[0]
        for prev, b in zip(sizes, sizes[1:]):
            if b / self.seconds[b] < THROUGHPUT_GAIN * prev / self.seconds[prev]:
                break
            best = b
        return min(best, self.max_batch_size)

    def cap_for(self, tokens: int) -> int:
        """Running-batch cap at `tokens` image tokens per sample: the saturating amount of work, in samples."""
        cap = math.floor(self.saturation_batch * self.tokens / max(tokens, 1))
        return max(1, min(self.max_batch_size, cap))

    def step_seconds(self, tokens: int, n: int) -> float:
        """Estimated seconds of one step of n samples of `tokens` tokens (nearest measured size at or above)."""
        work = n * tokens / self.tokens  # in samples at the reference resolution
        sizes = sorted(self.seconds)
        for b in sizes:
            if b >= work:
                return self.seconds[b]
        return self.seconds[sizes[-1]] * work / sizes[-1]

    def to_json(self) -> str:
        d = asdict(self)
        d["seconds"] = {str(k): v for k, v in self.seconds.items()}
        return json.dumps(d, indent=2)

    @classmethod
    def from_json(cls, text: str) -> StepProfile:
        d = json.loads(text)
        try:
            seconds = {int(k): float(v) for k, v in d["seconds"].items()}
            return cls(tokens=int(d["tokens"]), seconds=seconds, max_batch_size=int(d["max_batch_size"]))
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
    engine: StepEngine, sizes: tuple[int, ...] = (1, 2, 4, 8), max_batch_size: int = 8, repeats: int = 5
) -> StepProfile:
    """Time one step at the model's default resolution for each batch size: the fastest of `repeats` after a
    warm-up (other work on the machine only ever adds time, so the minimum is the capacity's best estimate)."""
    from premier.requests import GenerationRequest

    pipe = engine.pipe
    settings = pipe.default_settings()
    sizes = tuple(b for b in sizes if b <= max_batch_size) or (1,)
    seconds = {}
    for b in sizes:
        batch = pipe.prepare([GenerationRequest("profile", None, i) for i in range(b)], settings)
        states = engine.start(batch)
        times = []
        for _ in range(repeats + 1):
            for s in states:
                s.step = 0
            sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            engine.step(states)
            sync()
            times.append(time.perf_counter() - t0)
        seconds[b] = min(times[1:])
    return StepProfile(image_tokens(pipe, settings.height, settings.width), seconds, max_batch_size)


__all__ = ["EMBEDDED_PROFILE", "StepProfile", "THROUGHPUT_GAIN", "image_tokens", "measure_step_profile"]
