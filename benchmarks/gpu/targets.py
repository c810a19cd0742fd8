"""The issue's targets with pass/fail, and the AdaLN kernel variants compared, from a result document."""

from __future__ import annotations

from typing import Any

import torch

from kernels import modulation

TARGETS = {
    "premier_compiled_over_plain_compiled_max": 1.03,  # step, batch 1, 1024x1024
    "batch8_over_batch1_images_per_s_min": 2.5,  # premier, 8 different users, 512x512
    "fused_kernel_speedup_vs_eager_min": 2.0,  # adaln_per_token (B=8, T=512, D=3072), device time
    "fused_kernel_fraction_of_copy_min": 0.70,  # the same, against a copy of the same bytes
}


def _find(rows: list[dict], variant: str, res: int, batch: int) -> dict | None:
    return next((r for r in rows if (r["variant"], r["resolution"], r["batch"]) == (variant, res, batch)), None)


def evaluate_targets(data: dict, spec: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"thresholds": TARGETS}
    hi, lo = (spec["resolutions"] * 2)[:2]
    steps = data["steps"]
    plain, premier = _find(steps, "plain_compiled", hi, 1), _find(steps, "premier_compiled", hi, 1)
    if plain and premier:
        ratio = premier["step_s"] / plain["step_s"]
        out["premier_compiled_over_plain_compiled"] = {
            "value": ratio,
            "pass": ratio <= TARGETS["premier_compiled_over_plain_compiled_max"],
            "resolution": hi,
        }
    for variant in ("premier_compiled", "premier_eager"):
        one, eight = _find(steps, variant, lo, 1), _find(steps, variant, lo, 8)
        if one and eight:
            ratio = eight["images_per_s_per_step"] / one["images_per_s_per_step"]
            out["batch8_over_batch1_images_per_s"] = {
                "value": ratio,
                "pass": ratio >= TARGETS["batch8_over_batch1_images_per_s_min"],
                "variant": variant,
                "resolution": lo,
            }
            break
    for variant in ("premier_compiled", "premier_eager"):
        ours, ref = _find(steps, variant, hi, 1), _find(steps, variant.replace("premier", "premier_reference"), hi, 1)
        if ours and ref:
            out["reference_way_over_precomputed_deltas"] = {"value": ref["step_s"] / ours["step_s"], "variant": variant}
            break
    kernel = next(
        (
            r
            for r in data["kernels"]
            if r["op"] == "adaln_per_token" and r.get("fused_speedup_vs_eager") and r["batch"] == 8
        ),
        None,
    )
    if kernel and kernel["copy"].get("device_us"):
        out["fused_kernel_speedup_vs_eager"] = {
            "value": kernel["fused_speedup_vs_eager"],
            "pass": kernel["fused_speedup_vs_eager"] >= TARGETS["fused_kernel_speedup_vs_eager_min"],
            "impl": kernel["fastest_fused"],
        }
        out["fused_kernel_fraction_of_copy"] = {
            "value": kernel["fused_fraction_of_copy"],
            "pass": kernel["fused_fraction_of_copy"] >= TARGETS["fused_kernel_fraction_of_copy_min"],
            "impl": kernel["fastest_fused"],
        }
    ratios = [
        r["impls"]["fused_reordered"]["device_us"] / r["impls"]["fused_original"]["device_us"]
        for r in data["kernels"]
        if r["impls"].get("fused_reordered", {}).get("device_us")
        and r["impls"].get("fused_original", {}).get("device_us")
    ]
    if ratios:
        mean = float(torch.tensor(ratios).log().mean().exp())
        out["adaln_reordered_over_original_device_time"] = {
            "value": mean,
            "rows": len(ratios),
            "faster": "reordered" if mean < 1 else "original",
            "default": modulation.get_adaln_variant(),
        }
    return out
