"""User lookup for the ingress: the only serving process that opens the user store.

The user store (SQLite WAL + FAISS) must be opened on one host only, so it is opened where the
ingress runs (the Ray head, see docs/operations.md) and generator replicas, which may run on any
node, get each request's user already resolved: the store record's embedding (N x U float tensor;
embeddings cached in the store's LRU, invalidated by any writer), else the checkpoint's own
training-user id, else a 404. The checkpoint is read light: its user basis and id only
(`premier.checkpoint.load_user_basis`), never the adapters or the FLUX model.
"""

from __future__ import annotations

import threading
from typing import Any

from premier.errors import InvalidRequestError, UnknownUserError
from premier.served import load_served_basis
from premier.users import validate_user_id
from serving.config import ServeConfig


class UserDirectory:
    """The store handle and checkpoint basis of a serving process; opened on first use, thread safe."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self._store: Any = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.config.has_users

    def prepare(self) -> int:
        """Open the store, creating it if needed; on the embedded model and checkpoint, seed an empty store
        with the demo users. The ingress runs it once when it starts (it is the store's one serving opener,
        on the store's node, and one replica: one writer). Returns the number of users put."""
        if not self.config.has_users:
            return 0
        c = self.config
        store = self._open(create=True)
        if c.model is None and c.checkpoint is None and c.seed_demo_users and len(store) == 0:
            from premier.models.embedded import embedded_demo_records

            return store.put_many(r for r in embedded_demo_records() if r.checkpoint_id == store.checkpoint_id)
        return 0

    def store(self):
        """The read-write handle (reads, DELETE); raises InvalidRequestError on a plain FLUX server."""
        if not self.config.has_users:
            raise InvalidRequestError(
                "user_id", "this server runs plain FLUX without a Premier checkpoint: it has no users"
            )
        return self._open(create=False)

    def _open(self, create: bool):
        with self._lock:
            if self._store is None:
                from store.user_store import UserStore

                basis, ckpt = load_served_basis(self.config.checkpoint)  # the basis only: no adapters, no FLUX
                self._store = UserStore(
                    self.config.store,
                    basis,
                    ckpt,
                    cache_size=self.config.store_cache_size,
                    create=create,
                    snapshot_on_close=False,
                )
            return self._store

    def resolve(self, user_id: Any) -> tuple[Any, str]:
        """(embedding tensor | checkpoint user id | None, cache outcome: hit, miss, checkpoint, none).

        Raises InvalidRequestError (bad id), UnknownUserError, StoreError (store unavailable).
        """
        if user_id is None or user_id == "":
            return None, "none"
        if not isinstance(user_id, str):
            raise InvalidRequestError("user_id", f"must be a string, got {type(user_id).__name__}")
        validate_user_id(user_id)
        if not self.config.has_users:
            raise UnknownUserError(user_id)
        store = self.store()
        try:
            emb, cached = store.materialise_cached(user_id)  # a copy of its own: sent to a generator as it is
            return emb, ("hit" if cached else "miss")
        except UnknownUserError:
            pass
        if user_id in store.basis:
            return user_id, "checkpoint"
        raise UnknownUserError(user_id)

    def check(self) -> None:
        """A store that stopped answering is closed, to be reopened on next use (the ingress stays up)."""
        with self._lock:
            store = self._store
        if store is None:
            return
        try:
            store.db.current_seq()
        except Exception:  # lookups answer 503 meanwhile
            self.close()

    def close(self) -> None:
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # best effort at teardown
                pass


__all__ = ["UserDirectory"]
