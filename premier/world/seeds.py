"""`premier eval-seeds`: several `premier eval` runs that differ only in their seeds, read as one result.

A difference between two models is measured per test user (its prompts averaged: they share a fit)
and per run. Runs are grouped by stage-1 seed (their fit seeds averaged: a fit seed is noise within
one stage-1 model); the interval is a bootstrap that resamples stage-1 seeds and, independently,
test users (users are crossed with seeds: the same users in every run). So a claim must hold
across trained models and across users, not only across the images of one run.

Each of the paper's claims is labelled "reproduced" (the interval excludes 0 on the paper's side),
"not reproduced" (it excludes 0 on the other side) or "within noise" (it includes 0).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from premier.errors import InvalidRequestError

CLAIMS = (  # (label, higher, lower, reading): the paper says `higher` beats `lower`
    ("Premier beats the base model (Table 1)", "premier", "base", "alignment"),
    ("fitting adds to the mean training user", "premier", "start", "alignment"),
    ("w/o dispersion loss is worse (Table 2)", "premier", "no_dispersion", "alignment"),
    ("w/o block-shared adapter is worse (Table 2)", "premier", "no_shared", "alignment"),
    ("w/o block-distinct adapter is worse (Table 2)", "premier", "no_distinct", "alignment"),
    ("w/o PPM is worse (Table 2)", "premier", "no_ppm", "alignment"),
    ("dispersion makes users more distinguishable (Fig. 8)", "premier", "no_dispersion", "distinct"),
    *(  # Fig. 6: below 8 history images linear combination wins; above, direct fitting (from scratch) does
        (
            f"linear combination beats direct fitting with {k} history image{'s' if k > 1 else ''} (Fig. 6)",
            f"sweep-coefficients-{k}",
            f"sweep-direct-{k}",
            "sweep",
        )
        for k in (1, 2, 4)
    ),
    *(
        (
            f"direct fitting beats linear combination with {k} history images (Fig. 6)",
            f"sweep-direct-{k}",
            f"sweep-coefficients-{k}",
            "sweep",
        )
        for k in (16, 32)
    ),
)


def per_user(run: dict[str, Any], key: str, reading: str) -> np.ndarray | None:
    """Per test user: mean alignment over its prompts ("alignment"; "sweep": the sweep's users), or its Fig. 8
    accuracy ("distinct")."""
    if reading == "distinct":
        row = (run.get("distinct") or {}).get(key)
        return None if row is None else np.asarray(row["per_user"], dtype=np.float64)
    pairs = (run.get("pairs") or {}).get(key)
    if pairs is None:
        return None
    users = run["config"]["sweep_users" if reading == "sweep" else "test_users"]
    return np.asarray(pairs, dtype=np.float64).reshape(users, -1).mean(1)


def seed_bootstrap(diffs: dict[int, np.ndarray], draws: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """Mean difference and a 95 % interval resampling stage-1 seeds and users. `diffs[s]`: (users,) per seed."""
    table = np.stack([diffs[s] for s in sorted(diffs)])  # (seeds, users)
    rng = np.random.default_rng(seed)
    n_seeds, n_users = table.shape
    s_idx = rng.integers(0, n_seeds, (draws, n_seeds))
    u_idx = rng.integers(0, n_users, (draws, n_users))
    means = np.array([table[np.ix_(s, u)].mean() for s, u in zip(s_idx, u_idx)])
    return float(table.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def verdict(lo: float, hi: float) -> str:
    return "reproduced" if lo > 0 else ("not reproduced" if hi < 0 else "within noise")


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The claims that these runs can answer, each with its difference, interval, label and seeds used."""
    if not runs:
        raise InvalidRequestError("runs", "give at least one eval.json")
    first = runs[0]
    for run in runs[1:]:
        for name in ("test_users", "history", "denoise_steps", "seed"):
            if run["config"].get(name) != first["config"].get(name):
                raise InvalidRequestError(
                    "runs", f"the runs differ in {name} ({first['config'].get(name)} vs {run['config'].get(name)})"
                )
        if run["world"] != first["world"]:
            raise InvalidRequestError("runs", "the runs were made in different worlds")
    seeds = [(run["config"].get("stage1_seed"), run["config"].get("fit_seed")) for run in runs]
    if len(set(seeds)) != len(seeds):
        raise InvalidRequestError("runs", f"two runs have the same seeds: {seeds}")
    claims = [c for label, *keys in CLAIMS if (c := _difference(runs, seeds, label, *keys)) is not None]
    settings = sorted({k for run in runs for k in (run.get("pairs") or {}) if ":" in k})  # premier:diag, ...
    compared = [
        _difference(runs, seeds, f"{k} minus {k.split(':')[0]}", k, k.split(":")[0], "alignment") for k in settings
    ]
    return {
        "runs": len(runs),
        "seeds": [list(s) for s in seeds],
        "claims": claims,
        "settings": [c for c in compared if c is not None],
    }


def _difference(
    runs: list[dict[str, Any]], seeds: list[tuple[Any, Any]], label: str, higher: str, lower: str, reading: str
) -> dict[str, Any] | None:
    """`higher` minus `lower` per user, fit seeds averaged within a stage-1 seed, with its interval and label."""
    by_seed: dict[int, list[np.ndarray]] = {}
    for run, (s1, _) in zip(runs, seeds):
        a, b = per_user(run, higher, reading), per_user(run, lower, reading)
        if a is not None and b is not None:
            by_seed.setdefault(-1 if s1 is None else s1, []).append(a - b)
    if not by_seed:
        return None
    table = {s: np.mean(d, axis=0) for s, d in by_seed.items()}
    mean, lo, hi = seed_bootstrap(table)
    users = len(next(iter(table.values())))
    return {
        "claim": label,
        "difference": round(mean, 5),
        "interval": [round(lo, 5), round(hi, 5)],
        "verdict": verdict(lo, hi) if users > 1 or len(table) > 1 else "one user: no interval",
        "users": users,
        "reading": reading,
        "stage1_seeds": len(by_seed),
        "runs": sum(len(d) for d in by_seed.values()),
    }


def claim_lines(result: dict[str, Any]) -> list[str]:
    """The claims as a Markdown table (docs/eval_seeds.md, and docs/eval.md for its one run), then the runs with
    other dispersion settings against their own variant's (no claim of the paper's: higher, lower or within noise)."""
    lines = ["| claim | difference | 95 % interval | stage-1 seeds | runs | verdict |", "|---|---|---|---|---|---|"]
    for c in result["claims"]:
        lo, hi = c["interval"]
        lines.append(
            f"| {c['claim']} | {c['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {c['stage1_seeds']} | {c['runs']} | "
            f"{c['verdict']} |"
        )
    if result.get("settings"):
        lines += ["", "| other settings (alignment) | difference | 95 % interval | stage-1 seeds | runs | reading |"]
        lines.append("|---|---|---|---|---|---|")
        for c in result["settings"]:
            lo, hi = c["interval"]
            word = {"reproduced": "higher", "not reproduced": "lower"}.get(c["verdict"], c["verdict"])
            lines.append(
                f"| {c['claim']} | {c['difference']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {c['stage1_seeds']} | "
                f"{c['runs']} | {word} |"
            )
    return lines


def write_seeds_report(result: dict[str, Any], out: str | Path, sources: list[str]) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown = ", ".join(f"({'world' if a is None else a}, {'world' if b is None else b})" for a, b in result["seeds"])
    lines = [
        "# The eval's claims across seeds",
        "",
        "Generated by `premier eval-seeds`; do not edit by hand. Method: premier/world/seeds.py.",
        "",
        f"{result['runs']} runs, (stage-1 seed, fit seed): {shown}. From: {', '.join(sources)}.",
        "",
        "Differences are per test user (alignment: its prompts averaged; Fig. 8: its accuracy), fit seeds averaged "
        "within a stage-1 seed; 95 % intervals resample stage-1 seeds and users. With one stage-1 seed the interval "
        "is over users only and says nothing about another training run.",
        "",
        *claim_lines(result),
    ]
    md, js = out / "eval_seeds.md", out / "eval_seeds.json"
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(result, indent=1) + "\n")
    return [md, js]


__all__ = ["CLAIMS", "claim_lines", "combine", "per_user", "seed_bootstrap", "verdict", "write_seeds_report"]
