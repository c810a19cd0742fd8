"""Variants with other dispersion settings (premier/world/stages.py's grammar): parsed, named and read."""

from __future__ import annotations

import pytest

from premier.errors import InvalidRequestError
from premier.training.config import Stage1Config
from premier.world.stages import canonical_variant, parse_variant, stage1_config, variant_folder


def test_settings_parse_to_one_spelling_one_folder_and_one_config():
    assert parse_variant("premier") == ("premier", {})
    assert parse_variant("no_ppm:dim:tau=0.5") == ("no_ppm", {"dispersion": "dim", "tau": 0.5})
    assert canonical_variant("premier:lambda=0.10:diag") == "premier:diag:lambda=0.1"
    assert canonical_variant("premier:tau=2:lambda=1e-2") == "premier:lambda=0.01:tau=2"
    assert variant_folder("premier:lambda=0.10:diag") == "premier-diag-lambda0.1"
    base = Stage1Config(dispersion_scale="mean", lambda_shared=0.1, lambda_distinct=0.1, tau=1.0)
    cfg = stage1_config("premier:dim:lambda=0.01:tau=0.5", base)
    assert (cfg.dispersion_scale, cfg.lambda_shared, cfg.lambda_distinct, cfg.tau) == ("dim", 0.01, 0.01, 0.5)
    assert stage1_config("premier", base) == base
    off = stage1_config("no_dispersion", base)
    assert off.lambda_shared == off.lambda_distinct == 0.0 and off.dispersion_scale == "mean"
    assert stage1_config("no_shared:diag", base).dispersion_scale == "diag"


@pytest.mark.parametrize(
    "name, words",
    [
        ("bogus", "unknown 'bogus'"),
        ("premier:cosine", "unknown setting 'cosine'"),
        ("premier:lambda=x", "lambda in 'premier:lambda=x' must be a finite number"),
        ("premier:lambda=-1", "lambda in 'premier:lambda=-1' must be a finite number >= 0"),
        ("premier:lambda=nan", "must be a finite number"),
        ("premier:tau=0", "tau in 'premier:tau=0' must be a finite number >= 0 (tau > 0)"),
        ("premier:diag:dim", "dispersion is given twice"),
        ("premier:lambda=1:lambda=2", "lambda is given twice"),
        ("no_dispersion:diag", "no_dispersion has no dispersion to set"),
        ("premier:", "unknown setting ''"),
    ],
)
def test_bad_settings_are_refused_naming_the_part(name, words):
    with pytest.raises(InvalidRequestError) as exc:
        parse_variant(name)
    assert exc.value.field == "variants" and words in str(exc.value)


def test_reports_label_and_order_the_settings_runs():
    from premier.world.report import variant_keys, variant_label

    assert variant_label("premier:dim:lambda=0.01") == "Premier (full), dispersion dim, λ 0.01"
    assert variant_label("no_ppm:tau=0.5") == "w/o PPM (empty prompt into the adapters), τ 0.5"
    rows = dict.fromkeys(["base", "no_ppm", "premier:diag", "no_dispersion", "premier", "start", "premier:dim"])
    assert variant_keys(rows) == ["premier", "premier:diag", "premier:dim", "no_dispersion", "no_ppm"]


def test_eval_seeds_reads_settings_runs_against_their_own_variant():
    """Not a claim of the paper's: a settings run is read against its variant at the world's settings, over the same
    users and seeds, as higher, lower or within noise."""
    import numpy as np

    from premier.world.seeds import claim_lines, combine

    rng = np.random.default_rng(0)
    runs = []
    for seed in (1, 2, 3):
        base = rng.uniform(0.2, 0.3, 12)  # 4 users x 3 prompts
        pairs = {"base": base.tolist(), "premier": (base + 0.05).tolist(), "premier:diag": (base + 0.08).tolist()}
        pairs["premier:dim"] = (base + 0.05 + rng.normal(0, 0.001, 12)).tolist()
        runs.append(
            {
                "config": {"test_users": 4, "history": 8, "denoise_steps": 8, "seed": 0, "stage1_seed": seed},
                "world": {"world": {"version": "v2"}},
                "pairs": pairs,
            }
        )
    result = combine(runs)
    by = {c["claim"]: c for c in result["settings"]}
    assert set(by) == {"premier:diag minus premier", "premier:dim minus premier"}
    assert by["premier:diag minus premier"]["difference"] == pytest.approx(0.03)
    assert (
        by["premier:diag minus premier"]["verdict"] == "reproduced"
        and by["premier:diag minus premier"]["stage1_seeds"] == 3
    )
    assert by["premier:dim minus premier"]["verdict"] == "within noise"
    table = "\n".join(claim_lines(result))
    assert "| premier:diag minus premier | +0.030 |" in table and table.rstrip().endswith("within noise |")
    assert "| other settings (alignment) |" in table and "| higher |" in table
