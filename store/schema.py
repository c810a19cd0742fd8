"""The store database's file name and schema: its tables, their creation and the version this code reads.

Tables: `meta` (schema version, store uuid, creation time), `counter` (the single change
sequence), `checkpoints` (64-hex checkpoint ids interned as small ints), `users` (one row per
user, stamped with the change number of its last write) and `tombstones` (deleted uids with the
change number of their deletion). See store/database.py for how the sequence is used.
"""

from __future__ import annotations

import sqlite3
import time
import uuid

SCHEMA_VERSION = "1"
DB_NAME = "users.sqlite3"

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


def create_schema(c: sqlite3.Connection) -> None:
    """Create whatever is missing (idempotent; run inside the caller's write transaction)."""
    for stmt in filter(str.strip, _SCHEMA.split(";")):
        c.execute(stmt)
    c.execute("INSERT OR IGNORE INTO counter (id, seq) VALUES (0, 0)")
    c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
    c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_uuid', ?)", (uuid.uuid4().hex,))
    c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('created_at', ?)", (repr(time.time()),))


def stored_schema_version(c: sqlite3.Connection) -> str | None:
    """The schema version the database says it has (None if it says nothing)."""
    row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else row[0]


__all__ = ["SCHEMA_VERSION", "DB_NAME", "create_schema", "stored_schema_version"]
