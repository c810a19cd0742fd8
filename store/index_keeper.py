"""IndexKeeper: the nearest-preference index of a store, kept in step with its database.

The FAISS index (store/index.py) is per-process derived state: loaded from a snapshot or rebuilt
on first use, and caught up from the database's change sequence before every search, so a reader
process sees other processes' writes and a crash can never leave the two disagreeing. Only records
of the store's checkpoint are indexed; their index vectors come from the basis projection
(store/projection.py), so similarity is that of the users' embeddings.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidEmbeddingError
from premier.users import UserEmbeddingTable
from store.concurrency import ReadWriteLock
from store.database import Database, decode_vector
from store.errors import StoreError
from store.index import RECALL_TARGET, VectorIndex, default_exact_max
from store.projection import BasisProjection, normalise

log = logging.getLogger(__name__)

INDEX_DIR = "index"
REBUILD_FRACTION = 0.5  # catch up from a snapshot unless more than this share of rows changed since
SPOT_CHECKS = 8


class IndexKeeper:
    """Loads, builds, catches up, checks and snapshots the index of one store; searches it.

    Searches share a readers-writer lock; index mutation takes it alone. Thread safe.
    """

    def __init__(
        self,
        path: Path,
        db: Database,
        basis: UserEmbeddingTable,
        checkpoint_id: str,
        exact_max: int | None = None,
        recall_target: float = RECALL_TARGET,
    ):
        self.path = path
        self.db = db
        self.basis = basis
        self.checkpoint_id = checkpoint_id
        self._exact_max = exact_max  # None: chosen from the index dimension (default_exact_max)
        self.recall_target = float(recall_target)
        self._projection: BasisProjection | None = None
        self._index: VectorIndex | None = None
        self._index_seq = -1  # database change number the in-memory index reflects
        self._snapshot_seq = -1  # change number of the snapshot on disk that matches it (if any)
        self._rw = ReadWriteLock()  # searches share it; index mutation takes it alone
        self._sync_lock = threading.RLock()  # one loader / catcher-up / installer at a time
        self._rebuilder: threading.Thread | None = None
        self.closed = False

    @property
    def index(self) -> VectorIndex | None:
        """The index in memory (None until first use)."""
        return self._index

    @property
    def projection(self) -> BasisProjection:
        if self._projection is None:
            self._projection = BasisProjection(self.basis)
        return self._projection

    @property
    def exact_max(self) -> int:
        """Below this many users the index is exact (brute force); above it, IVF."""
        return int(self._exact_max) if self._exact_max is not None else default_exact_max(self.projection.dim)

    def close(self, snapshot: bool) -> None:
        """Wait for a background rebuild; with `snapshot`, persist the index if this process moved it forward."""
        if self._rebuilder is not None:
            self._rebuilder.join()
        try:
            if snapshot and self._index is not None and self._index_seq != self._snapshot_seq:
                self.snapshot()
        finally:
            self.closed = True

    # ------------------------------------------------------------------ vectors and search
    def query_vector(self, query: Any) -> np.ndarray:
        """A (1, r) unnormalised index vector for a (K,) coefficient vector or an (N, U) embedding."""
        try:
            q = (
                query.detach().to("cpu", torch.float32).numpy()
                if isinstance(query, torch.Tensor)
                else np.asarray(query, dtype=np.float32)
            )
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

    def vectors(self, rows: Sequence[tuple[int, str, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
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
                log.warning(
                    "not indexing stored user #%d: %s of %d values does not fit this basis", uid, mode, arr.size
                )
        parts = []
        if coefs:
            parts.append((coef_ids, self.projection.coefficients(np.stack(coefs))))
        if dirs:
            parts.append((dir_ids, self.projection.embeddings(np.stack(dirs))))
        if not parts:
            return np.zeros(0, np.int64), np.zeros((0, self.projection.dim), np.float32)
        ids = np.concatenate([np.asarray(i, np.int64) for i, _ in parts])
        return ids, np.concatenate([v for _, v in parts])

    def nearest(self, vec: np.ndarray, k: int, exclude: int = -1, exact: bool = False) -> list[tuple[str, float]]:
        """The k stored users (ids, cosine) nearest a nonzero (1, r) index vector, leaving out uid `exclude`."""
        normalise(vec)
        self.sync()
        index = self._index
        assert index is not None
        with self._rw.read():
            sims, ids = index.search(vec, k + (exclude >= 0), exact=exact, single_thread=not exact)
        pairs = [(int(i), float(s)) for s, i in zip(sims[0], ids[0]) if i >= 0 and i != exclude][:k]
        names = self.db.user_ids_for(i for i, _ in pairs)  # a user deleted meanwhile drops out
        return [(names[i], max(-1.0, min(1.0, s))) for i, s in pairs if i in names]

    # ------------------------------------------------------------------ keeping the index
    @property
    def _index_dir(self) -> Path:
        return self.path / INDEX_DIR

    def _snapshot_key(self) -> dict[str, str]:
        return {
            "store_uuid": str(self.db.store_uuid),
            "checkpoint_id": self.checkpoint_id,
            "projection": self.projection.fingerprint,
        }

    def sync(self) -> None:
        """Load or build the index if there is none, else catch it up with the database."""
        if self.closed:
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
        self.rebuild()

    def _policy_reason(self) -> str | None:
        """Why the current index kind no longer suits the store's size (None if it does)."""
        assert self._index is not None
        info, n = self._index.info, self._index.ntotal
        if info.kind == "exact" and n >= 2 * self.exact_max:
            return f"{n} users outgrew the exact index"
        if info.kind == "ivf" and (n < self.exact_max // 2 or n > 4 * max(info.trained_size, 1)):
            return f"{n} users no longer suit an IVF index trained on {info.trained_size}"
        return None

    def rebuild(self, persist: bool = True) -> None:
        """Build the index from scratch from the database and install it (persisted: the next start loads it)."""
        t0 = time.perf_counter()
        with self._sync_lock:
            index, seq = self._build_fresh()
            with self._rw.write():
                self._index, self._index_seq = index, seq
        log.info(
            "built the user index of %s (%s, %d users) in %.1fs",
            self.path,
            index.info.kind,
            index.ntotal,
            time.perf_counter() - t0,
        )
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
                    if self.closed:
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
            b_ids, b_vecs = self.vectors(batch.rows)
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
                adds.append(self.vectors(batch.rows))
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
        picks = {
            u for u in (self.db.first_uid_at_or_after(rng.randint(lo, hi)) for _ in range(SPOT_CHECKS)) if u is not None
        }
        rows = [r for r in self.db.rows_at(picks, self.checkpoint_id) if r[4] <= self._index_seq]
        ids, vecs = self.vectors([r[:4] for r in rows])
        normalise(vecs)
        for uid, want in zip(ids, vecs):
            got = self._index.reconstruct(int(uid))
            if got is None or not np.allclose(got, want, atol=2e-3):
                return f"stored user #{uid} differs between the snapshot and the database"
        return None

    def check(self) -> list[str]:
        """Full consistency check (O(N)); returns the problems found (empty: consistent)."""
        for _ in range(3):
            self.sync()
            with self._sync_lock, self._rw.read():
                assert self._index is not None
                problems: list[str] = []
                rows = 0
                for batch in self.db.changes_since(0, self.checkpoint_id):
                    if batch.seq != self._index_seq:
                        break  # a writer moved on between catch-up and this read: catch up again
                    ids, vecs = self.vectors(batch.rows)
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

    def stats(self) -> dict[str, Any] | None:
        """The index's part of `UserStore.stats` (None before first use)."""
        if self._index is None:
            return None
        info = self._index.info
        return {
            "kind": info.kind,
            "vectors": self._index.ntotal,
            "dim": info.dim,
            "nlist": info.nlist,
            "nprobe": info.nprobe,
            "calibrated_recall_at_10": info.calibrated_recall,
            "change_seq": self._index_seq,
            "memory_bytes": self._index.memory_bytes(),
        }


__all__ = ["IndexKeeper", "INDEX_DIR", "REBUILD_FRACTION", "SPOT_CHECKS"]
