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
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidRequestError
from premier.user_record import UserRecord
from store.errors import StoreBusyError, StoreError

SCHEMA_VERSION = "1"
DB_NAME = "users.sqlite3"
MAX_FIT_BYTES = 64 * 1024  # fit metadata is a few numbers; refuse megabytes of it

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (cid INTEGER PRIMARY KEY, checkpoint_id TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS users (
    uid INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL UNIQUE,
    seq INTEGER NOT NULL,
    mode TEXT NOT NULL CHECK (mode IN ('coefficients', 'direct')),
    cid INTEGER NOT NULL REFERENCES checkpoints(cid),
    shape TEXT NOT NULL,
    fit TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS users_seq ON users(seq);
CREATE INDEX IF NOT EXISTS users_cid ON users(cid);
CREATE TABLE IF NOT EXISTS tombstones (uid INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones(seq);
"""

_RECORD_COLUMNS = "u.uid, u.seq, u.user_id, u.mode, c.checkpoint_id, u.shape, u.fit, u.created_at, u.updated_at, u.vector"


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


@dataclass
class ChangeBatch:
    """Rows changed after a watermark, as of one consistent read (`seq`)."""

    seq: int
    removed: np.ndarray  # uids to drop from an index: deleted, or changed (they are re-added below if servable)
    rows: list[tuple[int, str, str, bytes]]  # (uid, mode, shape json, vector bytes) of servable rows
    scanned: int  # rows that changed (servable or not)
    servable_total: int = -1  # rows of the checkpoint in the snapshot (first batch, when asked for)


def _trusted_record(user_id: str, mode: str, vector: torch.Tensor, checkpoint_id: str, fit: dict[str, Any],
                    created_at: float, updated_at: float) -> UserRecord:  # fmt: skip
    """A UserRecord for a row read back from the database, without re-running its validation.

    Every row was validated by UserRecord (and the store's checks) before it was written, and the
    length and finiteness of the vector are checked on read, so re-validating on every `get`
    (regex, JSON round trip, tensor checks: ~30 us) only added latency to the hottest call.
    """
    record = object.__new__(UserRecord)
    for name, value in (("user_id", user_id), ("mode", mode), ("vector", vector), ("checkpoint_id", checkpoint_id),
                        ("fit", fit), ("created_at", created_at), ("updated_at", updated_at)):  # fmt: skip
        object.__setattr__(record, name, value)
    return record


def _vector_bytes(v: torch.Tensor) -> bytes:
    return v.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()


def decode_vector(blob: bytes, shape_json: str, where: str) -> np.ndarray:
    """float32 array from a stored blob; a length that disagrees with the shape is corruption."""
    try:
        shape = tuple(int(s) for s in json.loads(shape_json))
    except (ValueError, TypeError) as e:
        raise StoreError(f"{where}: stored shape {shape_json!r} is malformed") from e
    if len(blob) != 4 * math.prod(shape):
        raise StoreError(f"{where}: stored vector has {len(blob)} bytes, shape {shape} needs {4 * math.prod(shape)}")
    return np.frombuffer(blob, dtype="<f4").reshape(shape)


class Database:
    """Thread-safe access to one store database: a connection per thread (and per process after fork)."""

    def __init__(self, folder: str | Path, busy_timeout_s: float = 30.0, create: bool = True):
        self.folder = Path(folder)
        self.path = self.folder / DB_NAME
        self.busy_timeout_ms = int(busy_timeout_s * 1000)
        if not self.path.exists():
            if not create:
                raise StoreError(f"no user store at {self.folder} ({DB_NAME} is missing)")
            if self.folder.exists() and not self.folder.is_dir():
                raise StoreError(f"store path {self.folder} exists and is not a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._cids: dict[str, int] = {}
        self._cid_lock = threading.Lock()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False
        self._init_schema()
        self.store_uuid = self.meta("store_uuid")

    # ------------------------------------------------------------------ connections
    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(str(self.path), timeout=self.busy_timeout_ms / 1000, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL mode (got {mode!r}); is it on a network filesystem?")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA journal_size_limit = 67108864")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open user store database {self.path}: {e}") from e
        return conn

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a fresh one in a forked child: SQLite handles must not cross fork)."""
        if self._closed:
            raise StoreError(f"user store {self.folder} is closed")
        local = self._local
        if getattr(local, "pid", None) != os.getpid() or getattr(local, "conn", None) is None:
            local.conn = self._connect()
            local.pid = os.getpid()
            with self._connections_lock:
                self._all_connections.append(local.conn)
        return local.conn

    def close(self) -> None:
        self._closed = True
        with self._connections_lock:
            conns, self._all_connections = self._all_connections, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:  # pragma: no cover - closing from another thread
                pass

    def _init_schema(self) -> None:
        conn = self._connect()
        try:
            self._write(conn, lambda c: self._create(c))
            version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path} is not a usable user store database: {e}") from e
        finally:
            conn.close()
        if version is None or version[0] != SCHEMA_VERSION:
            raise StoreError(f"{self.path} has store schema {version and version[0]!r}; this version reads {SCHEMA_VERSION}")

    @staticmethod
    def _create(c: sqlite3.Connection) -> None:
        for stmt in filter(str.strip, _SCHEMA.split(";")):
            c.execute(stmt)
        c.execute("INSERT OR IGNORE INTO counter (id, seq) VALUES (0, 0)")
        c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
        c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (repr(time.time()),))

    def _write(self, conn: sqlite3.Connection, body) -> Any:
        """Run `body(conn)` in one IMMEDIATE transaction (the write lock is taken up front, so no upgrade deadlock)."""
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StoreBusyError(f"user store {self.folder} is locked by another writer: {e}") from e
            raise StoreError(f"user store {self.folder}: {e}") from e
        try:
            out = body(conn)
            conn.execute("COMMIT")
            return out
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _read(self, body) -> Any:
        """Run `body(conn)` in one read transaction: a consistent snapshot of committed data."""
        conn = self.conn()
        conn.execute("BEGIN")
        try:
            return body(conn)
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")

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

        def body(c: sqlite3.Connection) -> tuple[int, int]:
            seq = int(c.execute("UPDATE counter SET seq = seq + 1 WHERE id = 0 RETURNING seq").fetchone()[0])
            now = time.time()
            cids: dict[str, int] = {}
            n = 0
            sql = (
                "INSERT INTO users (user_id, seq, mode, cid, shape, fit, created_at, updated_at, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET "
                "seq = excluded.seq, mode = excluded.mode, cid = excluded.cid, shape = excluded.shape, "
                "fit = excluded.fit, updated_at = excluded.updated_at, vector = excluded.vector"
                + (", created_at = excluded.created_at" if keep_times else "")
            )
            batch: list[tuple] = []
            for r in records:
                if r.checkpoint_id not in cids:
                    cids[r.checkpoint_id] = self._cid(r.checkpoint_id, create=True, conn=c)  # type: ignore[assignment]
                fit = json.dumps(r.fit, sort_keys=True)
                if len(fit) > MAX_FIT_BYTES:
                    raise InvalidRequestError("fit", f"user {r.user_id!r}: fit metadata is {len(fit)} bytes; at most {MAX_FIT_BYTES}")
                batch.append((r.user_id, seq, r.mode, cids[r.checkpoint_id], json.dumps(list(r.vector.shape)), fit,
                              float(r.created_at), float(r.updated_at) if keep_times else now, _vector_bytes(r.vector)))  # fmt: skip
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
        row = self.conn().execute(
            f"SELECT {_RECORD_COLUMNS} FROM users u JOIN checkpoints c ON c.cid = u.cid WHERE u.user_id = ?", (user_id,)
        ).fetchone()
        return None if row is None else self._stored(row)

    def version(self, user_id: str) -> int | None:
        """The change number of a user's current row (cheap: no vector read), or None if absent."""
        row = self.conn().execute("SELECT seq FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return None if row is None else int(row[0])

    @staticmethod
    def _stored(row: tuple) -> StoredRecord:
        uid, seq, user_id, mode, ckpt, shape, fit, created, updated, blob = row
        where = f"stored user {user_id!r}"
        arr = decode_vector(blob, shape, where)
        if not np.isfinite(arr).all():
            raise StoreError(f"{where} is damaged: its stored vector holds NaN or infinite values")
        try:
            fit_dict = json.loads(fit)
        except ValueError as e:
            raise StoreError(f"{where} is damaged: fit metadata is not JSON ({e})") from e
        return StoredRecord(_trusted_record(user_id, mode, torch.from_numpy(arr.copy()), ckpt, fit_dict, created, updated),
                            int(uid), int(seq))  # fmt: skip

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
        rows = self.conn().execute(
            "SELECT u.user_id, u.mode, c.checkpoint_id, u.shape, u.fit, u.created_at, u.updated_at "
            "FROM users u JOIN checkpoints c ON c.cid = u.cid WHERE u.user_id > ? ORDER BY u.user_id LIMIT ?",
            (after or "", int(limit)),
        ).fetchall()
        return [UserSummary(r[0], r[1], r[2], tuple(json.loads(r[3])), json.loads(r[4]), r[5], r[6]) for r in rows]

    def iter_records(self, chunk: int = 1000) -> Iterator[StoredRecord]:
        """Every record, in uid order, from one consistent snapshot (a private connection holds it)."""
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            last = -1
            while True:
                rows = conn.execute(
                    f"SELECT {_RECORD_COLUMNS} FROM users u JOIN checkpoints c ON c.cid = u.cid "
                    "WHERE u.uid > ? ORDER BY u.uid LIMIT ?", (last, chunk)).fetchall()  # fmt: skip
                if not rows:
                    break
                for row in rows:
                    yield self._stored(row)
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
    def changes_since(self, watermark: int, checkpoint_id: str, chunk: int = 20000,
                      count: bool = False) -> Iterator[ChangeBatch]:  # fmt: skip
        """Changes after `watermark`, in chunks, all from ONE snapshot whose seq every chunk reports.

        Rows of other checkpoints are reported as removed (they cannot be indexed with this basis).
        A private connection holds the snapshot, so the caller may use the store meanwhile.
        """
        conn = self._connect()
        try:
            conn.execute("BEGIN")
            seq = int(conn.execute("SELECT seq FROM counter WHERE id = 0").fetchone()[0])
            cid_row = conn.execute("SELECT cid FROM checkpoints WHERE checkpoint_id = ?", (checkpoint_id,)).fetchone()
            cid = int(cid_row[0]) if cid_row else -1
            total = -1
            if count:
                total = int(conn.execute("SELECT COUNT(*) FROM users WHERE cid = ?", (cid,)).fetchone()[0])
            gone = np.array([r[0] for r in conn.execute("SELECT uid FROM tombstones WHERE seq > ?", (watermark,))],
                            dtype=np.int64)  # fmt: skip
            cols = "SELECT uid, cid, mode, shape, vector FROM users"
            if watermark <= 0:
                # A full rebuild: walk the table by primary key (storage order), chunk by chunk.
                def chunks() -> Iterator[list[tuple]]:
                    last = -1
                    while rows := conn.execute(f"{cols} WHERE uid > ? ORDER BY uid LIMIT ?", (last, chunk)).fetchall():
                        yield rows
                        last = rows[-1][0]
            else:
                # A catch-up: find the changed rows through the seq index (no table scan; at open
                # with an up-to-date snapshot this reads nothing), then fetch them by primary key.
                changed_uids = [r[0] for r in conn.execute("SELECT uid FROM users WHERE seq > ? ORDER BY uid", (watermark,))]

                def chunks() -> Iterator[list[tuple]]:
                    for lo in range(0, len(changed_uids), 500):
                        part = changed_uids[lo : lo + 500]
                        yield conn.execute(f"{cols} WHERE uid IN ({','.join('?' * len(part))}) ORDER BY uid", part).fetchall()

            first = True
            for rows in chunks():
                changed = np.array([r[0] for r in rows], dtype=np.int64)
                servable = [(int(r[0]), r[2], r[3], r[4]) for r in rows if r[1] == cid]
                yield ChangeBatch(seq, np.concatenate([gone, changed]) if first else changed, servable, len(rows),
                                  total if first else -1)  # fmt: skip
                first = False
            if first:  # nothing changed but (perhaps) deletions
                yield ChangeBatch(seq, gone, [], 0, total)
            conn.execute("COMMIT")
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
        rows = self.conn().execute(
            f"SELECT u.uid, u.mode, u.shape, u.vector, u.seq FROM users u JOIN checkpoints c ON c.cid = u.cid "
            f"WHERE c.checkpoint_id = ? AND u.uid IN ({marks})", [checkpoint_id, *uids]).fetchall()  # fmt: skip
        return [(int(r[0]), r[1], r[2], r[3], int(r[4])) for r in rows]

    def uid_range(self) -> tuple[int, int]:
        lo, hi = self.conn().execute("SELECT MIN(uid), MAX(uid) FROM users").fetchone()
        return (int(lo or 0), int(hi or 0))

    def first_uid_at_or_after(self, uid: int) -> int | None:
        row = self.conn().execute("SELECT uid FROM users WHERE uid >= ? ORDER BY uid LIMIT 1", (uid,)).fetchone()
        return None if row is None else int(row[0])

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob(DB_NAME + "*") if p.is_file())


__all__ = ["Database", "StoredRecord", "UserSummary", "ChangeBatch", "decode_vector", "DB_NAME"]
