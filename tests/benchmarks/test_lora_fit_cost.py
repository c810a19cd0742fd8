"""benchmarks/lora_fit_cost.py: steps to the same held-out loss, a quick run on the shipped world."""

from __future__ import annotations

import json

from benchmarks import lora_fit_cost


def test_first_reaching():
    curve = [(0, 0.5), (5, 0.4), (10, 0.3), (15, 0.35)]
    assert lora_fit_cost.first_reaching(curve, 0.4) == 5 and lora_fit_cost.first_reaching(curve, 0.2) is None


def test_lora_fit_cost_quick(tmp_path):
    out = tmp_path / "cost.json"
    lora_fit_cost.main(["--quick", "--out", str(out)])
    data = json.loads(out.read_text())
    (user,) = data["users"]
    fits = user["fits"]
    assert set(fits) == {"premier-lc", "premier-direct", "lora-r4"}
    target = user["target_held_out"]
    for f in fits.values():
        steps = [s for s, _ in f["curve"]]
        assert steps == list(range(0, 21, 5))  # evaluated every 5 steps, never stopped early
        assert f["best_held_out"] <= target and f["steps_to_target"] in steps
        assert f["curve"][steps.index(f["steps_to_target"])][1] <= target
    # the target is the worst method's best: that method reaches it exactly at its best
    assert max(f["best_held_out"] for f in fits.values()) == target
    assert fits["premier-lc"]["parameters"] < fits["premier-direct"]["parameters"] < fits["lora-r4"]["parameters"]
    assert fits["lora-r4"]["file_bytes"] > 4 * fits["lora-r4"]["parameters"]
    assert set(data["summary"]) == set(fits)
