"""A servable user: what stage 2 writes, what the store keeps and what serving materialises.

A record is either coefficients over the stage-1 training users (the default, a K-vector) or a
direct embedding (N x U). Either way it names the stage-1 checkpoint it was fitted against,
because coefficients mean nothing over another basis and a direct embedding was fitted to
another checkpoint's adapters.

On disk a record is one safetensors file: the tensor ("coefficients" or "embedding") plus
string metadata (user id, mode, checkpoint id, fit metadata as JSON, created/updated times).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from premier.config import PremierConfig
from premier.errors import CheckpointMismatchError, InvalidEmbeddingError, InvalidRequestError
from premier.files import atomic_save_safetensors, read_safetensors
from premier.users import UserEmbeddingTable, validate_user_embedding, validate_user_id

RecordMode = Literal["coefficients", "direct"]
MODES: tuple[str, ...] = ("coefficients", "direct")
RECORD_FORMAT = "premier-user"
RECORD_FORMAT_VERSION = "1"
_TENSOR_NAME = {"coefficients": "coefficients", "direct": "embedding"}


def is_checkpoint_id(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class UserRecord:
    user_id: str
    mode: RecordMode
    vector: torch.Tensor  # (K,) coefficients or (N, U) embedding, float32, CPU
    checkpoint_id: str
    fit: dict[str, Any] = field(default_factory=dict)  # images, steps, final_loss, seconds, seed, ...
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        validate_user_id(self.user_id)
        if self.mode not in MODES:
            raise InvalidRequestError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not is_checkpoint_id(self.checkpoint_id):
            raise InvalidRequestError(
                "checkpoint_id", f"must be a 64-character hex SHA-256, got {self.checkpoint_id!r}"
            )
        v = self.vector
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise InvalidEmbeddingError(f"user {self.user_id!r}: the {self.mode} must be a floating-point tensor")
        want_dim = 1 if self.mode == "coefficients" else 2
        if v.dim() != want_dim or v.numel() == 0:
            raise InvalidEmbeddingError(
                f"user {self.user_id!r}: {self.mode} must be a non-empty {want_dim}-D tensor, got shape {tuple(v.shape)}"
            )
        # Checked after the cast: a finite float64 beyond float32's range would become inf when stored.
        v = v.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(v).all()):
            raise InvalidEmbeddingError(
                f"user {self.user_id!r}: the {self.mode} hold NaN or infinite values (or values beyond float32 range)"
            )
        object.__setattr__(self, "vector", v)
        for name in ("created_at", "updated_at"):
            t = getattr(self, name)
            if not isinstance(t, (int, float)) or not math.isfinite(t):
                raise InvalidRequestError(name, f"must be a finite unix time, got {t!r}")
        try:
            json.dumps(self.fit)
        except (TypeError, ValueError) as e:
            raise InvalidRequestError("fit", f"fit metadata must be JSON-serialisable: {e}") from None

    # ------------------------------------------------------------------ checks and use
    def check_against(self, config: PremierConfig, checkpoint_id: str, num_basis_users: int) -> None:
        """Refuse a record that cannot be used with this stage-1 checkpoint."""
        if self.checkpoint_id != checkpoint_id:
            raise CheckpointMismatchError(self.user_id, self.checkpoint_id, checkpoint_id)
        if self.mode == "coefficients" and self.vector.shape[0] != num_basis_users:
            raise InvalidEmbeddingError(
                f"user {self.user_id!r} has {self.vector.shape[0]} coefficients; the basis has {num_basis_users} users"
            )
        if self.mode == "direct":
            validate_user_embedding(self.vector, config, name=f"user {self.user_id!r} embedding")

    def materialise(self, basis: UserEmbeddingTable, checkpoint_id: str) -> torch.Tensor:
        """The (N, U) user embedding: coefficients times the basis, or the direct embedding."""
        self.check_against(basis.config, checkpoint_id, len(basis))
        if self.mode == "direct":
            return self.vector.to(basis.weight.dtype)
        with torch.no_grad():
            return basis.materialise(self.vector)

    def touched(self, **changes: Any) -> UserRecord:
        """A copy with changes and a fresh updated_at (created_at kept)."""
        return replace(self, **changes, updated_at=time.time())

    # ------------------------------------------------------------------ files
    def metadata(self) -> dict[str, str]:
        return {
            "format": RECORD_FORMAT,
            "format_version": RECORD_FORMAT_VERSION,
            "user_id": self.user_id,
            "mode": self.mode,
            "checkpoint_id": self.checkpoint_id,
            "fit": json.dumps(self.fit, sort_keys=True),
            "created_at": repr(float(self.created_at)),
            "updated_at": repr(float(self.updated_at)),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_save_safetensors({_TENSOR_NAME[self.mode]: self.vector}, path, metadata=self.metadata())
        return path

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str], source: str = "record") -> UserRecord:
        if meta.get("format") != RECORD_FORMAT:
            raise InvalidRequestError(
                "record", f"{source} is not a Premier user record (format {meta.get('format')!r})"
            )
        mode = meta.get("mode", "")
        if mode not in MODES:
            raise InvalidRequestError("record", f"{source} has unknown mode {mode!r}")
        name = _TENSOR_NAME[mode]
        if name not in tensors:
            raise InvalidRequestError("record", f"{source} has no {name!r} tensor")
        try:
            fit = json.loads(meta.get("fit", "{}"))
            created, updated = float(meta["created_at"]), float(meta["updated_at"])
        except (KeyError, ValueError) as e:
            raise InvalidRequestError("record", f"{source} has malformed metadata: {e}") from None
        return cls(meta.get("user_id", ""), mode, tensors[name], meta.get("checkpoint_id", ""), fit, created, updated)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> UserRecord:
        path = Path(path)
        if not path.is_file():
            raise InvalidRequestError("record", f"user record {path} does not exist")
        tensors, meta = read_safetensors(path, error=lambda msg: InvalidRequestError("record", f"user record {msg}"))
        return cls.from_parts(tensors, meta, source=str(path))


__all__ = ["UserRecord", "RecordMode", "MODES", "is_checkpoint_id"]
