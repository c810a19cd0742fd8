"""Benchmarks run end to end in their quick mode and write well-formed JSON."""

from __future__ import annotations

import json

from benchmarks import modulation_overhead


def test_modulation_overhead_quick(tmp_path):
    out = tmp_path / "mo.json"
    modulation_overhead.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "modulation_overhead_quick" and data["environment"]["torch"]
    rows = data["results"]
    assert {(r["batch"], r["text_tokens"]) for r in rows} == {(1, 8), (2, 8)}
    for r in rows:
        assert r["plain_s"] > 0 and r["premier_s"] > 0 and r["reference_s"] > 0
        assert abs(r["premier_over_plain"] - r["premier_s"] / r["plain_s"]) < 1e-9
    (flops,) = data["flops_flux_dev_sized"]
    # Per-token modulation adds work; re-running the adapters every step adds more.
    assert 1.0 < flops["premier_over_plain"] < flops["reference_over_plain"]
