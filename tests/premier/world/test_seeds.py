"""`premier eval-seeds` (premier/world/seeds.py): claims across stage-1 and fit seeds, on runs with known numbers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from premier.cli import EXIT_BAD_INPUT, main
from premier.errors import InvalidRequestError
from premier.world.seeds import combine, seed_bootstrap

USERS, PROMPTS = 6, 3


def run(stage1_seed, fit_seed, premier_gain, no_disp_gain=None, distinct=None) -> dict:
    """An eval.json as `premier eval` writes it: per-(user, prompt) alignments; Premier = base + gain (+ user noise)."""
    rng = np.random.default_rng([7 if stage1_seed is None else stage1_seed, 0 if fit_seed is None else fit_seed])
    base = rng.uniform(0.2, 0.3, USERS * PROMPTS)
    premier = base + premier_gain + rng.normal(0, 0.005, USERS * PROMPTS)
    pairs = {"base": base.tolist(), "start": base.tolist(), "premier": premier.tolist()}
    if no_disp_gain is not None:
        pairs["no_dispersion"] = (base + no_disp_gain).tolist()
    out = {
        "config": {"test_users": USERS, "history": 8, "denoise_steps": 8, "seed": 0},
        "world": {"world": {"version": "v2"}},
        "pairs": pairs,
    }
    out["config"].update(stage1_seed=stage1_seed, fit_seed=fit_seed)
    if distinct is not None:
        out["distinct"] = {k: {"per_user": [v] * USERS} for k, v in distinct.items()}
    return out


def claim(result: dict, words: str) -> dict:
    return next(c for c in result["claims"] if words in c["claim"])


def test_a_gain_on_every_seed_is_reproduced_and_counts_its_seeds():
    runs = [run(s, f, 0.05, 0.02, {"premier": 0.3, "no_dispersion": 0.1}) for s in (None, 1, 2) for f in (None, 5)]
    result = combine(runs)
    beats_base = claim(result, "beats the base model")
    assert beats_base["verdict"] == "reproduced" and beats_base["difference"] == pytest.approx(0.05, abs=0.005)
    assert beats_base["stage1_seeds"] == 3 and beats_base["runs"] == 6
    assert claim(result, "w/o dispersion loss")["verdict"] == "reproduced"  # 0.05 vs 0.02
    fig8 = claim(result, "distinguishable")
    assert fig8["reading"] == "distinct" and fig8["difference"] == pytest.approx(0.2)
    assert claim(result, "fitting adds")["verdict"] == "reproduced"
    assert not any("block-shared" in c["claim"] for c in result["claims"])  # not run: not claimed


def test_a_gain_that_one_stage1_seed_reverses_is_within_noise():
    """Each run alone is clear-cut over its users; across trained models it is not."""
    runs = [run(0, None, 0.05), run(1, None, -0.05), run(2, None, 0.05)]
    assert claim(combine(runs[:1]), "beats the base")["verdict"] == "reproduced"
    assert claim(combine(runs), "beats the base")["verdict"] == "within noise"
    assert claim(combine([run(0, None, -0.05), run(1, None, -0.04)]), "beats the base")["verdict"] == "not reproduced"


def test_seed_bootstrap_resamples_seeds_and_users():
    mean, lo, hi = seed_bootstrap({0: np.full(5, 0.1), 1: np.full(5, 0.1)})
    assert mean == pytest.approx(0.1) and lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    mean, lo, hi = seed_bootstrap({0: np.full(5, 0.1), 1: np.full(5, -0.1)})
    assert mean == pytest.approx(0.0) and lo < 0 < hi


def test_runs_that_are_not_comparable_are_refused(tmp_path, capsys):
    a, b = run(0, None, 0.05), run(1, None, 0.05)
    b["config"]["test_users"] = 5
    with pytest.raises(InvalidRequestError, match="differ in test_users"):
        combine([a, b])
    with pytest.raises(InvalidRequestError, match="same seeds"):
        combine([a, run(0, None, 0.02)])
    with pytest.raises(InvalidRequestError, match="at least one"):
        combine([])
    good, bad = tmp_path / "a.json", tmp_path / "b.json"
    good.write_text(json.dumps(a))
    bad.write_text("{not json")
    for argv, words in (
        ([str(good), str(tmp_path / "missing.json")], "missing.json is not an eval.json"),
        ([str(good), str(bad)], "b.json is not an eval.json written by premier eval"),
    ):
        assert main(["eval-seeds", *argv, "--docs", str(tmp_path / "docs")]) == EXIT_BAD_INPUT
        assert words in capsys.readouterr().err


def test_the_command_writes_its_report(tmp_path, capsys):
    paths = []
    for i, (s, f) in enumerate(((None, None), (1, None), (1, 4))):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(run(s, f, 0.05)))
    assert main(["eval-seeds", *map(str, paths), "--docs", str(tmp_path / "docs")]) == 0
    report = (tmp_path / "docs" / "eval_seeds.md").read_text()
    assert "(world, world), (1, world), (1, 4)" in report
    assert "| Premier beats the base model (Table 1) | +0.0" in report and "| 2 | 3 | reproduced |" in report
    saved = json.loads((tmp_path / "docs" / "eval_seeds.json").read_text())
    assert saved["runs"] == 3 and claim(saved, "beats the base")["verdict"] == "reproduced"


def test_fig6_claims_read_the_sweeps_users():
    """The sweep has its own (fewer) users: linear combination ahead at 1 image, direct fitting ahead at 16."""
    result = run(0, None, 0.05)
    result["config"]["sweep_users"] = 3
    rng = np.random.default_rng(3)
    low = rng.uniform(0.2, 0.3, 3 * PROMPTS)
    result["pairs"].update(
        {
            "sweep-coefficients-1": (low + 0.04).tolist(),
            "sweep-direct-1": low.tolist(),
            "sweep-coefficients-16": low.tolist(),
            "sweep-direct-16": (low + 0.03).tolist(),
        }
    )
    claims = combine([result])
    at1 = claim(claims, "linear combination beats direct fitting with 1 history image ")
    assert at1["verdict"] == "reproduced" and at1["users"] == 3 and at1["difference"] == pytest.approx(0.04)
    assert claim(claims, "direct fitting beats linear combination with 16 history images")["verdict"] == "reproduced"
    assert not any("with 2 history images" in c["claim"] for c in claims["claims"])  # not in the sweep: not claimed
