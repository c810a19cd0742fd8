"""SQLite connections to the store database: one per thread (and per process after fork), and its transactions.

Every connection is opened the same way: WAL journal (refused if the filesystem cannot do it),
`synchronous=FULL` (an acknowledged write survives `kill -9` and a power cut), foreign keys on,
and a busy timeout. Writes run in one `BEGIN IMMEDIATE` transaction; a writer that cannot get the
lock in time raises StoreBusyError.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from store.errors import StoreBusyError, StoreError


class Connections:
    """Thread-safe connections to one database file: `conn()` is this thread's, `close()` closes them all."""

    def __init__(self, folder: Path, path: Path, busy_timeout_s: float):
        self.folder = folder
        self.path = path
        self.busy_timeout_ms = int(busy_timeout_s * 1000)
        self._local = threading.local()
        self._all_connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        """A new private connection with the store's pragmas (the caller closes it)."""
        try:
            conn = sqlite3.connect(
                str(self.path), timeout=self.busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"{self.path}: cannot switch to WAL mode (got {mode!r}); is it on a network filesystem?"
                )
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


__all__ = ["Connections"]
