"""`premier users backup|restore` (store/backup.py), run by the premier-store-backup CronJob, and the
bytes-per-user figure docs/operations.md sizes the store with.

The backup is taken while a writer keeps its handle open and writes after it, so the tests show the
backup is a consistent snapshot of committed data and the restore brings back exactly that; a
refused restore (damaged or foreign file) leaves the store byte for byte as it was.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
import torch
from store_testing import synthetic_basis

from premier.cli import EXIT_BAD_INPUT, EXIT_LOAD_ERROR, main
from premier.user_record import UserRecord
from store.backup import backups_in, check_backup
from store.user_store import UserStore

REPO = Path(__file__).resolve().parents[2]


def _records(
    cid: str, k: int, ids: range, mode: str = "coefficients", shape: tuple[int, ...] = (4, 8)
) -> list[UserRecord]:
    g = torch.Generator().manual_seed(ids.start)
    now = time.time()
    out = []
    for i in ids:
        v = torch.rand(k, generator=g) / k if mode == "coefficients" else torch.rand(*shape, generator=g) * 0.1
        out.append(UserRecord(f"user{i:05d}", mode, v, cid, {"steps": 10}, now, now))
    return out


def backup(store: Path, to: Path, *extra: str) -> int:
    return main(["users", "backup", str(to), "--store", str(store), *extra])


def restore(store: Path, backup_file: Path) -> int:
    return main(["users", "restore", str(backup_file), "--store", str(store)])


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_online_backup_rotation_and_restore(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    basis, cid = synthetic_basis(num_users=16)
    store_dir, backups = tmp_path / "store", tmp_path / "backups"
    writer = UserStore(store_dir, basis, cid)
    writer.put_many(_records(cid, 16, range(40)))
    writer.nearest("user00001", k=3)  # an index snapshot exists too (derived state)
    reader = UserStore(store_dir, basis, cid, create=False)  # a server's open handle
    assert reader.get("user00002") is not None

    assert backup(store_dir, backups, "--keep", "2") == 0
    assert "backed up 40 users to" in capsys.readouterr().out
    (first,) = backups_in(backups)
    # Writes after the backup are not in it; the live store keeps working.
    writer.put_many(_records(cid, 16, range(40, 50)))
    writer.delete("user00000")
    assert len(reader) == 49
    reader.close()
    writer.close()
    time.sleep(1.1)  # backups are named by the second
    assert backup(store_dir, backups, "--keep", "1") == 0
    assert "pruned 1 older" in capsys.readouterr().out
    (latest,) = backups_in(backups)  # pruned to --keep
    assert latest != first and not first.exists()
    # A backup file is self-contained (no -wal beside it, no temp file left) and passes SQLite's integrity check.
    assert sorted(p.name for p in backups.iterdir()) == [latest.name] and check_backup(latest) == 49

    # Restore the older state: a 40-user store backed up to b2, with the server stopped.
    snap = tmp_path / "snap"
    with UserStore(snap, basis, cid) as s:
        s.put_many(_records(cid, 16, range(40)))
    assert backup(snap, tmp_path / "b2") == 0
    (b2,) = backups_in(tmp_path / "b2")
    assert restore(store_dir, b2) == 0
    assert f"restored 40 users into {store_dir}" in capsys.readouterr().out
    (moved,) = store_dir.glob("pre-restore-*")
    assert (moved / "users.sqlite3").is_file() and (moved / "index").is_dir()
    assert not (store_dir / "index").exists() and not list(store_dir.glob("*restore-tmp"))
    with UserStore(store_dir, basis, cid, create=False) as store:
        assert len(store) == 40 and "user00000" in store and "user00045" not in store
        assert torch.equal(store.get("user00007").vector, _records(cid, 16, range(40))[7].vector)
        assert [h for h in store.nearest("user00001", k=3)]  # the index is rebuilt from the database
    # The replaced database is kept whole: it opens with the 49 users it had.
    with UserStore(moved, basis, cid, create=False) as old:
        assert len(old) == 49


def test_restored_store_serves_the_same_users(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Through the CLI on the embedded demo checkpoint: after backup, changes and restore, list, get and
    nearest answer exactly as before, and the FAISS index is rebuilt (not the stale snapshot reused)."""
    from premier.models.embedded import embedded_demo_records

    store_dir, backups = tmp_path / "store", tmp_path / "backups"
    with UserStore.open(store_dir, create=True) as s:
        cid = s.checkpoint_id
        demo = [r for r in embedded_demo_records() if r.checkpoint_id == cid]
        assert len(demo) >= 3
        s.put_many(demo)
        s.ensure_index()
    ids = [r.user_id for r in demo]

    def answers() -> tuple[list, dict, list]:
        capsys.readouterr()
        assert main(["users", "list", "--json", "--limit", "1000", "--store", str(store_dir)]) == 0
        listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        got = {}
        for u in ids:  # a deleted user answers exit 2 (unknown user)
            code = main(["users", "get", u, "--json", "--store", str(store_dir)])
            got[u] = json.loads(capsys.readouterr().out) if code == 0 else code
        assert main(["users", "nearest", ids[0], "-k", "3", "--exact", "--json", "--store", str(store_dir)]) == 0
        return listed, got, json.loads(capsys.readouterr().out)

    before = answers()
    assert backup(store_dir, backups) == 0
    (b,) = backups_in(backups)
    # Changes after the backup: one user deleted, one changed, one added; the index snapshot follows them.
    with UserStore.open(store_dir) as s:
        s.delete(ids[1])
        s.put(demo[2].touched(vector=demo[2].vector.flip(0)))
        s.put(demo[0].touched(user_id="late-user"))
        s.ensure_index()
    assert (store_dir / "index").is_dir()
    assert answers() != before

    assert restore(store_dir, b) == 0
    assert not (store_dir / "index").exists()  # the stale snapshot moved out with the old database
    assert answers() == before
    with UserStore.open(store_dir, create=False) as s:
        s.ensure_index()
        stats = s.stats()
        assert stats["users"] == len(ids) and stats["index"]["vectors"] == len(ids) == stats["servable_users"]
        assert all(torch.equal(s.get(r.user_id).vector, r.vector) for r in demo)
    assert (store_dir / "index").is_dir()  # rebuilt from the restored database and snapshotted again


