"""Crash safety: a writer killed with SIGKILL mid-stream loses no acknowledged write, and the index agrees.

The child applies a deterministic stream of durable puts, updates and deletes, printing one line
after each call returns (the acknowledgement), while a second thread keeps writing index snapshots
so the kill can land in the middle of one. After the kill, the store must hold exactly the state
after the acknowledged operations, or after one more (the operation in flight may or may not have
committed), and the index rebuilt or caught up at reopen must match the database row for row.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from store_testing import synthetic_basis

from store.user_store import UserStore

REPO = Path(__file__).resolve().parents[2]

OPS = textwrap.dedent(
    """
    def op(t):
        if t % 5 == 4:
            return ("delete", f"u{(t * 3) % (t + 1)}", None)
        if t % 5 == 2:
            return ("put", f"u{t // 2}", t + 1_000_000)  # an update of an earlier user (or a new one)
        return ("put", f"u{t}", t)
    """
)

CHILD = OPS + textwrap.dedent(
    """
    import sys, threading, torch
    from premier.user_record import UserRecord
    from store.user_store import UserStore
    sys.path.insert(0, "tests")  # store_testing (the child runs in the repository root)
    from store_testing import synthetic_basis

    table, ckpt = synthetic_basis(16, 4, 8, seed=0)
    store = UserStore(sys.argv[1], table, ckpt, exact_max=100)  # small: IVF builds happen too

    def snapshots():
        while True:
            store.ensure_index()
            store.snapshot()

    threading.Thread(target=snapshots, daemon=True).start()
    t = 0
    while True:
        kind, uid, seed = op(t)
        if kind == "put":
            vec = torch.randn(16, generator=torch.Generator().manual_seed(seed))
            store.put(UserRecord(uid, "coefficients", vec, ckpt, {"seed": seed}))
        else:
            store.delete(uid, missing_ok=True)
        print(f"ACK {t}", flush=True)
        t += 1
    """
)

namespace: dict = {}
exec(OPS, namespace)
op = namespace["op"]


def expected_state(n_ops: int) -> dict[str, int]:
    """user id -> seed of its vector after the first n_ops operations."""
    state: dict[str, int] = {}
    for t in range(n_ops):
        kind, uid, seed = op(t)
        if kind == "put":
            state[uid] = seed
        else:
            state.pop(uid, None)
    return state


def run_and_kill(folder: Path, script: Path, min_acks: int) -> int:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(folder)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    acked = -1
    deadline = time.monotonic() + 120
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            acked = int(line.split()[1])
            if acked + 1 >= min_acks:
                os.kill(proc.pid, signal.SIGKILL)
                break
            if time.monotonic() > deadline:
                break
        for line in proc.stdout:  # acknowledgements already in the pipe when the kill landed
            acked = int(line.split()[1])
    finally:
        proc.kill()
        proc.wait()
    assert acked + 1 >= min_acks, f"child died early:\n{proc.stderr.read() if proc.stderr else ''}"
    return acked + 1


@pytest.mark.parametrize("round_", [0, 1])
def test_sigkill_mid_stream_loses_no_acknowledged_write(tmp_path, round_):
    script = tmp_path / "writer.py"
    script.write_text(CHILD)
    folder = tmp_path / "store"
    rng = random.Random(round_)
    acks = run_and_kill(folder, script, min_acks=[60, 250][round_] + rng.randrange(40))
    table, ckpt = synthetic_basis(16, 4, 8, seed=0)
    with UserStore(folder, table, ckpt, exact_max=100) as store:
        stored = {r.user_id: r for r in store.iter_records()}
        candidates = [expected_state(acks), expected_state(acks + 1)]  # the op in flight may have committed
        got = {uid: r.fit["seed"] for uid, r in stored.items()}
        assert got in candidates, f"after {acks} acknowledged ops the store disagrees: {sorted(got.items())[:8]}..."
        for uid, r in stored.items():
            assert torch.equal(r.vector, torch.randn(16, generator=torch.Generator().manual_seed(got[uid]))), uid
        assert store.check_index() == []  # the index (snapshot + catch-up, or rebuilt) agrees with the database
        for uid in sorted(stored)[:5]:
            assert store.nearest(stored[uid].vector, k=1)[0][0] == uid
    leftovers = [p.name for p in (folder / "index").glob(".*.tmp")]
    with UserStore(folder, table, ckpt, exact_max=100) as store:
        store.ensure_index()
        store.snapshot()  # a later snapshot sweeps temporary files a killed writer left behind
    assert not list((folder / "index").glob(".*.tmp")), leftovers
