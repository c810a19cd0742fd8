"""Generation requests and their validation, shared by the pipeline, the CLI and the servers.

A batch shares its `GenerationSettings` (size, steps, guidance): those fix the tensor shapes
and the denoising schedule, so requests that agree on them can run in one forward.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from premier.errors import InvalidRequestError
from premier.users import validate_user_id


@dataclass(frozen=True)
class ModelProfile:
    """What a request may ask of a given base model, and its defaults."""

    max_sequence_length: int
    size_multiple: int
    min_size: int
    max_size: int
    default_size: int
    default_steps: int
    default_guidance: float
    max_steps: int = 200
    max_guidance: float = 30.0


MAX_PROMPT_CHARS = 20_000
# Lone surrogates are not Unicode text; control characters other than tab and newlines are not prompt text.
_NOT_TEXT = re.compile(r"[\ud800-\udfff]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class GenerationSettings:
    height: int
    width: int
    steps: int
    guidance: float

    def validate(self, profile: ModelProfile) -> GenerationSettings:
        for name in ("height", "width"):
            v = getattr(self, name)
            _check_int(name, v)
            if v % profile.size_multiple:
                raise InvalidRequestError(name, f"{v} is not a multiple of {profile.size_multiple}")
            if not profile.min_size <= v <= profile.max_size:
                raise InvalidRequestError(name, f"{v} is outside [{profile.min_size}, {profile.max_size}]")
        _check_int("steps", self.steps)
        if not 1 <= self.steps <= profile.max_steps:
            raise InvalidRequestError("steps", f"{self.steps} is outside [1, {profile.max_steps}]")
        if isinstance(self.guidance, bool) or not isinstance(self.guidance, (int, float)):
            raise InvalidRequestError("guidance", f"must be a number, got {type(self.guidance).__name__}")
        if not math.isfinite(self.guidance) or not 0.0 <= self.guidance <= profile.max_guidance:
            raise InvalidRequestError("guidance", f"{self.guidance} is outside [0, {profile.max_guidance}]")
        return self


@dataclass
class GenerationRequest:
    prompt: str
    user: str | torch.Tensor | None = None
    """A user id, an explicit (N, U) embedding, or None for plain FLUX."""
    seed: int = 0

    @property
    def user_label(self) -> str | None:
        if self.user is None or isinstance(self.user, str):
            return self.user
        return "<embedding>"

    def validate_basic(self) -> GenerationRequest:
        """Checks that need no model: types, prompt not empty, seed range, user id syntax."""
        if not isinstance(self.prompt, str):
            raise InvalidRequestError("prompt", f"must be a string, got {type(self.prompt).__name__}")
        if not self.prompt.strip():
            raise InvalidRequestError("prompt", "is empty")
        if len(self.prompt) > MAX_PROMPT_CHARS:
            raise InvalidRequestError("prompt", f"has {len(self.prompt)} characters; at most {MAX_PROMPT_CHARS}")
        bad = _NOT_TEXT.search(self.prompt)
        if bad is not None:
            what = "a lone surrogate (not valid Unicode)" if bad.group() >= "\ud800" else "a control character"
            raise InvalidRequestError("prompt", f"holds {what} U+{ord(bad.group()):04X} at position {bad.start()}")
        _check_int("seed", self.seed)
        if not 0 <= self.seed <= MAX_SEED:
            raise InvalidRequestError("seed", f"{self.seed} is outside [0, 2**63 - 1]")
        if isinstance(self.user, str):
            validate_user_id(self.user)
        elif self.user is not None and not isinstance(self.user, torch.Tensor):
            raise InvalidRequestError(
                "user", f"must be a user id, an embedding tensor or None, not {type(self.user).__name__}"
            )
        return self


@dataclass
class PreparedBatch:
    """Requests that passed validation once, with their user tokens (N, U) or None: what the denoising loop runs."""

    requests: list[GenerationRequest]
    settings: GenerationSettings
    user_tokens: list[torch.Tensor | None]

    @classmethod
    def merge(cls, batches: list[PreparedBatch]) -> PreparedBatch:
        """One batch from several prepared with the same settings (a server batches requests prepared one by one)."""
        settings = batches[0].settings
        if any(b.settings != settings for b in batches):
            raise ValueError("only batches with the same settings can be merged")
        return cls([r for b in batches for r in b.requests], settings, [t for b in batches for t in b.user_tokens])


def count_prompt_tokens(tokenizer: Any, prompt: str) -> int:
    """T5 tokens of a prompt (the model's own tokenizer, no truncation)."""
    return len(tokenizer(prompt, truncation=False).input_ids)


def check_prompt_tokens(tokenizer: Any, prompt: str, limit: int) -> int:
    """The token count, or InvalidRequestError when the model would have to truncate the prompt."""
    n = count_prompt_tokens(tokenizer, prompt)
    if n > limit:
        raise InvalidRequestError("prompt", f"has {n} tokens; this model accepts at most {limit}")
    return n


@dataclass
class GenerationResult:
    image: Any
    """A PIL image, or a (H, W, 3) uint8 numpy array with output_type='np'."""
    prompt: str
    user: str | None
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase for the whole batch this request ran in, plus its size."""


def _check_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequestError(name, f"must be an integer, got {type(v).__name__} {v!r}")