def test_refused_restore_touches_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    basis, cid = synthetic_basis(num_users=16)
    store_dir = tmp_path / "store"
    with UserStore(store_dir, basis, cid) as s:
        s.put_many(_records(cid, 16, range(5)))
        s.ensure_index()
    untouched = _files(store_dir)
    bad = tmp_path / "users-bad.sqlite3"
    bad.write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    foreign = tmp_path / "other.sqlite3"
    sqlite3.connect(foreign).execute("CREATE TABLE t (x)").connection.close()
    old_schema = tmp_path / "old-schema.sqlite3"
    with sqlite3.connect(old_schema) as c:
        c.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        c.execute("INSERT INTO meta VALUES ('schema_version', '0')")
    c.close()
    for path, says in [
        (bad, "not a Premier user store"),
        (foreign, "not a Premier user store"),
        (old_schema, "has store schema '0'"),
        (tmp_path / "missing.sqlite3", "does not exist"),
    ]:
        assert restore(store_dir, path) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err, err
    assert _files(store_dir) == untouched and not list(store_dir.glob("pre-restore-*"))
    with UserStore(store_dir, basis, cid, create=False) as s:
        assert len(s) == 5


def test_backup_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert backup(tmp_path / "nothing-here", tmp_path / "b") == EXIT_LOAD_ERROR  # no store: exit 3 like other actions
    err = capsys.readouterr().err
    assert "no user store at" in err and "Traceback" not in err
    assert not (tmp_path / "nothing-here").exists() and not (tmp_path / "b").exists()
    basis, cid = synthetic_basis(num_users=16)
    with UserStore(tmp_path / "store", basis, cid) as s:
        s.put_many(_records(cid, 16, range(2)))
    assert backup(tmp_path / "store", tmp_path / "b", "--keep", "0") == EXIT_BAD_INPUT
    assert "keep: must be at least 1" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert backup(tmp_path / "store", tmp_path / "afile") == EXIT_BAD_INPUT
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: a missing argument
        main(["users", "restore", "--store", str(tmp_path / "store")])
    assert e.value.code == 2


@pytest.mark.parametrize("mode, documented, text", [("coefficients", 4700, "4.7 KB"), ("direct", 123_500, "123.5 KB")])
def test_bytes_per_user_as_documented(tmp_path: Path, mode: str, documented: int, text: str) -> None:
    """docs/operations.md sizes the store from these: K = 1,000 coefficients, or a direct 30 x 1024 embedding."""
    basis, cid = synthetic_basis(num_users=1000, tokens=30, user_dim=1024)
    n = 300
    with UserStore(tmp_path, basis, cid) as s:
        s.put_many(_records(cid, 1000, range(n), mode, (30, 1024)))
    conn = sqlite3.connect(tmp_path / "users.sqlite3")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    per_user = sum(p.stat().st_size for p in tmp_path.glob("users.sqlite3*")) / n
    assert abs(per_user - documented) / documented < 0.1, per_user
    assert text in (REPO / "docs" / "operations.md").read_text()
