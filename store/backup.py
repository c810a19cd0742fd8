"""Online backup and offline restore of a user store's database (`premier users backup|restore`).

Why SQLite's online backup API and not a file copy: the store is SQLite in WAL mode, so the
database file alone misses committed transactions still in `users.sqlite3-wal`, and copying the
pair while a writer checkpoints can tear. `Connection.backup` copies a consistent snapshot of
committed data from one read transaction, without blocking the server's readers or its writer.
The FAISS index snapshot (`index/`) is derived state and is not backed up: the store rebuilds it
from the database when it does not match (store/index_keeper.py).

A backup must run on the store's node (SQLite's WAL index is shared memory); on Kubernetes the
premier-store-backup CronJob does that (deploy/k8s/base/store-backup-cronjob.yaml). A restore
needs every process that opens the store stopped: SQLite cannot swap a database under open
connections.

Errors: a damaged or foreign backup file and bad arguments raise InvalidRequestError (CLI exit 2);
a store that cannot be read or a failing disk raise StoreError (CLI exit 3). A refused restore
touches nothing.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from premier.errors import InvalidRequestError
from store.database import DB_NAME, SCHEMA_VERSION
from store.errors import StoreError
from store.index_keeper import INDEX_DIR

PREFIX = "users-"
SUFFIX = ".sqlite3"
TIME_FORMAT = "%Y%m%dT%H%M%SZ"  # UTC, second resolution: names sort in time order


@dataclass(frozen=True)
class BackupResult:
    path: Path
    users: int
    pruned: tuple[Path, ...]


@dataclass(frozen=True)
class RestoreResult:
    users: int
    moved_to: Path | None  # where the replaced database, its WAL files and the index went


def _utc_stamp() -> str:
    return time.strftime(TIME_FORMAT, time.gmtime())


def _inspect(path: Path) -> int:
    """Integrity-check a database file read-only and confirm it is a Premier store of this schema; return its user count.

    Raises InvalidRequestError("backup", ...) naming what is wrong.
    """
    if not path.is_file():
        raise InvalidRequestError("backup", f"{path} does not exist or is not a file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise InvalidRequestError("backup", f"cannot open {path}: {e}") from None
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise InvalidRequestError("backup", f"{path} is damaged (integrity check: {result})")
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if version is None or version[0] != SCHEMA_VERSION:
            raise InvalidRequestError(
                "backup", f"{path} has store schema {version and version[0]!r}; this version reads {SCHEMA_VERSION}"
            )
        return int(conn.execute("SELECT COUNT(*) FROM users").fetchone()[0])
    except sqlite3.DatabaseError as e:
        raise InvalidRequestError("backup", f"{path} is not a Premier user store database: {e}") from None
    finally:
        conn.close()


def check_backup(path: str | Path) -> int:
    """The number of users in a backup file, after checking it is an intact Premier store database."""
    return _inspect(Path(path))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def backups_in(backup_dir: str | Path) -> list[Path]:
    """Backup files in a folder, oldest first."""
    return sorted(Path(backup_dir).glob(f"{PREFIX}*{SUFFIX}"))


def backup(store_dir: str | Path, backup_dir: str | Path, keep: int | None = None) -> BackupResult:
    """Write BACKUP_DIR/users-<UTC time>.sqlite3 atomically (temp file, integrity check, fsync, rename); prune to `keep`.

    Safe while the server runs: one read transaction of the live database, nothing written to the store.
    """
    store_dir, backup_dir = Path(store_dir), Path(backup_dir)
    if keep is not None and keep < 1:
        raise InvalidRequestError("keep", f"must be at least 1, got {keep}")
    source = store_dir / DB_NAME
    if not source.is_file():
        raise StoreError(f"no user store at {store_dir} ({DB_NAME} is missing)")
    if backup_dir.exists() and not backup_dir.is_dir():
        raise InvalidRequestError("backup_dir", f"{backup_dir} exists and is not a folder")
    final = backup_dir / f"{PREFIX}{_utc_stamp()}{SUFFIX}"
    tmp = final.with_suffix(".tmp")
    try:
        backup_dir.mkdir(parents=True, exist_ok=True)
        src = sqlite3.connect(str(source), timeout=60)
        try:
            src.execute("PRAGMA busy_timeout = 60000")
            dst = sqlite3.connect(str(tmp))
            try:
                src.backup(dst)  # all pages in one step: one read transaction, one consistent snapshot
                dst.execute("PRAGMA journal_mode = DELETE")  # a self-contained file, no -wal beside it
            finally:
                dst.close()
        finally:
            src.close()
        try:
            users = _inspect(tmp)
        except InvalidRequestError as e:  # the live store itself is not a sound store
            raise StoreError(f"backup of {store_dir} failed its check: {e.message}") from None
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(backup_dir)
        pruned = tuple(backups_in(backup_dir)[:-keep]) if keep else ()
        for old in pruned:
            old.unlink()
    except (OSError, sqlite3.Error) as e:
        raise StoreError(f"backup of {store_dir} to {backup_dir} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return BackupResult(final, users, pruned)


def restore(backup_file: str | Path, store_dir: str | Path) -> RestoreResult:
    """Replace STORE_DIR's database by a checked backup; the previous files move to STORE_DIR/pre-restore-<time>/.

    Order matters for a crash half-way: the backup is copied and synced next to the database first,
    the old WAL files and index move out (an old WAL must never meet the new database), and one
    rename installs the new file, so STORE_DIR/users.sqlite3 is at every moment a whole database,
    the old one or the restored one; never missing (a server starting then would create an empty store).
    """
    backup_file, store_dir = Path(backup_file), Path(store_dir)
    users = _inspect(backup_file)  # refused before anything is touched
    if store_dir.exists() and not store_dir.is_dir():
        raise InvalidRequestError("store", f"{store_dir} exists and is not a folder")
    db = store_dir / DB_NAME
    tmp = store_dir / (DB_NAME + ".restore-tmp")
    moved: Path | None = None
    try:
        store_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(backup_file, tmp)
        _fsync(tmp)
        old = [p for p in store_dir.iterdir() if p != tmp and (p.name.startswith(DB_NAME) or p.name == INDEX_DIR)]
        if old:
            moved = store_dir / f"pre-restore-{_utc_stamp()}"
            moved.mkdir()
            for p in old:
                if p == db:
                    try:  # keep the live name in place until the final rename
                        os.link(p, moved / p.name)
                    except OSError:
                        shutil.copy2(p, moved / p.name)
                else:  # -wal, -shm, the index snapshot, leftovers of an interrupted restore
                    shutil.move(str(p), moved / p.name)
            _fsync(moved)
        os.replace(tmp, db)
        _fsync(store_dir)
    except OSError as e:
        raise StoreError(f"restore of {backup_file} into {store_dir} failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return RestoreResult(users, moved)


__all__ = ["backup", "restore", "check_backup", "backups_in", "BackupResult", "RestoreResult"]
