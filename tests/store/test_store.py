"""The user store: records round-trip, delete, nearest vs brute force, snapshots, checkpoints, bad input."""

from __future__ import annotations

import json
import shutil
import sqlite3

import numpy as np
import pytest
import torch
from store_testing import synthetic_basis

from premier.errors import CheckpointMismatchError, InvalidEmbeddingError, InvalidRequestError, UnknownUserError
from premier.user_record import UserRecord
from store.errors import StoreError
from store.index import MANIFEST, VectorIndex
from store.user_store import UserStore

K = 16


@pytest.fixture(scope="module")
def basis():
    return synthetic_basis(K, tokens=4, user_dim=8, seed=0)  # n = 32 > K: a full-rank, non-orthogonal basis


@pytest.fixture
def store(tmp_path, basis):
    table, ckpt = basis
    s = UserStore(tmp_path / "store", table, ckpt)
    yield s
    s.close()


def coef_record(uid: str, ckpt: str, seed: int, fit: dict | None = None) -> UserRecord:
    g = torch.Generator().manual_seed(seed)
    return UserRecord(uid, "coefficients", torch.randn(K, generator=g), ckpt, fit or {"images": 8, "final_loss": 0.12})


def brute_force(
    store: UserStore, query_emb: torch.Tensor, k: int, exclude: str | None = None
) -> list[tuple[str, float]]:
    """Cosine similarity between materialised embeddings, over every stored user."""
    B = store.basis.weight.detach().double().flatten(1)  # (K, n)
    project = B.T @ torch.linalg.solve(B @ B.T, B)  # least-squares projection onto the basis span
    q = project @ query_emb.detach().flatten().double()
    records = [r for r in store.iter_records() if r.user_id != exclude]
    emb = torch.stack(
        [r.vector.double() @ B if r.mode == "coefficients" else r.vector.double().flatten() for r in records]
    )
    direct = torch.tensor([r.mode == "direct" for r in records])
    emb[direct] = emb[direct] @ project.T  # documented: a direct user is compared by its projection onto the basis
    sims = (emb @ q) / (emb.norm(dim=1) * q.norm())
    order = torch.argsort(sims, descending=True)[:k]
    return [(records[i].user_id, float(sims[i])) for i in order]


# ----------------------------------------------------------------------------- records
def test_round_trip_both_modes_and_reopen(tmp_path, basis):
    table, ckpt = basis
    path = tmp_path / "s"
    coef = coef_record("alice", ckpt, 1, {"images": 8, "final_loss": 0.25, "seconds": 61.5})
    direct = UserRecord("bob@example.com", "direct", torch.randn(4, 8), ckpt, {"images": 24})
    with UserStore(path, table, ckpt) as s:
        stored = s.put(coef)
        s.put(direct)
        assert stored.created_at == coef.created_at and stored.updated_at >= coef.updated_at
        assert len(s) == 2 and "alice" in s and "carol" not in s
    with UserStore(path, table, ckpt) as s:  # a new handle reads what the first one wrote
        for want in (coef, direct):
            got = s.get(want.user_id)
            assert got.mode == want.mode and got.checkpoint_id == ckpt and got.fit == want.fit
            assert torch.equal(got.vector, want.vector) and got.created_at == want.created_at
        assert [u.user_id for u in s.list_users()] == ["alice", "bob@example.com"]
        assert [u.user_id for u in s.list_users(after="alice", limit=5)] == ["bob@example.com"]


def test_update_keeps_created_at_and_invalidates_materialised_cache(store, basis):
    table, ckpt = basis
    first = store.put(coef_record("alice", ckpt, 1))
    e1, cached = store.materialise_cached("alice")
    assert not cached and torch.allclose(e1, table.materialise(first.vector), atol=1e-6)
    again, cached = store.materialise_cached("alice")
    assert cached and torch.equal(again, e1) and store._cache.hits == 1  # served from the cache
    e1.add_(1.0)  # callers get copies: mutating one does not poison the cache
    assert torch.allclose(store.materialise("alice"), table.materialise(first.vector), atol=1e-6)
    second = store.put(coef_record("alice", ckpt, 2).touched(created_at=first.created_at + 100))
    assert second.created_at == first.created_at and second.updated_at >= first.updated_at
    assert torch.allclose(store.materialise("alice"), table.materialise(second.vector), atol=1e-6)


