"""User records of one stage-1 checkpoint: CRUD on the database and materialised embeddings.

The database (store/database.py) is the truth; this is the record side of `UserStore`. Records of
other checkpoints stay readable (`get`), `put` refuses them, and `materialise` refuses them with
CheckpointMismatchError. Materialised embeddings are cached in an LRU keyed by the row's change
number, so an update (from any process) invalidates them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from premier.errors import InvalidRequestError, UnknownUserError
from premier.user_record import UserRecord
from premier.users import UserEmbeddingTable, validate_user_id
from store.concurrency import VersionedLRU
from store.database import Database, StoredRecord, UserSummary

MAX_LIST = 10_000


class Records:
    """Put/get/delete/list of user records, and their (cached) embeddings against one basis."""

    def __init__(self, db: Database, basis: UserEmbeddingTable, checkpoint_id: str, cache_size: int):
        self.db = db
        self.basis = basis
        self.checkpoint_id = checkpoint_id
        self.cache: VersionedLRU[str, torch.Tensor] = VersionedLRU(cache_size)

    def servable(self, record: UserRecord) -> UserRecord:
        """The record, if it is a UserRecord fitted against this basis and checkpoint (else the core's error)."""
        if not isinstance(record, UserRecord):
            raise InvalidRequestError("record", f"must be a UserRecord, got {type(record).__name__}")
        record.check_against(self.basis.config, self.checkpoint_id, len(self.basis))
        return record

    def put(self, record: UserRecord) -> UserRecord:
        self.servable(record)
        self.db.put_many([record])
        self.cache.invalidate(record.user_id)
        stored = self.db.get(record.user_id)
        assert stored is not None
        return stored.record

    def put_many(self, records: Iterable[UserRecord], keep_times: bool = False) -> int:
        touched: list[str] = []

        def checked() -> Iterator[UserRecord]:
            for i, r in enumerate(records):
                try:
                    self.servable(r)
                except InvalidRequestError as e:
                    raise e.located(f"records[{i}].") from None
                touched.append(r.user_id)
                yield r

        n, _ = self.db.put_many(checked(), keep_times=keep_times)
        for u in touched:
            self.cache.invalidate(u)
        return n

    def get_stored(self, user_id: str) -> StoredRecord:
        validate_user_id(user_id)
        stored = self.db.get(user_id)
        if stored is None:
            raise UnknownUserError(user_id)
        return stored

    def delete(self, user_id: str, missing_ok: bool = False) -> bool:
        validate_user_id(user_id)
        existed = self.db.delete(user_id)
        self.cache.invalidate(user_id)
        if not existed and not missing_ok:
            raise UnknownUserError(user_id)
        return existed

    def list_users(self, after: str | None = None, limit: int = 100) -> list[UserSummary]:
        if after is not None:
            validate_user_id(after)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidRequestError("limit", f"must be an integer in 1..{MAX_LIST}, got {limit!r}")
        return self.db.list(after, limit)

    def contains(self, user_id: object) -> bool:
        return isinstance(user_id, str) and self.db.version(user_id) is not None

    def iter_records(self) -> Iterator[UserRecord]:
        for stored in self.db.iter_records():
            yield stored.record

    def materialise_cached(self, user_id: str) -> tuple[torch.Tensor, bool]:
        """The user's (N, U) embedding (a copy) and whether it came from the cache."""
        validate_user_id(user_id)
        version = self.db.version(user_id)
        if version is None:
            self.cache.invalidate(user_id)
            raise UnknownUserError(user_id)
        hit = self.cache.get(user_id, version)
        if hit is not None:
            return hit.clone(), True
        stored = self.get_stored(user_id)
        emb = stored.record.materialise(self.basis, self.checkpoint_id)
        self.cache.put(user_id, stored.seq, emb)
        return emb.clone(), False


__all__ = ["Records", "MAX_LIST"]
