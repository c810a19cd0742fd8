"""The store's source of truth: user records in SQLite (WAL mode), with a change sequence for derived state.

Why SQLite in WAL mode: an embedded database with atomic, durable transactions, concurrent
readers alongside one writer across threads and processes, and no server to run. Every write
is one transaction with `synchronous=FULL`, so an acknowledged write survives `kill -9` of the
writer (and a power cut). Readers see only committed transactions.

Every write transaction takes the next number from a single-row `counter` table and stamps it
on the rows it writes (`users.seq`) or deletes (`tombstones.seq`), in the same transaction.
Derived state (the FAISS index of each process, its snapshot on disk) remembers the sequence
number it reflects and catches up with `changes_since(watermark)`; nothing else needs to be
coordinated, and a crash can never leave the database and an index disagreeing for good.

Checkpoint ids (64 hex characters) are interned in `checkpoints` so each row holds a small int.
Vectors are raw little-endian float32 bytes with their shape alongside: a 1,000-coefficient record
takes ~4.6 KB on disk with SQLite's default 4 KiB pages (its local part plus one overflow page);
larger pages would not pack 4.1 KB rows more tightly.

`Database` is the store's one handle on the file; its parts live beside it:

    schema.py       DB_NAME, SCHEMA_VERSION, the tables and their creation
    connections.py  per-thread connections with the WAL/durability pragmas, read and write transactions
    rows.py         StoredRecord, UserSummary and the row encodings (vector bytes, shape, fit) with their checks
    changes.py      ChangeBatch and the change feed read by `changes_since`

Every name other modules import from here (Database, StoredRecord, UserSummary, ChangeBatch,
decode_vector, DB_NAME, SCHEMA_VERSION) stays importable from store.database.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from premier.user_record import UserRecord
from store.changes import ChangeBatch, read_changes
from store.connections import Connections
from store.errors import StoreError
from store.rows import (
    MAX_FIT_BYTES,
    RECORD_COLUMNS,
    StoredRecord,
    UserSummary,
    decode_vector,
    fit_json,
    shape_json,
    stored_record,
    vector_bytes,
)
from store.schema import DB_NAME, SCHEMA_VERSION, create_schema, stored_schema_version

_UPSERT = (
    "INSERT INTO users (user_id, seq, mode, cid, shape, fit, created_at, updated_at, vector) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET "
    "seq = excluded.seq, mode = excluded.mode, cid = excluded.cid, shape = excluded.shape, "
    "fit = excluded.fit, updated_at = excluded.updated_at, vector = excluded.vector"
)


class Database(Connections):
    """Thread-safe access to one store database: a connection per thread (and per process after fork)."""

    def __init__(self, folder: str | Path, busy_timeout_s: float = 30.0, create: bool = True):
        folder = Path(folder)
        super().__init__(folder, folder / DB_NAME, busy_timeout_s)
        if not self.path.exists():
            if not create:
                raise StoreError(f"no user store at {self.folder} ({DB_NAME} is missing)")
            if self.folder.exists() and not self.folder.is_dir():
                raise StoreError(f"store path {self.folder} exists and is not a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._cids: dict[str, int] = {}
        self._cid_lock = threading.Lock()
        self._init_schema()
        self.store_uuid = self.meta("store_uuid")

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            self._write(conn, create_schema)
            version = stored_schema_version(conn)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable user store database: {e}") from e
        finally:
            conn.close()
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version!r}; this version reads {SCHEMA_VERSION}")

    # ------------------------------------------------------------------ small reads
    def meta(self, key: str) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def current_seq(self) -> int:
        return int(self.conn().execute("SELECT seq FROM counter WHERE id = 0").fetchone()[0])

    def count(self, checkpoint_id: str | None = None) -> int:
        if checkpoint_id is None:
            return int(self.conn().execute("SELECT COUNT(*) FROM users").fetchone()[0])
        cid = self._cid(checkpoint_id, create=False)
        if cid is None:
            return 0
        return int(self.conn().execute("SELECT COUNT(*) FROM users WHERE cid = ?", (cid,)).fetchone()[0])

    def count_changed_since(self, seq: int) -> int:
        conn = self.conn()
        rows = conn.execute("SELECT COUNT(*) FROM users WHERE seq > ?", (seq,)).fetchone()[0]
        gone = conn.execute("SELECT COUNT(*) FROM tombstones WHERE seq > ?", (seq,)).fetchone()[0]
        return int(rows) + int(gone)

    def _cid(self, checkpoint_id: str, create: bool, conn: sqlite3.Connection | None = None) -> int | None:
        with self._cid_lock:
            if checkpoint_id in self._cids:
                return self._cids[checkpoint_id]
        conn = conn or self.conn()
        if create:
            conn.execute("INSERT OR IGNORE INTO checkpoints (checkpoint_id) VALUES (?)", (checkpoint_id,))
        row = conn.execute("SELECT cid FROM checkpoints WHERE checkpoint_id = ?", (checkpoint_id,)).fetchone()
        if row is None:
            return None
        if not conn.in_transaction:  # only cache ids that are committed
            with self._cid_lock:
                self._cids[checkpoint_id] = int(row[0])
        return int(row[0])

    # ------------------------------------------------------------------ records
    def put_many(self, records: Iterable[UserRecord], keep_times: bool = False) -> tuple[int, int]:
        """Insert or replace records in ONE transaction; return (count, seq).

        A new user keeps the record's created_at; a replaced user keeps its stored created_at.
        updated_at is the time of the write, unless `keep_times` (import) stores both as given.
        """
        conn = self.conn()
        sql = _UPSERT + (", created_at = excluded.created_at" if keep_times else "")

        def body(c: sqlite3.Connection) -> tuple[int, int]:
            seq = int(c.execute("UPDATE counter SET seq = seq + 1 WHERE id = 0 RETURNING seq").fetchone()[0])
            now = time.time()
            cids: dict[str, int] = {}
            n = 0
            batch: list[tuple] = []
            for r in records:
                if r.checkpoint_id not in cids:
                    cids[r.checkpoint_id] = self._cid(r.checkpoint_id, create=True, conn=c)  # type: ignore[assignment]
                fit = fit_json(r)
                batch.append(
                    (
                        r.user_id,
                        seq,
                        r.mode,
                        cids[r.checkpoint_id],
                        shape_json(r.vector),
                        fit,
                        float(r.created_at),
                        float(r.updated_at) if keep_times else now,
                        vector_bytes(r.vector),
                    )
                )
                if len(batch) >= 1000:
                    c.executemany(sql, batch)
                    n += len(batch)
                    batch.clear()
            if batch:
                c.executemany(sql, batch)
                n += len(batch)
            return n, seq

        try:
            return self._write(conn, body)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"user store {self.folder}: write failed: {e}") from e

    def get(self, user_id: str) -> StoredRecord | None:
        row = (
            self.conn()
            .execute(
                f"SELECT {RECORD_COLUMNS} FROM users u JOIN checkpoints c ON c.cid = u.cid WHERE u.user_id = ?",
                (user_id,),
            )
            .fetchone()
        )
        return None if row is None else stored_record(row)

    def version(self, user_id: str) -> int | None:
        """The change number of a user's current row (cheap: no vector read), or None if absent."""
        row = self.conn().execute("SELECT seq FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else int(row[0])

    def delete(self, user_id: str) -> bool:
        def body(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT uid FROM users WHERE user_id = ?", (user_id,)).fetchone()
            if row is None:
                return False
            seq = int(c.execute("UPDATE counter SET seq = seq + 1 WHERE id = 0 RETURNING seq").fetchone()[0])
            c.execute("DELETE FROM users WHERE uid = ?", (row[0],))
            c.execute("INSERT OR REPLACE INTO tombstones (uid, seq) VALUES (?, ?)", (row[0], seq))
            return True

        try:
            return self._write(self.conn(), body)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"user store {self.folder}: delete failed: {e}") from e

    def list(self, after: str | None = None, limit: int = 100) -> list[UserSummary]:
        """Users in id order after `after` (keyset pagination: stable under concurrent writes)."""
        rows = (
            self.conn()
            .execute(
                "SELECT u.user_id, u.mode, c.checkpoint_id, u.shape, u.fit, u.created_at, u.updated_at "
                "FROM users u JOIN checkpoints c ON c.cid = u.cid WHERE u.user_id > ? ORDER BY u.user_id LIMIT ?",
                (after or "", int(limit)),
            )
            .fetchall()
        )
        return [UserSummary(r[0], r[1], r[2], tuple(json.loads(r[3])), json.loads(r[4]), r[5], r[6]) for r in rows]

    def iter_records(self, chunk: int = 1000) -> Iterator[StoredRecord]:
        """Every record, in uid order, from one consistent snapshot (a private connection holds it)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            last = -1
            while True:
                rows = conn.execute(
                    f"SELECT {RECORD_COLUMNS} FROM users u JOIN checkpoints c ON c.cid = u.cid "
                    "WHERE u.uid > ? ORDER BY u.uid LIMIT ?",
                    (last, chunk),
                ).fetchall()
                if not rows:
                    break
                for row in rows:
                    yield stored_record(row)
                last = rows[-1][0]
            conn.execute("COMMIT")
        finally:
            conn.close()

    def user_ids_for(self, uids: Iterable[int]) -> dict[int, str]:
        uids = [int(u) for u in uids]
        if not uids:
            return {}
        marks = ",".join("?" * len(uids))
        rows = self.conn().execute(f"SELECT uid, user_id FROM users WHERE uid IN ({marks})", uids).fetchall()
        return {int(u): s for u, s in rows}

    # ------------------------------------------------------------------ derived state
    def changes_since(
        self, watermark: int, checkpoint_id: str, chunk: int = 20000, count: bool = False
    ) -> Iterator[ChangeBatch]:
        """Changes after `watermark`, in chunks, all from ONE snapshot whose seq every chunk reports.

        Rows of other checkpoints are reported as removed (they cannot be indexed with this basis).
        A private connection holds the snapshot, so the caller may use the store meanwhile.
        """
        conn = self._connect()
        try:
            yield from read_changes(conn, watermark, checkpoint_id, chunk, count)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"user store {self.folder}: reading changes failed: {e}") from e
        finally:
            conn.close()

    def rows_at(self, uids: Iterable[int], checkpoint_id: str) -> list[tuple[int, str, str, bytes, int]]:
        """(uid, mode, shape, vector, seq) of the given rows that belong to `checkpoint_id` (for spot checks)."""
        uids = [int(u) for u in uids]
        if not uids:
            return []
        marks = ",".join("?" * len(uids))
        rows = (
            self.conn()
            .execute(
                f"SELECT u.uid, u.mode, u.shape, u.vector, u.seq FROM users u JOIN checkpoints c ON c.cid = u.cid "
                f"WHERE c.checkpoint_id = ? AND u.uid IN ({marks})",
                [checkpoint_id, *uids],
            )
            .fetchall()
        )
        return [(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]

    def uid_range(self) -> tuple[int, int]:
        lo, hi = self.conn().execute("SELECT MIN(uid), MAX(uid) FROM users").fetchone()
        return (int(lo or 0), int(hi or 0))

    def first_uid_at_or_after(self, uid: int) -> int | None:
        row = self.conn().execute("SELECT uid FROM users WHERE uid >= ? ORDER BY uid LIMIT 1", (uid,)).fetchone()
        return None if row is None else int(row[0])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob(DB_NAME + "*") if p.is_file())


__all__ = [
    "Database",
    "StoredRecord",
    "UserSummary",
    "ChangeBatch",
    "decode_vector",
    "DB_NAME",
    "SCHEMA_VERSION",
    "MAX_FIT_BYTES",
]