def test_update_from_another_handle_invalidates_cache(tmp_path, basis):
    """Another process's update is seen: the cache entry is keyed by the row's change number."""
    table, ckpt = basis
    with UserStore(tmp_path / "s", table, ckpt) as reader, UserStore(tmp_path / "s", table, ckpt) as writer:
        writer.put(coef_record("alice", ckpt, 1))
        old = reader.materialise("alice")
        new = writer.put(coef_record("alice", ckpt, 2))
        got = reader.materialise("alice")
        assert not torch.allclose(got, old) and torch.allclose(got, table.materialise(new.vector), atol=1e-6)
        writer.delete("alice")
        with pytest.raises(UnknownUserError):
            reader.materialise("alice")


def test_delete_removes_from_database_and_index(store, basis):
    table, ckpt = basis
    for i in range(30):
        store.put(coef_record(f"u{i}", ckpt, i))
    victim = store.get("u7")
    hits = store.nearest(victim.vector, k=5)
    assert hits[0][0] == "u7" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    uid = store.db.get("u7").uid
    assert store.delete("u7") is True
    with pytest.raises(UnknownUserError, match="unknown user 'u7'"):
        store.get("u7")
    assert all(u != "u7" for u, _ in store.nearest(victim.vector, k=29))
    assert store._index.ntotal == 29 and store._index.reconstruct(uid) is None
    assert store.check_index() == []
    with pytest.raises(UnknownUserError):
        store.delete("u7")
    assert store.delete("u7", missing_ok=True) is False


def test_delete_then_reput_same_id(store, basis):
    table, ckpt = basis
    store.put(coef_record("u1", ckpt, 1))
    store.ensure_index()
    store.delete("u1")
    again = store.put(coef_record("u1", ckpt, 5))
    hits = store.nearest(again.vector, k=1)
    assert hits[0][0] == "u1" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert store.check_index() == []


