"""UserStore: every servable user, bound to one stage-1 checkpoint (its basis and id).

A facade over the store's parts, each holding one concern:

    store/database.py       the SQLite database: the truth, with a change sequence
    store/records.py        Records: put/get/delete/list and materialised embeddings (versioned LRU)
    store/index_keeper.py   IndexKeeper: the FAISS index, caught up from the database's change
                            sequence before every search (so other processes' writes are seen and
                            a crash can never leave the two disagreeing), snapshots and checks

Checkpoint rule: the store may hold records of other stage-1 checkpoints (e.g. users fitted
before a retrain); they stay readable with `get`, are never indexed, and `materialise` /
`nearest` refuse them with CheckpointMismatchError. `put` refuses them outright.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidRequestError
from premier.user_record import UserRecord, is_checkpoint_id
from premier.users import UserEmbeddingTable
from store.concurrency import VersionedLRU
from store.database import Database, UserSummary
from store.index import RECALL_TARGET, VectorIndex
from store.index_keeper import INDEX_DIR, REBUILD_FRACTION, SPOT_CHECKS, IndexKeeper
from store.projection import BasisProjection
from store.records import MAX_LIST, Records

MAX_K = 1000


class UserStore:
    """Durable user records with nearest-preference search; safe for concurrent readers and one writer.

    Threads may share one instance; other processes open their own instance on the same folder.
    """

    def __init__(
        self,
        path: str | Path,
        basis: UserEmbeddingTable,
        checkpoint_id: str,
        *,
        cache_size: int = 1024,
        exact_max: int | None = None,
        recall_target: float = RECALL_TARGET,
        busy_timeout_s: float = 30.0,
        snapshot_on_close: bool = True,
        create: bool = True,
    ):
        if not is_checkpoint_id(checkpoint_id):
            raise InvalidRequestError("checkpoint_id", f"must be a 64-character hex SHA-256, got {checkpoint_id!r}")
        self.path = Path(path)
        self.basis = basis
        self.checkpoint_id = checkpoint_id
        self.snapshot_on_close = snapshot_on_close
        self.db = Database(self.path, busy_timeout_s=busy_timeout_s, create=create)
        self.records = Records(self.db, basis, checkpoint_id, cache_size)
        self.keeper = IndexKeeper(self.path, self.db, basis, checkpoint_id, exact_max, recall_target)

    @classmethod
    def open(cls, path: str | Path, checkpoint: str | Path | None = None, **kwargs: Any) -> UserStore:
        """A store bound to a Premier checkpoint folder (default: the embedded demo checkpoint)."""
        from premier.served import load_served_basis

        basis, ckpt = load_served_basis(checkpoint, verify=True)
        return cls(path, basis, ckpt, **kwargs)

    def __enter__(self) -> UserStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Persist the index snapshot if this process moved it forward, then close the database."""
        if self.keeper.closed:
            return
        try:
            self.keeper.close(snapshot=self.snapshot_on_close)
        finally:
            self.db.close()

    # The parts' state, as tests and operators look at it.
    @property
    def _cache(self) -> VersionedLRU[str, torch.Tensor]:
        return self.records.cache

    @property
    def _index(self) -> VectorIndex | None:
        return self.keeper.index

    @property
    def recall_target(self) -> float:
        return self.keeper.recall_target

    # ------------------------------------------------------------------ records
    def put(self, record: UserRecord) -> UserRecord:
        """Insert or replace one user atomically and durably; returns it as stored (with its times)."""
        return self.records.put(record)

    def put_many(self, records: Iterable[UserRecord], keep_times: bool = False) -> int:
        """Insert or replace many users in ONE transaction: all are stored, or (on any bad one) none."""
        return self.records.put_many(records, keep_times=keep_times)

    def get(self, user_id: str) -> UserRecord:
        return self.records.get_stored(user_id).record

    def delete(self, user_id: str, missing_ok: bool = False) -> bool:
        """Remove a user from the database (the index follows at its next catch-up); True if it existed."""
        return self.records.delete(user_id, missing_ok=missing_ok)

    def list_users(self, after: str | None = None, limit: int = 100) -> list[UserSummary]:
        """Up to `limit` users in id order, starting after the id `after` (for paging)."""
        return self.records.list_users(after, limit)

    def __contains__(self, user_id: object) -> bool:
        return self.records.contains(user_id)

    def __len__(self) -> int:
        return self.db.count()

    def iter_records(self) -> Iterator[UserRecord]:
        """Every record, from one consistent snapshot of the database."""
        return self.records.iter_records()

    # ------------------------------------------------------------------ embeddings
    def materialise(self, user_id: str) -> torch.Tensor:
        """The user's (N, U) embedding: coefficients times the basis, or the direct embedding (cached)."""
        return self.records.materialise_cached(user_id)[0]

    def materialise_cached(self, user_id: str) -> tuple[torch.Tensor, bool]:
        """`materialise`, plus whether the embedding came from the cache (servers count hits per lookup)."""
        return self.records.materialise_cached(user_id)

    # ------------------------------------------------------------------ nearest
    @property
    def projection(self) -> BasisProjection:
        return self.keeper.projection

    def nearest(
        self, query: str | torch.Tensor | np.ndarray | Sequence[float], k: int = 10, exact: bool = False
    ) -> list[tuple[str, float]]:
        """The k users whose embeddings are most similar (cosine) to a stored user's or a given vector.

        `query` is a user id (that user is left out of its own answer), a (K,) coefficient vector,
        or an (N, U) embedding. `exact` scans every vector even when the index is approximate.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequestError("k", f"must be an integer in 1..{MAX_K}, got {k!r}")
        exclude = -1
        if isinstance(query, str):
            stored = self.records.get_stored(query)
            rec = self.records.servable(stored.record)
            vec = self.keeper.vectors([(stored.uid, rec.mode, list(rec.vector.shape), rec.vector.numpy())])[1]
            exclude = stored.uid
            what = f"user {query!r}"
        else:
            vec = self.keeper.query_vector(query)
            what = "the query vector"
        if not float(np.linalg.norm(vec)) > 0:
            raise InvalidRequestError(
                "query", f"{what} has a zero embedding (or none in the basis span): similarity is undefined"
            )
        return self.keeper.nearest(vec, k, exclude, exact)

    # ------------------------------------------------------------------ the index
    def ensure_index(self) -> None:
        """Make the index ready to serve (load or build it, then catch up): call at start to pay this once."""
        self.keeper.sync()

    @property
    def exact_max(self) -> int:
        """Below this many users the index is exact (brute force); above it, IVF."""
        return self.keeper.exact_max

    def rebuild_index(self, persist: bool = True) -> None:
        """Build the index from scratch from the database and install it (persisted: the next start loads it)."""
        self.keeper.rebuild(persist)

    def check_index(self) -> list[str]:
        """Full consistency check (O(N)): every servable database row is in the index with the right
        vector, and nothing else is. Returns the problems found (empty: consistent). For tests and ops."""
        return self.keeper.check()

    def snapshot(self) -> Path | None:
        """Write the current index to disk so the next start loads it instead of rebuilding."""
        return self.keeper.snapshot()

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        n_all, n_servable = self.db.count(), self.db.count(self.checkpoint_id)
        cache = self.records.cache
        out: dict[str, Any] = {
            "path": str(self.path),
            "checkpoint_id": self.checkpoint_id,
            "users": n_all,
            "servable_users": n_servable,
            "other_checkpoint_users": n_all - n_servable,
            "change_seq": self.db.current_seq(),
            "database_bytes": self.db.disk_bytes(),
            "cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses},
        }
        index = self.keeper.stats()
        if index is not None:
            out["index"] = index
        return out


# INDEX_DIR, REBUILD_FRACTION, SPOT_CHECKS and MAX_LIST live with their parts; re-exported for old importers.
__all__ = ["UserStore", "UserSummary", "INDEX_DIR", "MAX_K", "MAX_LIST", "REBUILD_FRACTION", "SPOT_CHECKS"]
