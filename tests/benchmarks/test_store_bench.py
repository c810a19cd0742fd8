"""The store benchmark runs end to end in its quick mode and writes well-formed JSON."""

from __future__ import annotations

import json

from benchmarks import store_bench


def test_store_bench_quick(tmp_path):
    out = tmp_path / "sb.json"
    store_bench.main(["--quick", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "store_bench_quick" and data["environment"]["machine"]
    (row,) = data["results"]
    assert row["users"] == 3000 and row["index"]["kind"] == "ivf"  # quick mode sets exact_max=1000
    assert row["insert"]["users_per_s"] > 0 and row["index_build_s"] > 0 and row["cold_start_s"] > 0
    for key in (
        "get",
        "nearest_k10_query_vector",
        "nearest_k10_user_id",
        "nearest_k10_exact_path",
        "materialise_uncached",
        "materialise_cached",
        "single_put_durable",
    ):
        assert 0 < row[key]["p50_ms"] <= row[key]["p99_ms"], key
    # Recall is measured against brute force over every stored vector; the exact path must agree with it.
    assert row["recall_at_10_exact_path"] >= 0.98 and 0.9 <= row["recall_at_10"] <= 1.0
    assert row["disk"]["database_bytes_per_user"] > 4 * 64  # at least the 64 float32 coefficients
    assert row["memory"]["index_bytes_per_user"] > 0
    assert set(row["targets"]) >= {"nearest_p99_le_10ms", "recall_at_10_ge_0.95", "get_p99_le_1ms", "cold_start_le_30s"}
    assert not (tmp_path / "work" / "store-3000").exists()  # the benchmark cleans up its stores