# ----------------------------------------------------------------------------- nearest
def test_nearest_equals_brute_force_on_exact_index(store, basis):
    table, ckpt = basis
    store.put_many(coef_record(f"u{i:03d}", ckpt, i) for i in range(200))
    store.put(UserRecord("direct1", "direct", torch.randn(4, 8, generator=torch.Generator().manual_seed(9)), ckpt))
    store.ensure_index()
    assert store._index.info.kind == "exact"
    g = torch.Generator().manual_seed(123)
    differs_from_raw_coefficients = 0
    for t in range(15):
        c = torch.randn(K, generator=g)
        got = store.nearest(c, k=10)
        want = brute_force(store, table.materialise(c), 10)
        assert [u for u, _ in got] == [u for u, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        # The basis is not orthogonal: ranking raw coefficient vectors would give another answer.
        raw = sorted(
            (
                (r.user_id, float(torch.cosine_similarity(c, r.vector, 0)))
                for r in store.iter_records()
                if r.mode == "coefficients"
            ),
            key=lambda x: -x[1],
        )[:10]
        differs_from_raw_coefficients += [u for u, _ in raw] != [u for u, _ in want]
    assert differs_from_raw_coefficients > 0
    for uid in ("u005", "u150", "direct1"):  # by id: the user itself is left out
        got = store.nearest(uid, k=7)
        want = brute_force(store, store.materialise(uid), 7, exclude=uid)
        assert [u for u, _ in got] == [u for u, _ in want]
    emb = table.materialise(torch.randn(K, generator=g))  # an (N, U) embedding as the query
    assert [u for u, _ in store.nearest(emb, k=5)] == [u for u, _ in brute_force(store, emb, 5)]


def test_direct_user_is_indexed_by_its_projection_onto_the_basis(store, basis):
    table, ckpt = basis
    c = torch.randn(K, generator=torch.Generator().manual_seed(3))
    store.put(UserRecord("coef", "coefficients", c, ckpt))
    store.put(UserRecord("same", "direct", table.materialise(c), ckpt))
    store.put(coef_record("other", ckpt, 4))
    hits = dict(store.nearest("coef", k=2))
    assert hits["same"] == pytest.approx(1.0, abs=1e-5) and hits["other"] < 0.999


def test_ivf_index_recall_exact_path_and_updates(tmp_path):
    """Above exact_max the index is IVF: approximate but calibrated; exact=True still equals brute force."""
    table, ckpt = synthetic_basis(K, tokens=4, user_dim=8, seed=1)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((12, K)).astype(np.float32)
    coefs = centres[rng.integers(0, 12, 1500)] + 0.3 * rng.standard_normal((1500, K)).astype(np.float32)
    with UserStore(tmp_path / "s", table, ckpt, exact_max=300) as s:
        s.put_many(UserRecord(f"u{i:04d}", "coefficients", torch.from_numpy(c), ckpt) for i, c in enumerate(coefs))
        s.ensure_index()
        info = s._index.info
        assert info.kind == "ivf" and 1 <= info.nprobe <= info.nlist and info.calibrated_recall >= 0.9
        queries = torch.from_numpy(
            centres[rng.integers(0, 12, 20)] + 0.3 * rng.standard_normal((20, K)).astype(np.float32)
        )
        hits = total = 0
        for q in queries:
            truth = brute_force(s, table.materialise(q), 10)
            want = [u for u, _ in truth]
            hits += len(set(want) & {u for u, _ in s.nearest(q, k=10)})
            total += 10
            # exact=True scans everything; IVF stores fp16 codes, so only near-ties (< 2e-3) may swap.
            exact = s.nearest(q, k=10, exact=True)
            assert np.allclose([x for _, x in exact], [x for _, x in truth], atol=2e-3)
            assert len(set(want) & {u for u, _ in exact}) >= 9
        assert hits / total >= 0.9
        s.delete("u0003")
        moved = s.put(UserRecord("u0004", "coefficients", queries[0], ckpt))
        assert s.nearest(moved.vector, k=1)[0][0] == "u0004"
        assert "u0003" not in {u for u, _ in s.nearest(torch.from_numpy(coefs[3]), k=50)}
        assert s.check_index() == []


# ----------------------------------------------------------------------------- snapshots and catch-up
def snapshotted_store(path, basis, n: int):
    """A closed store of n users whose index snapshot is on disk."""
    table, ckpt = basis
    with UserStore(path, table, ckpt) as s:
        s.put_many(coef_record(f"u{i}", ckpt, i) for i in range(n))
        s.ensure_index()
    return path


def test_snapshot_is_loaded_not_rebuilt_and_caught_up(tmp_path, basis, monkeypatch):
    table, ckpt = basis
    path = snapshotted_store(tmp_path / "s", basis, 50)
    assert (path / "index" / MANIFEST).is_file()
    with UserStore(path, table, ckpt) as writer:
        writer.put(coef_record("late", ckpt, 99))  # written after the snapshot
        writer.delete("u3")

        def no_rebuild(*a, **k):
            raise AssertionError("the snapshot should have been loaded and caught up, not rebuilt")

        monkeypatch.setattr(VectorIndex, "build", no_rebuild)
        reader = UserStore(path, table, ckpt)
        late = reader.get("late")
        assert reader.nearest(late.vector, k=1)[0][0] == "late"
        assert reader.check_index() == []
        writer.put(coef_record("later", ckpt, 100))  # the reader catches up at its next search
        assert reader.nearest(writer.get("later").vector, k=1)[0][0] == "later"
        reader.close()


@pytest.mark.parametrize("damage", ["corrupt_file", "other_checkpoint", "ahead_of_db", "other_store", "missing_file"])
def test_bad_snapshot_is_ignored_and_rebuilt(tmp_path, basis, damage):
    table, ckpt = basis
    path = snapshotted_store(tmp_path / "s", basis, 40)
    index_dir = path / "index"
    manifest = json.loads((index_dir / MANIFEST).read_text())
    file = index_dir / manifest["file"]
    if damage == "corrupt_file":
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0xFF
        file.write_bytes(bytes(data))
    elif damage == "missing_file":
        file.unlink()
    elif damage in ("other_checkpoint", "ahead_of_db"):
        manifest.update(
            {"checkpoint_id": "0" * 64} if damage == "other_checkpoint" else {"seq": manifest["seq"] + 1000}
        )
        (index_dir / MANIFEST).write_text(json.dumps(manifest))
    elif damage == "other_store":  # a snapshot copied from a different store with other users in it
        with UserStore(tmp_path / "x", table, ckpt) as other:
            other.put_many(coef_record(f"x{i}", ckpt, 1000 + i) for i in range(40))
            other.ensure_index()
        shutil.rmtree(index_dir)
        shutil.copytree(tmp_path / "x" / "index", index_dir)
    with UserStore(path, table, ckpt) as s:
        q = s.get("u5").vector
        assert s.nearest(q, k=1)[0][0] == "u5"
        assert s.check_index() == []
    assert json.loads((index_dir / MANIFEST).read_text())["store_uuid"] == s.db.store_uuid  # rewritten


# ----------------------------------------------------------------------------- checkpoints
def test_records_of_another_checkpoint_are_refused_for_serving(tmp_path, basis):
    table, ckpt = basis
    other_table, other_ckpt = synthetic_basis(K, tokens=4, user_dim=8, seed=7)
    path = tmp_path / "s"
    with UserStore(path, other_table, other_ckpt) as old:  # users fitted before a stage-1 retrain
        old.put(coef_record("old", other_ckpt, 1))
    with UserStore(path, table, ckpt) as s:
        s.put(coef_record("new", ckpt, 2))
        with pytest.raises(CheckpointMismatchError, match="refit it against this checkpoint"):
            s.put(coef_record("x", other_ckpt, 3))
        assert "x" not in s
        assert s.get("old").checkpoint_id == other_ckpt  # still readable
        with pytest.raises(CheckpointMismatchError):
            s.materialise("old")
        with pytest.raises(CheckpointMismatchError):
            s.nearest("old")
        assert [u for u, _ in s.nearest(s.get("new").vector, k=5)] == ["new"]  # never indexed
        stats = s.stats()
        assert stats["other_checkpoint_users"] == 1 and stats["servable_users"] == 1


# ----------------------------------------------------------------------------- bad input
def _make(kind: str, ckpt: str):
    good = torch.randn(K)
    if kind == "nan":
        return UserRecord("u", "coefficients", torch.full((K,), float("nan")), ckpt)
    if kind == "inf":
        return UserRecord("u", "coefficients", torch.tensor([float("inf")] + [0.0] * (K - 1)), ckpt)
    if kind == "float64_overflow":
        return UserRecord("u", "coefficients", torch.full((K,), 1e300, dtype=torch.float64), ckpt)
    if kind == "wrong_length":
        return UserRecord("u", "coefficients", torch.randn(K + 1), ckpt)
    if kind == "wrong_direct_shape":
        return UserRecord("u", "direct", torch.randn(4, 9), ckpt)
    if kind == "empty_id":
        return UserRecord("", "coefficients", good, ckpt)
    if kind == "path_id":
        return UserRecord("../etc/passwd", "coefficients", good, ckpt)
    if kind == "slash_id":
        return UserRecord("a/b", "coefficients", good, ckpt)
    if kind == "long_id":
        return UserRecord("a" * 257, "coefficients", good, ckpt)
    if kind == "bad_checkpoint_id":
        return UserRecord("u", "coefficients", good, "not-a-sha")
    if kind == "unknown_checkpoint_id":
        return UserRecord("u", "coefficients", good, "ab" * 32)
    if kind == "huge_fit":
        return UserRecord("u", "coefficients", good, ckpt, {"x": "y" * 100_000})
    if kind == "not_a_record":
        return {"user_id": "u"}
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, error, message",
    [
        ("nan", InvalidEmbeddingError, "NaN or infinite"),
        ("inf", InvalidEmbeddingError, "NaN or infinite"),
        ("float64_overflow", InvalidEmbeddingError, "beyond float32 range"),
        ("wrong_length", InvalidEmbeddingError, f"has {K + 1} coefficients; the basis has {K}"),
        ("wrong_direct_shape", InvalidEmbeddingError, "expects (4, 8)"),
        ("empty_id", InvalidRequestError, "non-empty"),
        ("path_id", InvalidRequestError, "characters outside"),
        ("slash_id", InvalidRequestError, "characters outside"),
        ("long_id", InvalidRequestError, "257 bytes; at most 256"),
        ("bad_checkpoint_id", InvalidRequestError, "64-character hex"),
        ("unknown_checkpoint_id", CheckpointMismatchError, "was fitted against stage-1 checkpoint abababababab"),
        ("huge_fit", InvalidRequestError, "fit metadata is"),
        ("not_a_record", InvalidRequestError, "must be a UserRecord"),
    ],
)
def test_bad_records_are_refused_with_a_clear_error(store, basis, kind, error, message):
    table, ckpt = basis
    store.put(coef_record("keep", ckpt, 1))
    with pytest.raises(error) as e:
        store.put(_make(kind, ckpt))
    assert message in str(e.value)
    assert [u.user_id for u in store.list_users()] == ["keep"]


