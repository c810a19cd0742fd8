"""How a user row is stored and read back: the row types, the vector and fit encodings, and their checks on read.

Vectors are raw little-endian float32 bytes with their shape (JSON) alongside; fit metadata is
JSON with sorted keys, at most MAX_FIT_BYTES. A row read back is checked (vector length against
its shape, finiteness, fit is JSON) and damage raises StoreError naming the user.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidRequestError
from premier.user_record import UserRecord
from store.errors import StoreError

MAX_FIT_BYTES = 64 * 1024  # fit metadata is a few numbers; refuse megabytes of it

RECORD_COLUMNS = (
    "u.uid, u.seq, u.user_id, u.mode, c.checkpoint_id, u.shape, u.fit, u.created_at, u.updated_at, u.vector"
)
"""The columns `stored_record` reads, from `users u JOIN checkpoints c ON c.cid = u.cid`."""


@dataclass(frozen=True)
class StoredRecord:
    """A record as stored: the record itself plus its row id (the index id) and its change number."""

    record: UserRecord
    uid: int
    seq: int


@dataclass(frozen=True)
class UserSummary:
    """What `list` returns: everything but the vector."""

    user_id: str
    mode: str
    checkpoint_id: str
    shape: tuple[int, ...]
    fit: dict[str, Any]
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


def trusted_record(
    user_id: str,
    mode: str,
    vector: torch.Tensor,
    checkpoint_id: str,
    fit: dict[str, Any],
    created_at: float,
    updated_at: float,
) -> UserRecord:
    """A UserRecord for a row read back from the database, without re-running its validation.

    Every row was validated by UserRecord (and the store's checks) before it was written, and the
    length and finiteness of the vector are checked on read, so re-validating on every `get`
    (regex, JSON round trip, tensor checks: ~30 us) only added latency to the hottest call.
    """
    record = object.__new__(UserRecord)
    for name, value in (
        ("user_id", user_id),
        ("mode", mode),
        ("vector", vector),
        ("checkpoint_id", checkpoint_id),
        ("fit", fit),
        ("created_at", created_at),
        ("updated_at", updated_at),
    ):
        object.__setattr__(record, name, value)
    return record


def vector_bytes(v: torch.Tensor) -> bytes:
    return v.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def shape_json(v: torch.Tensor) -> str:
    return json.dumps(list(v.shape))


def fit_json(record: UserRecord) -> str:
    """The record's fit metadata as stored; more than MAX_FIT_BYTES is refused (InvalidRequestError)."""
    fit = json.dumps(record.fit, sort_keys=True)
    if len(fit) > MAX_FIT_BYTES:
        raise InvalidRequestError(
            "fit", f"user {record.user_id!r}: fit metadata is {len(fit)} bytes; at most {MAX_FIT_BYTES}"
        )
    return fit


def decode_vector(blob: bytes, shape_json: str, where: str) -> np.ndarray:
    """float32 array from a stored blob; a length that disagrees with the shape is corruption."""
    try:
        shape = tuple(int(s) for s in json.loads(shape_json))
    except (ValueError, TypeError) as e:
        raise StoreError(f"{where}: stored shape {shape_json!r} is malformed") from e
    if len(blob) != 4 * math.prod(shape):
        raise StoreError(f"{where}: stored vector has {len(blob)} bytes, shape {shape} needs {4 * math.prod(shape)}")
    return np.frombuffer(blob, dtype="<f4").reshape(shape)


def stored_record(row: tuple) -> StoredRecord:
    """A StoredRecord from a row of RECORD_COLUMNS, checked (StoreError if it is damaged)."""
    uid, seq, user_id, mode, ckpt, shape, fit, created, updated, blob = row
    where = f"stored user {user_id!r}"
    arr = decode_vector(blob, shape, where)
    if not np.isfinite(arr).all():
        raise StoreError(f"{where} is damaged: its stored vector holds NaN or infinite values")
    try:
        fit_dict = json.loads(fit)
    except ValueError as e:
        raise StoreError(f"{where} is damaged: fit metadata is not JSON ({e})") from e
    return StoredRecord(
        trusted_record(user_id, mode, torch.from_numpy(arr.copy()), ckpt, fit_dict, created, updated),
        int(uid),
        int(seq),
    )


__all__ = [
    "StoredRecord",
    "UserSummary",
    "MAX_FIT_BYTES",
    "RECORD_COLUMNS",
    "trusted_record",
    "vector_bytes",
    "shape_json",
    "fit_json",
    "decode_vector",
    "stored_record",
]
