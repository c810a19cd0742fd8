"""The change feed: what changed after a watermark, read from one snapshot, for derived state to catch up.

Derived state (each process's FAISS index, its snapshot on disk) remembers the change number it
reflects; `read_changes` reports the rows written and the uids deleted after it, in chunks that
all come from one read transaction and carry that transaction's change number.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass
class ChangeBatch:
    """Rows changed after a watermark, as of one consistent read (`seq`)."""

    seq: int
    removed: np.ndarray  # uids to drop from an index: deleted, or changed (they are re-added below if servable)
    rows: list[tuple[int, str, str, bytes]]  # (uid, mode, shape json, vector bytes) of servable rows
    scanned: int  # rows that changed (servable or not)
    servable_total: int = -1  # rows of the checkpoint in the snapshot (first batch, when asked for)


def read_changes(
    conn: sqlite3.Connection, watermark: int, checkpoint_id: str, chunk: int, count: bool
) -> Iterator[ChangeBatch]:
    """Changes after `watermark` in one read transaction on `conn` (which nothing else may use meanwhile).

    Rows of other checkpoints are reported as removed (they cannot be indexed with this basis).
    With `count`, the first batch also says how many rows of the checkpoint the snapshot holds.
    """
    conn.execute("BEGIN")
    seq = int(conn.execute("SELECT seq FROM counter WHERE id = 0").fetchone()[0])
    cid_row = conn.execute("SELECT cid FROM checkpoints WHERE checkpoint_id = ?", (checkpoint_id,)).fetchone()
    cid = int(cid_row[0]) if cid_row else -1
    total = -1
    if count:
        total = int(conn.execute("SELECT COUNT(*) FROM users WHERE cid = ?", (cid,)).fetchone()[0])
    gone = np.array(
        [r[0] for r in conn.execute("SELECT uid FROM tombstones WHERE seq > ?", (watermark,))], dtype=np.int64
    )
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
        yield ChangeBatch(
            seq, np.concatenate([gone, changed]) if first else changed, servable, len(rows), total if first else -1
        )
        first = False
    if first:  # nothing changed but (perhaps) deletions
        yield ChangeBatch(seq, gone, [], 0, total)
    conn.execute("COMMIT")


__all__ = ["ChangeBatch", "read_changes"]
