"""UserStore: every servable user, bound to one stage-1 checkpoint (its basis and id).

The database (store/database.py) is the truth. The FAISS index (store/index.py) is per-process
derived state: loaded from a snapshot or rebuilt on first use, and caught up from the database's
change sequence before every search, so a reader process sees other processes' writes and a
crash can never leave the two disagreeing. Materialised embeddings are cached in an LRU keyed by
the row's change number, so an update (from any process) invalidates them.

Checkpoint rule: the store may hold records of other stage-1 checkpoints (e.g. users fitted
before a retrain); they stay readable with `get`, are never indexed, and `materialise` /
`nearest` refuse them with CheckpointMismatchError. `put` refuses them outright.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidEmbeddingError, InvalidRequestError, UnknownUserError
from premier.user_record import UserRecord, is_checkpoint_id
from premier.users import UserEmbeddingTable, validate_user_id
from store.concurrency import ReadWriteLock, VersionedLRU
from store.database import Database, StoredRecord, UserSummary, decode_vector
from store.errors import StoreError
from store.index import RECALL_TARGET, VectorIndex, default_exact_max
from store.projection import BasisProjection, normalise

log = logging.getLogger(__name__)

INDEX_DIR = "index"
MAX_K = 1000
MAX_LIST = 10_000
REBUILD_FRACTION = 0.5  # catch up from a snapshot unless more than this share of rows changed since
SPOT_CHECKS = 8


class UserStore:
    """Durable user records with nearest-preference search; safe for concurrent readers and one writer.

    Threads may share one instance; other processes open their own instance on the same folder.
    """

    def __init__(self, path: str | Path, basis: UserEmbeddingTable, checkpoint_id: str, *, cache_size: int = 1024,
                 exact_max: int | None = None, recall_target: float = RECALL_TARGET, busy_timeout_s: float = 30.0,
                 snapshot_on_close: bool = True, create: bool = True):  # fmt: skip
        if not is_checkpoint_id(checkpoint_id):
            raise InvalidRequestError("checkpoint_id", f"must be a 64-character hex SHA-256, got {checkpoint_id!r}")
        self.path = Path(path)
        self.basis = basis
        self.checkpoint_id = checkpoint_id
        self._exact_max = exact_max  # None: chosen from the index dimension (default_exact_max)
        self.recall_target = float(recall_target)
        self.snapshot_on_close = snapshot_on_close
        self.db = Database(self.path, busy_timeout_s=busy_timeout_s, create=create)
        self._cache: VersionedLRU[str, torch.Tensor] = VersionedLRU(cache_size)
        self._projection: BasisProjection | None = None
        self._index: VectorIndex | None = None
        self._index_seq = -1  # database change number the in-memory index reflects
        self._snapshot_seq = -1  # change number of the snapshot on disk that matches it (if any)
        self._rw = ReadWriteLock()  # searches share it; index mutation takes it alone
        self._sync_lock = threading.RLock()  # one loader / catcher-up / installer at a time
        self._rebuilder: threading.Thread | None = None
        self._closed = False

    @classmethod
    def open(cls, path: str | Path, checkpoint: str | Path | None = None, **kwargs: Any) -> "UserStore":
        """A store bound to a Premier checkpoint folder (default: the embedded demo checkpoint)."""
        from premier.checkpoint import PremierModel

        if checkpoint is None:
            from premier.models.embedded import build_embedded_premier

            model = build_embedded_premier()
            ckpt = model.checkpoint_id()
        else:
            model, ckpt = PremierModel.load(checkpoint)
        return cls(path, model.users, ckpt, **kwargs)

    def __enter__(self) -> "UserStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Persist the index snapshot if this process moved it forward, then close the database."""
        if self._closed:
            return
        if self._rebuilder is not None:
            self._rebuilder.join()
        try:
            if self.snapshot_on_close and self._index is not None and self._index_seq != self._snapshot_seq:
                self.snapshot()
        finally:
            self._closed = True
            self.db.close()

    # ------------------------------------------------------------------ records
    def _servable(self, record: UserRecord) -> UserRecord:
        if not isinstance(record, UserRecord):
            raise InvalidRequestError("record", f"must be a UserRecord, got {type(record).__name__}")
        record.check_against(self.basis.config, self.checkpoint_id, len(self.basis))
        return record

    def put(self, record: UserRecord) -> UserRecord:
        """Insert or replace one user atomically and durably; returns it as stored (with its times)."""
        self._servable(record)
        self.db.put_many([record])
        self._cache.invalidate(record.user_id)
        stored = self.db.get(record.user_id)
        assert stored is not None
        return stored.record

    def put_many(self, records: Iterable[UserRecord], keep_times: bool = False) -> int:
        """Insert or replace many users in ONE transaction: all are stored, or (on any bad one) none."""
        touched: list[str] = []

        def checked() -> Iterator[UserRecord]:
            for i, r in enumerate(records):
                try:
                    self._servable(r)
                except InvalidRequestError as e:
                    raise e.located(f"records[{i}].") from None
                touched.append(r.user_id)
                yield r

        n, _ = self.db.put_many(checked(), keep_times=keep_times)
        for u in touched:
            self._cache.invalidate(u)
        return n

    def get(self, user_id: str) -> UserRecord:
        return self._get_stored(user_id).record

    def _get_stored(self, user_id: str) -> StoredRecord:
        validate_user_id(user_id)
        stored = self.db.get(user_id)
        if stored is None:
            raise UnknownUserError(user_id)
        return stored

    def delete(self, user_id: str, missing_ok: bool = False) -> bool:
        """Remove a user from the database (the index follows at its next catch-up); True if it existed."""
        validate_user_id(user_id)
        existed = self.db.delete(user_id)
        self._cache.invalidate(user_id)
        if not existed and not missing_ok:
            raise UnknownUserError(user_id)
        return existed

    def list_users(self, after: str | None = None, limit: int = 100) -> list[UserSummary]:
        """Up to `limit` users in id order, starting after the id `after` (for paging)."""
        if after is not None:
            validate_user_id(after)
        if not isinstance(limit, int) or not 1 <= limit <= MAX_LIST:
            raise InvalidRequestError("limit", f"must be an integer in 1..{MAX_LIST}, got {limit!r}")
        return self.db.list(after, limit)

    def __contains__(self, user_id: object) -> bool:
        return isinstance(user_id, str) and self.db.version(user_id) is not None

    def __len__(self) -> int:
        return self.db.count()

    def iter_records(self) -> Iterator[UserRecord]:
        """Every record, from one consistent snapshot of the database."""
        for stored in self.db.iter_records():
            yield stored.record

    # ------------------------------------------------------------------ embeddings
    def materialise(self, user_id: str) -> torch.Tensor:
        """The user's (N, U) embedding: coefficients times the basis, or the direct embedding (cached)."""
        return self.materialise_cached(user_id)[0]

    def materialise_cached(self, user_id: str) -> tuple[torch.Tensor, bool]:
        """`materialise`, plus whether the embedding came from the cache (servers count hits per lookup)."""
        validate_user_id(user_id)
        version = self.db.version(user_id)
        if version is None:
            self._cache.invalidate(user_id)
            raise UnknownUserError(user_id)
        hit = self._cache.get(user_id, version)
        if hit is not None:
            return hit.clone(), True
        stored = self._get_stored(user_id)
        emb = stored.record.materialise(self.basis, self.checkpoint_id)
        self._cache.put(user_id, stored.seq, emb)
        return emb.clone(), False

    # ------------------------------------------------------------------ nearest
    @property
    def projection(self) -> BasisProjection:
        if self._projection is None:
            self._projection = BasisProjection(self.basis)
        return self._projection

    def nearest(self, query: str | torch.Tensor | np.ndarray | Sequence[float], k: int = 10,
                exact: bool = False) -> list[tuple[str, float]]:  # fmt: skip
        """The k users whose embeddings are most similar (cosine) to a stored user's or a given vector.

        `query` is a user id (that user is left out of its own answer), a (K,) coefficient vector,
        or an (N, U) embedding. `exact` scans every vector even when the index is approximate.
        """
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise InvalidRequestError("k", f"must be an integer in 1..{MAX_K}, got {k!r}")
        exclude = -1
        if isinstance(query, str):
            stored = self._get_stored(query)
            rec = self._servable(stored.record)
            vec = self._vectors([(stored.uid, rec.mode, list(rec.vector.shape), rec.vector.numpy())])[1]
            exclude = stored.uid
            what = f"user {query!r}"
        else:
            vec = self._query_vector(query)
            what = "the query vector"
        if not float(np.linalg.norm(vec)) > 0:
            raise InvalidRequestError("query", f"{what} has a zero embedding (or none in the basis span): similarity is undefined")
        normalise(vec)
        self._sync_index()
        index = self._index
        assert index is not None
        with self._rw.read():
            sims, ids = index.search(vec, k + (exclude >= 0), exact=exact, single_thread=not exact)
        pairs = [(int(i), float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0 and i != exclude][:k]
        names = self.db.user_ids_for(i for i, _ in pairs)  # a user deleted meanwhile drops out
        return [(names[i], max(-1.0, min(1.0, s))) for i, s in pairs if i in names]

    def _query_vector(self, query: Any) -> np.ndarray:
        try:
            q = query.detach().to("cpu", torch.float32).numpy() if isinstance(query, torch.Tensor) else np.asarray(query, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise InvalidEmbeddingError(f"query vector is not numeric: {e}") from None
        if not np.isfinite(q).all():
            raise InvalidEmbeddingError("query vector holds NaN or infinite values")
        K, shape = len(self.basis), tuple(self.basis.config.user_shape)
        if q.ndim == 1 and q.shape[0] == K:
            return self.projection.coefficients(q[None])
        if tuple(q.shape) == shape:
            return self.projection.embeddings(q[None])
        raise InvalidEmbeddingError(
            f"query vector has shape {tuple(q.shape)}; expected ({K},) coefficients or a {shape} embedding"
        )

    def _vectors(self, rows: Sequence[tuple[int, str, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(uids, unnormalised index vectors) for rows of (uid, mode, shape, vector bytes or array)."""
        K, n_emb = len(self.basis), math.prod(self.basis.config.user_shape)
        coef_ids, coefs, dir_ids, dirs = [], [], [], []
        for uid, mode, shape, vec in rows:
            arr = vec if isinstance(vec, np.ndarray) else decode_vector(vec, shape, f"stored user #{uid}")
            if mode == "coefficients" and arr.size == K:
                coef_ids.append(uid), coefs.append(arr.reshape(K))
            elif mode == "direct" and arr.size == n_emb:
                dir_ids.append(uid), dirs.append(arr.reshape(n_emb))
            else:  # put() validates against the basis, so only damage gets here
                log.warning("not indexing stored user #%d: %s of %d values does not fit this basis", uid, mode, arr.size)
        parts = []
        if coefs:
            parts.append((coef_ids, self.projection.coefficients(np.stack(coefs))))
        if dirs:
            parts.append((dir_ids, self.projection.embeddings(np.stack(dirs))))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.projection.dim), np.float32)
        ids = np.concatenate([np.asarray(i, np.int64) for i, _ in parts])
        return ids, np.concatenate([v for _, v in parts])

    # ------------------------------------------------------------------ the index
    @property
    def _index_dir(self) -> Path:
        return self.path / INDEX_DIR

    def _snapshot_key(self) -> dict[str, str]:
        return {"store_uuid": str(self.db.store_uuid), "checkpoint_id": self.checkpoint_id,
                "projection": self.projection.fingerprint}  # fmt: skip

    def ensure_index(self) -> None:
        """Make the index ready to serve (load or build it, then catch up): call at start to pay this once."""
        self._sync_index()

    def _sync_index(self) -> None:
        if self._closed:
            raise StoreError(f"user store {self.path} is closed")
        if self._index is not None and self.db.current_seq() == self._index_seq:
            return  # the common case: one tiny read
        with self._sync_lock:
            if self._index is None:
                self._open_index()
            else:
                self._catch_up()

    def _open_index(self) -> None:
        loaded = VectorIndex.load(self._index_dir, self._snapshot_key())
        if loaded is not None:
            index, manifest = loaded
            seq, db_seq = int(manifest["seq"]), self.db.current_seq()
            reason = None
            if seq > db_seq:
                reason = f"the snapshot (change {seq}) is ahead of the database (change {db_seq})"
            elif self.db.count_changed_since(seq) > max(10_000, REBUILD_FRACTION * index.ntotal):
                reason = "most of the store changed since the snapshot"
            if reason is None:
                self._index, self._index_seq, self._snapshot_seq = index, seq, seq
                reason = self._catch_up(verify=True)
                if reason is None:
                    reason = self._policy_reason()
                if reason is None:
                    return
            log.warning("rebuilding the user index of %s: %s", self.path, reason)
            self._index = None
        self.rebuild_index()

    @property
    def exact_max(self) -> int:
        """Below this many users the index is exact (brute force); above it, IVF."""
        return int(self._exact_max) if self._exact_max is not None else default_exact_max(self.projection.dim)

    def _policy_reason(self) -> str | None:
        """Why the current index kind no longer suits the store's size (None if it does)."""
        assert self._index is not None
        info, n = self._index.info, self._index.ntotal
        if info.kind == "exact" and n >= 2 * self.exact_max:
            return f"{n} users outgrew the exact index"
        if info.kind == "ivf" and (n < self.exact_max // 2 or n > 4 * max(info.trained_size, 1)):
            return f"{n} users no longer suit an IVF index trained on {info.trained_size}"
        return None

    def rebuild_index(self, persist: bool = True) -> None:
        """Build the index from scratch from the database and install it (persisted: the next start loads it)."""
        t0 = time.perf_counter()
        with self._sync_lock:
            index, seq = self._build_fresh()
            with self._rw.write():
                self._index, self._index_seq = index, seq
        log.info("built the user index of %s (%s, %d users) in %.1fs", self.path, index.info.kind, index.ntotal,
                 time.perf_counter() - t0)  # fmt: skip
        if persist:
            self.snapshot()

    def _rebuild_in_background(self, reason: str) -> None:
        """Re-cluster without stopping service: build from a database snapshot, then swap in and catch up."""
        if self._rebuilder is not None and self._rebuilder.is_alive():
            return
        log.info("rebuilding the user index of %s in the background: %s", self.path, reason)

        def work() -> None:
            try:
                index, seq = self._build_fresh()
                with self._sync_lock:
                    if self._closed:
                        return
                    with self._rw.write():
                        self._index, self._index_seq = index, seq
                    self._catch_up()
                self.snapshot()
            except Exception:  # the old index keeps serving; the next open retries
                log.exception("background rebuild of the user index of %s failed", self.path)

        self._rebuilder = threading.Thread(target=work, name="user-index-rebuild", daemon=True)
        self._rebuilder.start()

    def _build_fresh(self) -> tuple[VectorIndex, int]:
        """A new index over one consistent database snapshot, and that snapshot's change number."""
        dim, filled, seq = self.projection.dim, 0, 0
        ids = np.zeros(0, np.int64)
        vecs = np.zeros((0, dim), np.float32)
        for batch in self.db.changes_since(0, self.checkpoint_id, count=True):
            seq = batch.seq
            if batch.servable_total >= 0:  # preallocate once: a second copy of 1M x 1000 floats is 4 GB
                ids, vecs = np.empty(batch.servable_total, np.int64), np.empty((batch.servable_total, dim), np.float32)
            b_ids, b_vecs = self._vectors(batch.rows)
            ids[filled : filled + len(b_ids)] = b_ids
            vecs[filled : filled + len(b_ids)] = normalise(b_vecs)
            filled += len(b_ids)
        ids, vecs = ids[:filled], vecs[:filled]  # fewer only if damaged rows were skipped
        return VectorIndex.build(vecs, ids, exact_max=self.exact_max, recall_target=self.recall_target), seq

    def _catch_up(self, verify: bool = False) -> str | None:
        """Apply database changes after the index's watermark; with `verify`, check the result.

        Returns a reason to rebuild (verification failed), else None.
        """
        assert self._index is not None
        removed, adds, seq = [], [], self._index_seq
        for batch in self.db.changes_since(self._index_seq, self.checkpoint_id):
            seq = batch.seq
            removed.append(batch.removed)
            if batch.rows:
                adds.append(self._vectors(batch.rows))
        with self._rw.write():
            self._index.remove(np.concatenate(removed) if removed else np.zeros(0, np.int64))
            for ids, vecs in adds:
                self._index.add(normalise(vecs), ids)
            self._index_seq = seq
        if verify:
            return self._verify()
        reason = self._policy_reason()
        if reason is not None:
            self._rebuild_in_background(reason)
        return None

    def _verify(self) -> str | None:
        """Count and spot-check the index against the database (catches a snapshot of other data)."""
        assert self._index is not None
        n_db = self.db.count(self.checkpoint_id)
        if self.db.current_seq() == self._index_seq and n_db != self._index.ntotal:
            return f"the index holds {self._index.ntotal} users, the database {n_db}"
        lo, hi = self.db.uid_range()
        rng = random.Random()
        picks = {u for u in (self.db.first_uid_at_or_after(rng.randint(lo, hi)) for _ in range(SPOT_CHECKS)) if u is not None}
        rows = [r for r in self.db.rows_at(picks, self.checkpoint_id) if r[4] <= self._index_seq]
        ids, vecs = self._vectors([r[:4] for r in rows])
        normalise(vecs)
        for uid, want in zip(ids, vecs):
            got = self._index.reconstruct(int(uid))
            if got is None or not np.allclose(got, want, atol=2e-3):
                return f"stored user #{uid} differs between the snapshot and the database"
        return None

    def check_index(self) -> list[str]:
        """Full consistency check (O(N)): every servable database row is in the index with the right
        vector, and nothing else is. Returns the problems found (empty: consistent). For tests and ops."""
        for _ in range(3):
            self._sync_index()
            with self._sync_lock, self._rw.read():
                assert self._index is not None
                problems: list[str] = []
                rows = 0
                for batch in self.db.changes_since(0, self.checkpoint_id):
                    if batch.seq != self._index_seq:
                        break  # a writer moved on between catch-up and this read: catch up again
                    ids, vecs = self._vectors(batch.rows)
                    rows += len(ids)
                    for uid, want in zip(ids, normalise(vecs)):
                        got = self._index.reconstruct(int(uid))
                        if got is None:
                            problems.append(f"stored user #{uid} is missing from the index")
                        elif not np.allclose(got, want, atol=2e-3):
                            problems.append(f"stored user #{uid} has a different vector in the index")
                else:
                    if rows != self._index.ntotal:
                        problems.append(f"the index holds {self._index.ntotal} vectors for {rows} servable users")
                    return problems
        return ["the database kept changing during the check"]

    def snapshot(self) -> Path | None:
        """Write the current index to disk so the next start loads it instead of rebuilding."""
        if self._index is None:
            return None
        with self._rw.read():
            seq = self._index_seq
            path = self._index.save(self._index_dir, {**self._snapshot_key(), "seq": seq})
        self._snapshot_seq = seq
        return path

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, Any]:
        n_all, n_servable = self.db.count(), self.db.count(self.checkpoint_id)
        out: dict[str, Any] = {
            "path": str(self.path),
            "checkpoint_id": self.checkpoint_id,
            "users": n_all,
            "servable_users": n_servable,
            "other_checkpoint_users": n_all - n_servable,
            "change_seq": self.db.current_seq(),
            "database_bytes": self.db.disk_bytes(),
            "cache": {"entries": len(self._cache), "hits": self._cache.hits, "misses": self._cache.misses},
        }
        if self._index is not None:
            info = self._index.info
            out["index"] = {"kind": info.kind, "vectors": self._index.ntotal, "dim": info.dim, "nlist": info.nlist,
                            "nprobe": info.nprobe, "calibrated_recall_at_10": info.calibrated_recall,
                            "change_seq": self._index_seq, "memory_bytes": self._index.memory_bytes()}  # fmt: skip
        return out


__all__ = ["UserStore", "UserSummary"]
