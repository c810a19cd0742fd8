"""The user store: durable user records and nearest-preference search (built on the core, never imported by it).

    database.py     SQLite (WAL) records, the source of truth, with a change sequence
    projection.py   index vectors whose geometry is that of the users' embeddings (basis Gram factor)
    index.py        the FAISS index (exact or IVF by size) and its snapshots
    user_store.py   UserStore: put/get/delete/list/nearest/materialise, catch-up, LRU of embeddings
    concurrency.py  readers-writer lock for the index, versioned LRU of materialised embeddings
    transfer.py     export/import (safetensors + JSONL)
    backup.py       online backup and offline restore of the whole store (SQLite backup API)
    errors.py       StoreError (a store that cannot be opened or read); bad input raises the core's errors
    testing.py      synthetic bases for tests and benchmarks
    cli.py          `premier users ...`

`from store import UserStore` is lazy so that importing the package stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["UserStore"]


def __getattr__(name: str) -> Any:
    if name == "UserStore":
        from store.user_store import UserStore

        return UserStore
    raise AttributeError(f"module 'store' has no attribute {name!r}")
