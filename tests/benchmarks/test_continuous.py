"""The continuous-batching benchmark runs end to end in its quick mode and writes well-formed JSON."""

from __future__ import annotations

import json

import pytest


@pytest.mark.filterwarnings("ignore")
def test_continuous_quick(tmp_path):
    from benchmarks import continuous

    out = tmp_path / "continuous.json"
    continuous.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["benchmark"] == "continuous_quick"
    (model,) = data["results"]
    assert model["model"] == "embedded" and model["request_level_saturation_rps"] > 0
    assert [row["load"] for row in model["levels"]] == [0.5, 1.0]
    for row in model["levels"]:
        for mode in ("request", "step"):
            r = row[mode]
            assert r["answered"] == r["requests"] == 8  # every request of the trace answered, in both modes
            assert r["latency_p99_s"] >= r["latency_p50_s"] > 0 and r["mean_occupancy"] >= 1
        assert (
            row["step"]["first_step_p50_s"] is not None and row["step"]["forwards"] >= 4
        )  # the shortest request's steps
        assert row["p50_latency_request_over_step"] == pytest.approx(
            row["request"]["latency_p50_s"] / row["step"]["latency_p50_s"]
        )
    assert (tmp_path / "continuous.png").is_file()
