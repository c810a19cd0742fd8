"""User embeddings: the training-user table and checks every embedding passes before use.

A user is a (num_user_tokens, user_dim) tensor. Training users live in a table that stage 1
learns; a new user is either a coefficient vector over that table (its rows are the basis)
or a direct embedding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from premier.config import PremierConfig
from premier.errors import InvalidEmbeddingError, InvalidRequestError, UnknownUserError

MAX_USER_ID_BYTES = 256
_USER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@:+-]*")


def validate_user_id(user_id: object) -> str:
    """Ids are used in URLs, file names and SQL: keep them to a safe, bounded alphabet."""
    if not isinstance(user_id, str) or not user_id:
        raise InvalidRequestError("user_id", "must be a non-empty string")
    if not user_id.isascii():
        raise InvalidRequestError("user_id", "has characters outside [A-Za-z0-9._@:+-]")
    if len(user_id) > MAX_USER_ID_BYTES:
        raise InvalidRequestError("user_id", f"is {len(user_id)} bytes; at most {MAX_USER_ID_BYTES} allowed")
    if not _USER_ID.fullmatch(user_id) or ".." in user_id:
        raise InvalidRequestError(
            "user_id",
            f"{user_id!r} has characters outside [A-Za-z0-9._@:+-] (or starts with one of ._@:+-, or holds '..')",
        )
    return user_id


def validate_user_embedding(
    embedding: torch.Tensor, config: PremierConfig, name: str = "user embedding"
) -> torch.Tensor:
    """Shape (N, U) or (B, N, U) as the config says, and every value finite."""
    if not isinstance(embedding, torch.Tensor):
        raise InvalidEmbeddingError(f"{name} must be a tensor, got {type(embedding).__name__}")
    if tuple(embedding.shape[-2:]) != config.user_shape or embedding.dim() not in (2, 3):
        raise InvalidEmbeddingError(
            f"{name} has shape {tuple(embedding.shape)}; this checkpoint expects {config.user_shape}"
        )
    if not embedding.is_floating_point():
        raise InvalidEmbeddingError(f"{name} must be floating point, got {embedding.dtype}")
    finite = torch.isfinite(embedding)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidEmbeddingError(f"{name} holds {bad} NaN or infinite values")
    return embedding


class UserEmbeddingTable(nn.Module):
    """The K training users' embeddings, (K, N, U), with their string ids."""

    def __init__(self, config: PremierConfig, user_ids: Sequence[str], weight: torch.Tensor | None = None):
        super().__init__()
        ids = [validate_user_id(u) for u in user_ids]
        if len(set(ids)) != len(ids):
            raise InvalidRequestError("user_ids", "training-user ids must be unique")
        self.config = config
        self.user_ids: list[str] = ids
        self._index = {u: i for i, u in enumerate(ids)}
        shape = (len(ids), *config.user_shape)
        if weight is None:
            weight = torch.empty(shape).uniform_(-config.user_init_range, config.user_init_range)
        elif tuple(weight.shape) != shape:
            raise InvalidEmbeddingError(f"user table has shape {tuple(weight.shape)}; expected {shape}")
        self.weight = nn.Parameter(weight)

    def __len__(self) -> int:
        return len(self.user_ids)

    def __contains__(self, user_id: object) -> bool:
        return user_id in self._index

    def index_of(self, user_id: str) -> int:
        try:
            return self._index[user_id]
        except KeyError:
            raise UnknownUserError(user_id, self.user_ids) from None

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        """Rows for a batch of user indices: (B,) -> (B, N, U)."""
        return self.weight[indices]

    def get(self, user_id: str) -> torch.Tensor:
        return self.weight[self.index_of(user_id)]

    def materialise(self, coefficients: torch.Tensor) -> torch.Tensor:
        """E = sum_k c_k E_k for (K,) -> (N, U) or (B, K) -> (B, N, U)."""
        if coefficients.shape[-1] != len(self):
            raise InvalidEmbeddingError(
                f"coefficient vector has length {coefficients.shape[-1]}; the basis has {len(self)} users"
            )
        if not bool(torch.isfinite(coefficients).all()):
            raise InvalidEmbeddingError("coefficient vector holds NaN or infinite values")
        return torch.einsum("...k,knu->...nu", coefficients.to(self.weight.dtype), self.weight)

    def bytes_per_user(self, dtype: torch.dtype | None = None) -> int:
        dtype = dtype or self.weight.dtype
        return self.config.num_user_tokens * self.config.user_dim * torch.empty((), dtype=dtype).element_size()
