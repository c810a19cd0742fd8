"""benchmarks/lora_serving.py: Premier vs per-user LoRA serving, a quick compiled run on the embedded model."""

from __future__ import annotations

import json

from benchmarks import lora_serving


def test_lora_serving_quick(tmp_path):
    out = tmp_path / "lora_serving.json"
    lora_serving.main(["--quick", "--compile", "--out", str(out)])
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["model"] == "embedded" and [lv["resident_users"] for lv in res["levels"]] == [1, 8]
    assert data["config"]["compile"] is True
    modes = {"premier", "premier-compiled", "base", "lora-mixed-r4", "lora-serial-r4", "lora-hotswap-r4"}
    for level in res["levels"]:
        r = level["results"]
        assert set(r) == modes
        for m in modes:
            assert r[m]["images_per_s"] > 0 and 0 < r[m]["latency_p50_ms"] <= r[m]["latency_p99_ms"]
        # a batch answers all eight together; one at a time, the last waits for the seven before it
        assert r["premier"]["latency_p50_ms"] == r["premier"]["latency_p99_ms"]
        assert r["lora-serial-r4"]["latency_p50_ms"] < r["lora-serial-r4"]["latency_p99_ms"]
        assert r["premier"]["images_per_s_over_premier"] == 1.0
        assert r["premier-compiled"]["images_per_s_over_premier_compiled"] == 1.0
        assert r["premier-compiled"]["user_state_bytes"] == r["premier"]["user_state_bytes"]
        n = level["resident_users"]
        per_user = level["lora_parameters_per_user_r4"]
        assert r["lora-mixed-r4"]["user_state_bytes"] == r["lora-serial-r4"]["user_state_bytes"] == 4 * per_user * n
        assert r["lora-hotswap-r4"]["user_state_bytes"] == 4 * per_user * n
        assert 0 < r["premier"]["user_state_bytes"] < r["lora-mixed-r4"]["user_state_bytes"]
        assert level["distinct_users_in_batch"] == min(n, 8)
    # FLUX.1-dev by computation: r x (in + out) on 8 projections in 19 double blocks and 3 in 38 single blocks
    sizes = data["per_user_size_flux_dev"]
    assert sizes["lora_r4"]["parameters"] == 4 * (19 * 8 + 38 * 3) * (3072 + 3072)
    assert sizes["lora_r16"]["parameters"] == 4 * sizes["lora_r4"]["parameters"]
    assert sizes["premier_direct"]["parameters"] == 30 * 1024
    assert out.with_suffix(".png").stat().st_size > 10_000
