"""User store at scale: insert throughput, get and nearest latency, recall, build time, cold start, memory, disk.

For each size N (default 10k, 100k, 1M users with 1,000 coefficients, the paper's number of
training users) it builds a store in a fresh folder and measures:
  insert    put_many in transactions of 1,000 records (durable: synchronous=FULL), and single
            durable put() updates (one fsync'd transaction each);
  build     index build from the database (exact up to 5,000 users at 1,000-d, IVF above; nprobe
            calibrated to recall 0.97), then the snapshot write;
  serve     in a FRESH process: cold start (open + load snapshot + catch up + verify = ready to
            serve), get p50/p99, materialise p50/p99 (cold and cached), nearest k=10 p50/p99 for
            held-out query vectors and for stored user ids, recall@10 of those answers against
            brute-force float32 search over every stored vector (the exact baseline, computed in
            the same run, whose latency through the store's exact path is reported alongside),
            and resident memory before/after opening;
  disk      database and snapshot bytes per user.

Synthetic data: a random basis of K = 1,000 users with 16 x 128 embeddings (n = 2,048 > K, so
the index has the full 1,000 dimensions, as at FLUX scale where n = 30,720), and clustered
coefficients: N / 1,000 clusters (at least 10) of ~1,000 users, each a random centre plus a
cluster-specific 16-d subspace plus isotropic noise, so that neighbours are structured and recall
is meaningful at every size (a cluster of ~k users would make the 10th neighbour arbitrary).

Run: `python benchmarks/store_bench.py` (all sizes, ~15 min on 2 cores, ~9 GB peak RSS), `--sizes 10000,100000`,
or `--quick` for a smoke run.

One module on purpose: the serve phase re-runs this same file in a fresh process (`--serve-child`) and must
regenerate exactly the population the build phase stored, so the synthetic world and both phases stay together.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402
from premier.config import PremierConfig  # noqa: E402
from premier.user_record import UserRecord  # noqa: E402
from premier.users import UserEmbeddingTable  # noqa: E402

FULL = dict(
    sizes=[10_000, 100_000, 1_000_000],
    coef_dim=1000,
    tokens=16,
    user_dim=128,
    users_per_cluster=1000,
    latent=16,
    latent_scale=0.4,
    noise=0.2,
    latency_queries=1000,
    recall_queries=200,
    get_samples=5000,
    single_puts=200,
    exact_queries=20,
    exact_max=None,
)
QUICK = dict(
    FULL,
    sizes=[3000],
    coef_dim=64,
    tokens=4,
    user_dim=32,
    users_per_cluster=100,
    latent=4,
    latency_queries=100,
    recall_queries=50,
    get_samples=300,
    single_puts=20,
    exact_queries=5,
    exact_max=1000,
)
CHUNK = 10_000
SEED = 1234


# ----------------------------------------------------------------------------- synthetic world
def make_basis(p: dict) -> tuple[UserEmbeddingTable, str]:
    config = PremierConfig(num_user_tokens=p["tokens"], user_dim=p["user_dim"])
    g = torch.Generator().manual_seed(SEED)
    weight = torch.empty(p["coef_dim"], p["tokens"], p["user_dim"]).uniform_(-0.1, 0.1, generator=g)
    table = UserEmbeddingTable(config, [f"basis{i:04d}" for i in range(p["coef_dim"])], weight=weight)
    return table, hashlib.sha256(weight.numpy().tobytes()).hexdigest()


class Population:
    """Deterministic clustered coefficient vectors: chunk i is the same in every process."""

    def __init__(self, p: dict, n: int):
        rng = np.random.default_rng(SEED)
        self.p = p
        self.clusters = max(10, n // p["users_per_cluster"])
        self.centres = rng.standard_normal((self.clusters, p["coef_dim"]), dtype=np.float32)
        self.subspaces = rng.standard_normal((self.clusters, p["coef_dim"], p["latent"]), dtype=np.float32)
        self.subspaces *= p["latent_scale"]

    def sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        p = self.p
        j = rng.integers(0, self.clusters, n)
        z = torch.from_numpy(rng.standard_normal((n, p["latent"], 1), dtype=np.float32))
        out = self.centres[j] + p["noise"] * rng.standard_normal((n, p["coef_dim"]), dtype=np.float32)
        for lo in range(0, n, 1000):  # gathering (n, K, latent) subspaces at once would take gigabytes
            sub = torch.from_numpy(self.subspaces[j[lo : lo + 1000]])
            out[lo : lo + 1000] += torch.bmm(sub, z[lo : lo + 1000]).squeeze(-1).numpy()
        return out * (1.0 / np.sqrt(p["coef_dim"]))  # coefficients of order 1/sqrt(K), like fitted mixtures

    def chunk(self, i: int, n_total: int) -> np.ndarray:
        return self.sample(min(CHUNK, n_total - i * CHUNK), seed=SEED + 1 + i)

    def queries(self, n: int) -> np.ndarray:
        return self.sample(n, seed=SEED - 1)  # held out: not a stored user


def user_id(i: int) -> str:
    return f"user{i:08d}"


# ----------------------------------------------------------------------------- measurement helpers
def pct(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "n": len(samples),
    }


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's own peak (VmHWM): ru_maxrss would include the parent's peak inherited at fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- phases
def build_phase(p: dict, n: int, folder: Path) -> dict[str, Any]:
    from store.user_store import UserStore

    basis, ckpt = make_basis(p)
    pop = Population(p, n)
    store = UserStore(folder, basis, ckpt, exact_max=p["exact_max"], snapshot_on_close=False, cache_size=0)
    put_s = gen_s = 0.0
    t_all = time.perf_counter()
    for i in range((n + CHUNK - 1) // CHUNK):
        t0 = time.perf_counter()
        coefs = torch.from_numpy(pop.chunk(i, n))
        base = i * CHUNK
        now = time.time()
        records = [
            UserRecord(
                user_id(base + r),
                "coefficients",
                coefs[r],
                ckpt,
                {"images": 8, "steps": 5000, "final_loss": 0.1},
                now,
                now,
            )
            for r in range(len(coefs))
        ]
        gen_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        for lo in range(0, len(records), 1000):
            store.put_many(records[lo : lo + 1000])
        put_s += time.perf_counter() - t0
    insert_total_s = time.perf_counter() - t_all
    # Durable single-record writes (one fsync'd transaction each): updates of existing users with
    # their same coefficients, so the data the serve phase regenerates stays the truth.
    rng = np.random.default_rng(7)
    single = []
    for r in rng.integers(0, len(records), p["single_puts"]):
        rec = records[int(r)].touched(fit={"images": 8, "refit": True})
        t0 = time.perf_counter()
        store.put(rec)
        single.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    store.rebuild_index(persist=False)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    store.snapshot()
    snapshot_s = time.perf_counter() - t0
    info = store.stats()["index"]
    store.close()
    del store
    db = sum(f.stat().st_size for f in folder.glob("users.sqlite3*"))
    snap = folder_bytes(folder / "index")
    return {
        "insert": {
            "users_per_s": n / put_s,
            "put_many_s": put_s,
            "record_construction_s": gen_s,
            "total_s": insert_total_s,
            "transaction_size": 1000,
        },
        "single_put_durable": pct(single),
        "index_build_s": build_s,
        "snapshot_write_s": snapshot_s,
        "index": info,
        "disk": {
            "database_bytes": db,
            "database_bytes_per_user": db / n,
            "snapshot_bytes": snap,
            "snapshot_bytes_per_user": snap / n,
        },
        "build_process_peak_rss_bytes": peak_rss_bytes(),
    }


def serve_phase(p: dict, n: int, folder: Path) -> dict[str, Any]:
    """Runs in a fresh process: what a serving replica sees at start and under single-request load."""
    from store.index import exact_top_k, recall_at
    from store.projection import normalise
    from store.user_store import UserStore

    basis, ckpt = make_basis(p)
    pop = Population(p, n)
    queries = pop.queries(max(p["latency_queries"], p["recall_queries"]))
    load_before = os.getloadavg()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    store = UserStore(folder, basis, ckpt, exact_max=p["exact_max"], snapshot_on_close=False)
    store.ensure_index()
    cold_start_s = time.perf_counter() - t0
    rss1 = rss_bytes()
    rng = np.random.default_rng(11)

    def timed(fn, items) -> list[float]:
        out = []
        for x in items:
            t = time.perf_counter()
            fn(x)
            out.append(time.perf_counter() - t)
        return out

    ids = [user_id(int(i)) for i in rng.integers(0, n, p["get_samples"])]
    timed(store.get, ids[:50])  # warm-up
    get = timed(store.get, ids)
    mat_ids = [user_id(int(i)) for i in rng.integers(0, n, min(500, p["get_samples"]))]
    mat_cold = timed(store.materialise, mat_ids)
    mat_hot = timed(store.materialise, mat_ids[: min(len(mat_ids), 256)])
    qt = [torch.from_numpy(q) for q in queries]
    timed(lambda q: store.nearest(q, 10), qt[:20])  # warm-up
    near_vec = timed(lambda q: store.nearest(q, 10), qt[: p["latency_queries"]])
    near_id = timed(lambda u: store.nearest(u, 10), ids[: min(500, len(ids))])
    exact = timed(lambda q: store.nearest(q, 10, exact=True), qt[: p["exact_queries"]])

    # Recall@10 against brute force over every stored vector (float32), the exact baseline.
    rq = queries[: p["recall_queries"]]
    qv = normalise(store.projection.coefficients(rq))
    truth = np.zeros((len(rq), 10), dtype=np.int64)
    best = np.full((len(rq), 0), -np.inf, np.float32)
    best_i = np.zeros((len(rq), 0), np.int64)
    t_truth = time.perf_counter()
    for i in range((n + CHUNK - 1) // CHUNK):
        vecs = normalise(store.projection.coefficients(pop.chunk(i, n)))
        rows = np.arange(i * CHUNK, i * CHUNK + len(vecs))
        top = exact_top_k(vecs, rows, qv, 10)
        s = np.take_along_axis(qv @ vecs.T, top - i * CHUNK, 1)
        cand_s, cand_i = np.concatenate([best, s], 1), np.concatenate([best_i, top], 1)
        order = np.argsort(-cand_s, 1, kind="stable")[:, :10]
        best, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    truth = best_i
    truth_s = time.perf_counter() - t_truth
    got = []
    for q in rq:
        g = [int(u[4:]) for u, _ in store.nearest(torch.from_numpy(q), 10)]
        got.append(g + [-1] * (10 - len(g)))
    got = np.array(got, dtype=np.int64)
    recall = recall_at(truth, got, k=10)
    got_exact = np.array(
        [[int(u[4:]) for u, _ in store.nearest(torch.from_numpy(q), 10, exact=True)] for q in rq[: p["exact_queries"]]],
        dtype=np.int64,
    )
    recall_exact_path = recall_at(truth[: p["exact_queries"]], got_exact, k=10)
    # The development machine is shared (load average above its 2 cores while this ran), so a
    # request that straddles a scheduler time slice waits ~4 ms: that, not the store, sets p99.
    # Re-time the serving calls with this thread at a higher priority, which approximates a
    # dedicated replica; both sets of numbers are reported.
    boosted: dict[str, Any] = {}
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
        fresh_ids = [user_id(int(i)) for i in np.random.default_rng(12).integers(0, n, p["get_samples"])]
        boosted = {
            "nice": -10,
            "get": pct(timed(store.get, fresh_ids)),
            "nearest_k10_query_vector": pct(timed(lambda q: store.nearest(q, 10), qt[: p["latency_queries"]])),
            "load_avg_1m": os.getloadavg()[0],
        }
    except OSError as e:
        boosted = {"skipped": f"cannot raise priority: {e}"}
    rss2 = rss_bytes()
    stats = store.stats()
    store.close()
    return {
        "cold_start_s": cold_start_s,
        "machine_load_avg_1m": {"before": load_before[0], "after": os.getloadavg()[0], "cpus": os.cpu_count()},
        "get": pct(get),
        "materialise_uncached": pct(mat_cold),
        "materialise_cached": pct(mat_hot),
        "nearest_k10_query_vector": pct(near_vec),
        "nearest_k10_user_id": pct(near_id),
        "nearest_k10_exact_path": pct(exact),
        "at_raised_priority": boosted,
        "recall_at_10": recall,
        "recall_at_10_exact_path": recall_exact_path,
        "recall_queries": len(rq),
        "brute_force_truth_s": truth_s,
        "memory": {
            "rss_before_open_bytes": rss0,
            "rss_ready_bytes": rss1,
            "rss_after_bytes": rss2,
            "rss_per_user_bytes": (rss1 - rss0) / n,
            "index_bytes_per_user": stats["index"]["memory_bytes"] / n,
            "serve_process_peak_rss_bytes": peak_rss_bytes(),
        },
        "index": stats["index"],
    }


def run_size(p: dict, n: int, work: Path) -> dict[str, Any]:
    folder = work / f"store-{n}"
    shutil.rmtree(folder, ignore_errors=True)
    print(f"[store_bench] N={n}: inserting and building ...", flush=True)
    row: dict[str, Any] = {"users": n, **build_phase(p, n, folder)}
    print(
        f"[store_bench] N={n}: built in {row['index_build_s']:.1f}s ({row['index']['kind']}); serving in a fresh process ...",
        flush=True,
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--serve-child",
        str(folder),
        "--child-size",
        str(n),
        "--params",
        json.dumps(p),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"serve phase failed for N={n}:\n{out.stderr[-4000:]}")
    row.update(json.loads(out.stdout.strip().splitlines()[-1]))
    targets = {
        "nearest_p99_le_10ms": row["nearest_k10_query_vector"]["p99_ms"] <= 10.0,
        "recall_at_10_ge_0.95": row["recall_at_10"] >= 0.95,
        "get_p99_le_1ms": row["get"]["p99_ms"] <= 1.0,
        "cold_start_le_30s": row["cold_start_s"] <= 30.0,
    }
    boosted = row.get("at_raised_priority", {})
    if "get" in boosted:
        targets["at_raised_priority"] = {
            "nearest_p99_le_10ms": boosted["nearest_k10_query_vector"]["p99_ms"] <= 10.0,
            "get_p99_le_1ms": boosted["get"]["p99_ms"] <= 1.0,
        }
    row["targets"] = targets
    print(
        f"[store_bench] N={n}: "
        + json.dumps({k: row[k] for k in ("cold_start_s", "recall_at_10")})
        + f" get p99 {row['get']['p99_ms']:.3f}ms nearest p99 {row['nearest_k10_query_vector']['p99_ms']:.2f}ms "
        f"targets {targets}",
        flush=True,
    )
    shutil.rmtree(folder, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    ap.add_argument("--sizes", help="comma-separated user counts (default 10000,100000,1000000)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/store_bench.json)")
    ap.add_argument("--work-dir", help="where stores are built (default: a temporary folder)")
    ap.add_argument("--serve-child", help=argparse.SUPPRESS)
    ap.add_argument("--child-size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.serve_child:
        result = serve_phase(json.loads(args.params), args.child_size, Path(args.serve_child))
        print(json.dumps(result))
        return result
    p = dict(QUICK if args.quick else FULL)
    if args.sizes:
        p["sizes"] = [int(s) for s in args.sizes.split(",")]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="store-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_size(p, n, work) for n in p["sizes"]]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    name = "store_bench_quick" if args.quick else "store_bench"
    payload = {
        "params": p,
        "results": rows,
        "targets": "at 1M users: nearest k=10 p99 <= 10 ms with recall@10 >= 0.95; get p99 <= 1 ms; cold start <= 30 s",
    }
    path = write_result(name, payload, out=args.out)
    print(f"[store_bench] wrote {path}")
    return payload


if __name__ == "__main__":
    main()