def test_put_many_is_all_or_nothing(store, basis):
    table, ckpt = basis
    batch = [coef_record(f"u{i}", ckpt, i) for i in range(5)] + [
        UserRecord("bad", "coefficients", torch.randn(3), ckpt)
    ]
    with pytest.raises(InvalidEmbeddingError):
        store.put_many(batch)
    assert len(store) == 0


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda s: s.nearest(torch.full((K,), float("nan"))), InvalidEmbeddingError, "NaN or infinite"),
        (lambda s: s.nearest(torch.randn(K + 2)), InvalidEmbeddingError, f"expected ({K},) coefficients"),
        (lambda s: s.nearest(torch.zeros(K)), InvalidRequestError, "zero embedding"),
        (lambda s: s.nearest("keep", k=0), InvalidRequestError, "k: must be an integer in 1..1000"),
        (lambda s: s.nearest("keep", k=True), InvalidRequestError, "k: must be an integer"),
        (lambda s: s.nearest("nobody"), UnknownUserError, "unknown user 'nobody'"),
        (lambda s: s.nearest(["a", "b"]), InvalidEmbeddingError, "not numeric"),
        (lambda s: s.get("../x"), InvalidRequestError, "user_id:"),
        (lambda s: s.get(""), InvalidRequestError, "non-empty"),
        (lambda s: s.get("nobody"), UnknownUserError, "unknown user"),
        (lambda s: s.materialise("a" * 300), InvalidRequestError, "at most 256"),
        (lambda s: s.list_users(limit=0), InvalidRequestError, "limit"),
    ],
)
def test_bad_queries_are_refused_with_a_clear_error(store, basis, call, error, message):
    store.put(coef_record("keep", basis[1], 1))
    with pytest.raises(error) as e:
        call(store)
    assert message in str(e.value)


