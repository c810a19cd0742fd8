"""Readers running during writes (other threads, another process) never see a partial record.

Every version v of the hot user has all coefficients equal to v and fit {"v": v}; a torn read
would show mixed values or a fit that disagrees with the vector. Readers also check that they
never go back in time and that nearest-neighbour search keeps working while the index catches up.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import torch
from store_testing import synthetic_basis

from premier.user_record import UserRecord
from store.user_store import UserStore

REPO = Path(__file__).resolve().parents[2]
K = 16
VERSIONS = 150


def check(record: UserRecord) -> int:
    v = record.fit["v"]
    assert torch.equal(record.vector, torch.full((K,), float(v))), f"torn record: fit v={v}, vector {record.vector[:4]}"
    return v


READER = textwrap.dedent(
    f"""
    import sys, torch
    from store.user_store import UserStore
    sys.path.insert(0, "tests")  # store_testing (the child runs in the repository root)
    from store_testing import synthetic_basis

    table, ckpt = synthetic_basis({K}, 4, 8, seed=0)
    store = UserStore(sys.argv[1], table, ckpt)
    last, reads, searches = 0, 0, 0
    print("READY", flush=True)
    while True:
        r = store.get("hot")
        v = r.fit["v"]
        assert torch.equal(r.vector, torch.full(({K},), float(v))), ("torn", v, r.vector[:4].tolist())
        assert v >= last, ("went back", last, v)
        last, reads = v, reads + 1
        if reads % 10 == 0:
            assert store.nearest(r.vector, k=3), "empty answer"
            searches += 1
        if v == {VERSIONS}:
            break
    assert store.nearest("hot", k=3), "empty answer"
    assert store.check_index() == []
    print(reads, searches, flush=True)
    """
)


def test_readers_never_see_a_partial_record(tmp_path):
    table, ckpt = synthetic_basis(K, 4, 8, seed=0)
    path = tmp_path / "s"
    store = UserStore(path, table, ckpt)
    store.put_many(UserRecord(f"u{i}", "coefficients", torch.randn(K), ckpt) for i in range(50))
    store.put(UserRecord("hot", "coefficients", torch.full((K,), 1.0), ckpt, {"v": 1}))
    script = tmp_path / "reader.py"
    script.write_text(READER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"

    unit = table.materialise(torch.ones(K)).detach()
    errors: list[BaseException] = []
    done = threading.Event()
    counts = [0, 0, 0]

    def reader(slot: int) -> None:
        last = 0
        try:
            while not done.is_set():
                v = check(store.get("hot"))
                assert v >= last
                last = v
                if slot == 0:  # one thread searches and materialises while the writer moves the index
                    assert store.nearest("hot", k=3)
                    e = store.materialise("hot")  # some whole committed version: unit * v
                    v_e = round(float((e / unit).flatten()[0]))
                    assert v_e >= 1 and torch.allclose(e, unit * v_e, atol=1e-4)
                counts[slot] += 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for v in range(2, VERSIONS + 1):  # one writer: durable single-record transactions
        store.put(UserRecord("hot", "coefficients", torch.full((K,), float(v)), ckpt, {"v": v}))
    done.set()
    for t in threads:
        t.join()
    out, err = proc.communicate(timeout=120)
    assert not errors, errors[0]
    assert proc.returncode == 0, err[-3000:]
    reads, searches = map(int, out.split())
    assert reads > 0 and searches >= 0 and all(counts)
    assert check(store.get("hot")) == VERSIONS
    assert store.check_index() == []
    store.close()


def test_materialise_is_consistent_with_the_record_under_concurrent_updates(tmp_path):
    """The cached embedding always belongs to some committed version, never a mix or a stale one after the update."""
    table, ckpt = synthetic_basis(K, 4, 8, seed=0)
    store = UserStore(tmp_path / "s", table, ckpt)
    store.put(UserRecord("hot", "coefficients", torch.full((K,), 1.0), ckpt, {"v": 1}))
    unit = table.materialise(torch.ones(K)).detach()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while not stop.is_set():
                e = store.materialise("hot")
                v = float((e / unit).flatten()[0])
                assert abs(v - round(v)) < 1e-3 and torch.allclose(e, unit * round(v), atol=1e-4)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for v in range(2, 80):
        store.put(UserRecord("hot", "coefficients", torch.full((K,), float(v)), ckpt, {"v": v}))
        assert torch.allclose(store.materialise("hot"), unit * v, atol=1e-4)  # an update invalidates at once
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    store.close()
