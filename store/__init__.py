"""The user store: durable user records and nearest-preference search (built on the core, never imported by it).

    database.py     Database: SQLite (WAL) records, the source of truth, with a change sequence
    schema.py       the tables, their version and creating them
    connections.py  a connection per thread, WAL and synchronous=FULL, read and write transactions
    rows.py         how a record is encoded in a row and checked when read back
    changes.py      the change feed (changes since a sequence number) that index keepers follow
    projection.py   index vectors whose geometry is that of the users' embeddings (basis Gram factor)
    index.py        the FAISS index (exact or IVF by size) and its snapshots
    records.py      Records: put/get/delete/list and materialised embeddings (versioned LRU)
    index_keeper.py IndexKeeper: loads/builds the index, catches it up with the database, snapshots, checks
    user_store.py   UserStore: the facade over records and index keeper (put/get/delete/list/nearest/materialise)
    concurrency.py  readers-writer lock for the index, versioned LRU of materialised embeddings
    transfer.py     export/import (safetensors + JSONL)
    backup.py       online backup and offline restore of the whole store (SQLite backup API)
    errors.py       StoreError (a store that cannot be opened or read); bad input raises the core's errors
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