def test_checkpoint_id_of_the_store_is_validated(tmp_path, basis):
    with pytest.raises(InvalidRequestError, match="64-character hex"):
        UserStore(tmp_path / "s", basis[0], "abc")


def test_a_file_that_is_not_a_store_is_refused(tmp_path, basis):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "users.sqlite3").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="not a usable user store database|cannot open"):
        UserStore(tmp_path / "s", *basis)
    with pytest.raises(StoreError, match="no user store"):
        UserStore(tmp_path / "missing", *basis, create=False)


def test_a_damaged_row_is_reported_not_served(store, basis):
    store.put(coef_record("u1", basis[1], 1))
    conn = sqlite3.connect(store.db.path)
    conn.execute("UPDATE users SET vector = X'00' WHERE user_id = 'u1'")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError, match="stored vector has 1 bytes"):
        store.get("u1")


# ----------------------------------------------------------------------------- export / import
def test_export_import_round_trip_and_tamper_refusal(tmp_path, basis):
    from store.transfer import LINES_FILE, export_store, import_store

    table, ckpt = basis
    other_table, other_ckpt = synthetic_basis(K, tokens=4, user_dim=8, seed=7)
    with UserStore(tmp_path / "a", other_table, other_ckpt) as old:
        old.put(coef_record("old", other_ckpt, 1))
    with UserStore(tmp_path / "a", table, ckpt) as a:
        a.put_many(coef_record(f"u{i}", ckpt, i) for i in range(20))
        a.put(UserRecord("d", "direct", torch.randn(4, 8), ckpt, {"images": 30}))
        assert export_store(a, tmp_path / "exp") == 22
        originals = {r.user_id: r for r in a.iter_records()}
    with UserStore(tmp_path / "b", table, ckpt) as b:
        with pytest.raises(CheckpointMismatchError):  # the export holds a user of another checkpoint
            import_store(b, tmp_path / "exp")
        assert len(b) == 0  # all or nothing
    with UserStore(tmp_path / "c", other_table, other_ckpt) as c:
        with pytest.raises(CheckpointMismatchError):
            import_store(c, tmp_path / "exp")
    # Keep only this checkpoint's users: a new export of a filtered store imports cleanly.
    with UserStore(tmp_path / "a", table, ckpt) as a:
        a.db.delete("old")
        assert export_store(a, tmp_path / "exp2") == 21
    with UserStore(tmp_path / "b", table, ckpt) as b:
        assert import_store(b, tmp_path / "exp2") == 21
        for r in b.iter_records():
            o = originals[r.user_id]
            assert torch.equal(r.vector, o.vector) and r.fit == o.fit and r.mode == o.mode
            assert (r.created_at, r.updated_at) == (o.created_at, o.updated_at)
        assert b.check_index() == []
    lines = (tmp_path / "exp2" / LINES_FILE).read_text().splitlines()
    (tmp_path / "exp2" / LINES_FILE).write_text("\n".join(lines[:-1]) + "\n")
    with UserStore(tmp_path / "d", table, ckpt) as d:
        with pytest.raises(InvalidRequestError, match="does not match"):
            import_store(d, tmp_path / "exp2")
        with pytest.raises(InvalidRequestError, match="does not exist"):
            import_store(d, tmp_path / "nowhere")
        assert len(d) == 0


