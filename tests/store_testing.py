"""Synthetic stage-1 bases for the store tests (no model or checkpoint needed)."""

from __future__ import annotations

import hashlib

import torch

from premier.config import PremierConfig
from premier.users import UserEmbeddingTable


def synthetic_basis(
    num_users: int = 16, tokens: int = 4, user_dim: int = 8, seed: int = 0
) -> tuple[UserEmbeddingTable, str]:
    """A random (K, tokens, user_dim) training-user table and a checkpoint id naming its content."""
    config = PremierConfig(num_user_tokens=tokens, user_dim=user_dim)
    g = torch.Generator().manual_seed(seed)
    weight = torch.empty(num_users, tokens, user_dim).uniform_(
        -config.user_init_range, config.user_init_range, generator=g
    )
    table = UserEmbeddingTable(config, [f"basis{i:04d}" for i in range(num_users)], weight=weight)
    return table, hashlib.sha256(weight.numpy().tobytes() + repr((tokens, user_dim)).encode()).hexdigest()


__all__ = ["synthetic_basis"]
