"""The GPU suite's --tiny mode: the whole code path on a CPU, under a minute, well-formed JSON."""

from __future__ import annotations

import json
import time

from benchmarks import gpu_suite


def test_gpu_suite_tiny_runs_everything(tmp_path):
    out = tmp_path / "suite.json"
    t0 = time.perf_counter()
    gpu_suite.main(["--tiny", "--out", str(out)])
    assert time.perf_counter() - t0 < 60
    data = json.loads(out.read_text())
    assert data["benchmark"] == "gpu_suite_tiny" and data["tiny"] is True and data["card"] is None
    assert data["skipped"] == [], data["skipped"]
    res_hi, res_lo = gpu_suite.TINY["resolutions"]
    steps = {(r["variant"], r["resolution"], r["batch"]) for r in data["results"] if r["kind"] == "step"}
    for res in (res_hi, res_lo):
        for b in (1, 4, 8):
            assert {("plain_eager", res, b), ("premier_eager", res, b)} <= steps
    for variant in ("plain_compiled", "premier_compiled", "premier_float8"):
        assert (variant, res_hi, 1) in steps and (variant, res_lo, 8) in steps
    gens = {(r["variant"], r["resolution"], r["batch"]) for r in data["results"] if r["kind"] == "generation"}
    assert {
        ("plain_eager", res_hi, 1),
        ("premier_compiled", res_hi, 1),
        ("plain_compiled", res_lo, 1),
        ("premier_compiled", res_lo, 8),
        ("premier_float8", res_hi, 1),
    } <= gens
    for r in data["results"]:
        assert (r["step_s"] if r["kind"] == "step" else r["total_s"]) > 0
        if r["kind"] == "generation":
            assert r["steps"] == gpu_suite.TINY["steps"]
    # The first compiled call of a bucket compiles; the eager variants never do.
    first = {
        (r["variant"], r["resolution"], r["batch"]): r["new_graphs"] for r in data["results"] if r["kind"] == "step"
    }
    assert first[("premier_compiled", res_hi, 1)] >= 1 and first[("premier_eager", res_hi, 1)] == 0
    assert data["quantization"]["mode"] == "float8" and "error" not in data["quantization"]
    targets = data["targets"]
    assert {"premier_compiled_over_plain_compiled", "batch8_over_batch1_images_per_s"} <= set(targets)
    assert isinstance(targets["premier_compiled_over_plain_compiled"]["pass"], bool)
    assert data["kernel_bench"] == []  # GPU only
    checks = data["checks"]
    assert set(checks) == {"kernels_vs_inline_reference", "compiled_vs_eager", "premier_float8_vs_eager"}
    assert all(c["finite"] for c in checks.values())
    assert checks["kernels_vs_inline_reference"]["relative_l2"] == 0.0  # on a CPU both are the inline reference
    assert checks["compiled_vs_eager"]["relative_l2"] < 1e-5
    assert 0 < checks["premier_float8_vs_eager"]["relative_l2"] < 0.1