def test_rank_deficient_basis_uses_the_eigen_factor(tmp_path):
    """K > n: no Cholesky factor exists; the truncated eigen factor keeps embedding geometry."""
    table, ckpt = synthetic_basis(K, tokens=2, user_dim=4, seed=2)  # n = 8 < K = 16
    with UserStore(tmp_path / "s", table, ckpt) as s:
        assert s.projection.method == "eigen" and s.projection.dim == 8
        s.put_many(coef_record(f"u{i:02d}", ckpt, i) for i in range(60))
        g = torch.Generator().manual_seed(5)
        for _ in range(5):
            c = torch.randn(K, generator=g)
            q = table.materialise(c).detach().flatten()
            want = sorted(
                (
                    (r.user_id, float(torch.cosine_similarity(q, table.materialise(r.vector).detach().flatten(), 0)))
                    for r in s.iter_records()
                ),
                key=lambda x: -x[1],
            )[:5]
            got = s.nearest(c, k=5)
            assert [u for u, _ in got] == [u for u, _ in want]
            assert np.allclose([x for _, x in got], [x for _, x in want], atol=1e-4)


def test_full_rank_basis_uses_cholesky_and_preserves_inner_products(basis):
    from store.projection import BasisProjection

    table, _ = basis
    proj = BasisProjection(table)
    assert proj.method == "cholesky" and proj.dim == K
    c = torch.randn(5, K, dtype=torch.float32)
    e = table.materialise(c).detach().flatten(1)
    x = torch.from_numpy(proj.coefficients(c.numpy()))
    assert torch.allclose(x @ x.T, e @ e.T, atol=1e-4)
    # A direct embedding in the basis span gets the same index vector as its coefficients.
    assert torch.allclose(torch.from_numpy(proj.embeddings(e.numpy())), x, atol=1e-4)
    assert BasisProjection(table).fingerprint == proj.fingerprint
