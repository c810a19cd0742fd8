"""`premier eval`: the paper's Table 1, Table 2 and Fig. 6 questions, asked of the world.

On the held-out test users (disjoint from the training users): each is fitted by stage 2 from
its first `history` images, then every test prompt is generated for it and scored by the probe
against the ground truth. Rows:

- ground truth: canonical renders (the metrics' ceiling);
- base: the base model without a user (the FLUX.1-dev analogue);
- premier and the ablations (`premier.world.stages.VARIANTS`), each its own stage-1 run with
  the same data and budget (the shipped checkpoint is `premier`; ablations are trained into
  WORK on first use and reused afterwards);
- the Fig. 6 sweep: linear combination vs direct fitting at each history size.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.files import atomic_save_safetensors, read_safetensors
from premier.models.embedded import PREMIER_DIR, EmbeddedSpec, build_embedded_flux, embedded_premier_config
from premier.models.loading import profile_for
from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest, GenerationSettings
from premier.training.config import OptimConfig, Stage1Config, Stage2Config
from premier.training.prepared import DataEncoder, PreparedDataset
from premier.training.stage1 import latest_checkpoint
from premier.world.build import PROBE_DIR, read_world, stage1_dir
from premier.world.probe import WorldProbe
from premier.world.render import render
from premier.world.spec import content_of
from premier.world.stages import VARIANTS, build_trainer, encode_user, fit, prepare, use_variant
from premier.world.users import WorldConfig, WorldUser, held_out_users, write_training_data

LABELS = {
    "premier": "Premier (full)",
    "no_dispersion": "w/o dispersion loss",
    "no_shared": "w/o block-shared adapter",
    "no_distinct": "w/o block-distinct adapter",
    "no_ppm": "w/o PPM (empty prompt into the adapters)",
}


START_LABEL = "Premier, no history (stage 2's starting point: the mean training user)"


@dataclass(frozen=True)
class EvalConfig:
    test_users: int = 12  # all of the world's held-out users
    history: int = 8
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sweep_users: int = 4
    variants: tuple[str, ...] = VARIANTS
    denoise_steps: int = 8
    seed: int = 0

    def check(self, world: WorldConfig) -> None:
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise InvalidRequestError("variants", f"unknown {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
        if not 1 <= self.test_users <= world.test_users:
            raise InvalidRequestError("test_users", f"must be in [1, {world.test_users}] (the world's test users)")
        if not 1 <= self.sweep_users <= self.test_users:
            raise InvalidRequestError("sweep_users", f"must be in [1, {self.test_users}]")
        for k in (self.history, *self.sweep):
            if not 1 <= k <= world.test_history:
                raise InvalidRequestError("history", f"history sizes must be in [1, {world.test_history}], got {k}")
        if self.denoise_steps < 1:
            raise InvalidRequestError("denoise_steps", "must be positive")

    @classmethod
    def quick(cls) -> "EvalConfig":
        return cls(test_users=1, history=2, sweep=(1, 2), sweep_users=1, denoise_steps=2)


def stage2_from_dict(d: dict[str, Any]) -> Stage2Config:
    optim = dict(d.get("optim", {}))
    if "betas" in optim:
        optim["betas"] = tuple(optim["betas"])
    return Stage2Config(**{**d, "optim": OptimConfig(**optim)})


class ResultCache:
    """Finished rows (scores and images) under WORK/eval-cache/<key>/, so a stopped or extended eval
    (more variants, more history sizes) redoes nothing it already did with the same settings."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = folder / key

    def get(self, name: str) -> tuple[dict[str, float], np.ndarray] | None:
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        tensors, meta = read_safetensors(path, error=lambda m: InvalidRequestError("eval cache", m))
        return json.loads(meta["row"]), tensors["images"].numpy()

    def put(self, name: str, row: dict[str, float], images: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"images": torch.from_numpy(np.ascontiguousarray(images))},
                                self.folder / f"{name}.safetensors", metadata={"row": json.dumps(row)})  # fmt: skip


class Evaluator:
    def __init__(self, world_dir: str | Path, work: str | Path, config: EvalConfig, progress: bool = False, log=print):
        self.world_dir, self.work = Path(world_dir), Path(work)
        self.info = read_world(self.world_dir)
        cfg = self.info["config"]
        self.world = WorldConfig(**cfg["world"])
        self.stage1 = Stage1Config.from_dict(cfg["stage1"])
        self.stage2 = stage2_from_dict(cfg["stage2"])
        config.check(self.world)
        self.config, self.progress, self.log = config, progress, log
        self.spec = EmbeddedSpec()
        self.flux_pipe = build_embedded_flux(weights=self.world_dir)
        self.profile = profile_for(self.flux_pipe, embedded=True)
        self.encoder = DataEncoder(self.flux_pipe, self.spec.image_size, self.spec.max_sequence_length, batch_size=64,
                                   storage_dtype=torch.float32)  # fmt: skip
        self.probe = WorldProbe.load(self.world_dir / PROBE_DIR)
        self.users = held_out_users(self.world)[: config.test_users]
        self.empty_text = self.encoder.encode_prompts([""])[0][0]
        self.requests = [(u, p) for u in self.users for p in u.test_prompts]
        self.settings = GenerationSettings(height=self.spec.image_size, width=self.spec.image_size,
                                           steps=config.denoise_steps, guidance=1.0)  # fmt: skip
        self.reused: list[str] = []
        self.cache = ResultCache(self.work / "eval-cache", {
            "world": {k: self.info["steps"].get(k, {}).get("checkpoint_id") for k in ("stage1",)},
            "config": self.info["config"], "test_users": config.test_users, "history": config.history,
            "denoise_steps": config.denoise_steps, "seed": config.seed,
        })  # fmt: skip

    def cached(self, name: str, compute: Callable[[], tuple[dict[str, float], np.ndarray]]) -> tuple[dict[str, float], np.ndarray]:
        hit = self.cache.get(name)
        if hit is not None:
            self.log(f"eval: {name} from the cache")
            self.reused.append(name)
            return hit
        row, images = compute()
        self.cache.put(name, row, images)
        return row, images

    # ------------------------------------------------------------------ pieces
    def checkpoint(self, variant: str) -> tuple[PremierModel, str]:
        if variant == "premier":
            model, ckpt = PremierModel.load(self.world_dir / PREMIER_DIR)
        else:
            run = stage1_dir(self.work, variant)
            folder = latest_checkpoint(run)
            if folder is None or int(folder.name.split("-")[-1]) < self.stage1.steps:
                folder = self._train(variant, run)
            model, ckpt = PremierModel.load(folder)
        return use_variant(model, variant, self.empty_text), ckpt

    def _train(self, variant: str, run: Path) -> Path:
        prepared = self.work / "prepared"
        if not (prepared / "dataset.json").is_file():
            self.log(f"eval: writing and preparing the training data in {self.work}")
            write_training_data(self.world, self.work / "raw")
            prepare(self.flux_pipe, self.work / "raw", prepared, self.spec.image_size, self.spec.max_sequence_length)
        started = time.perf_counter()
        import shutil

        shutil.rmtree(run, ignore_errors=True)
        trainer = build_trainer(self.flux_pipe.transformer, PreparedDataset(prepared), run, variant, self.stage1,
                                embedded_premier_config(self.spec))  # fmt: skip
        trainer.run(progress=self.progress)
        self.log(f"eval: trained stage 1 '{variant}' ({self.stage1.steps} steps) in {time.perf_counter() - started:.0f}s")
        folder = latest_checkpoint(run)
        assert folder is not None
        return folder

    def fit_users(self, premier: PremierModel, ckpt: str, users: list[WorldUser], k: int, mode: str) -> list[torch.Tensor]:
        tokens = []
        for user in users:
            result = fit(self.flux_pipe.transformer, premier, ckpt, encode_user(self.encoder, user, k), user.user_id, mode,
                         self.stage2)  # fmt: skip
            tokens.append(result.record.materialise(premier.users, ckpt) if mode == "coefficients" else result.record.vector)
        return tokens

    def generate(self, premier: PremierModel | None, ckpt: str | None, tokens: dict[str, torch.Tensor] | None,
                 users: list[WorldUser]) -> np.ndarray:  # fmt: skip
        pipe = PremierPipeline(self.flux_pipe, premier, self.profile, ckpt)
        reqs = [GenerationRequest(p, tokens[u.user_id] if tokens else None, self.config.seed + i)
                for i, (u, p) in enumerate((u, p) for u in users for p in u.test_prompts)]  # fmt: skip
        out = []
        for i in range(0, len(reqs), 128):
            out += [r.image for r in pipe(reqs[i : i + 128], self.settings, output_type="np")]
        return np.stack(out)

    def score(self, images: np.ndarray, users: list[WorldUser], base: np.ndarray | None) -> dict[str, float]:
        pairs = [(u, p) for u in users for p in u.test_prompts]
        styles = [u.style for u, _ in pairs]
        contents = [content_of(p) for _, p in pairs]
        truth = np.stack([render(c, s, jitter=False) for c, s in zip(contents, styles)])
        align = self.probe.preference_alignment(images, styles)
        row = {
            "alignment": float(align.mean()),
            "text": float(self.probe.text_consistency(images, contents).mean()),
            "distance": float(self.probe.distance(images, truth).mean()),
        }
        if base is not None:
            base_align = self.probe.preference_alignment(base, styles)
            row["win_rate"] = float(((align > base_align).float() + 0.5 * (align == base_align).float()).mean())
        return row

    def _pairs(self, images: np.ndarray, styles: list) -> list[float]:
        """Alignment per (user, prompt): comparisons are paired over them (`paired_difference`)."""
        return [round(float(a), 5) for a in self.probe.preference_alignment(images, styles)]

    # ------------------------------------------------------------------ the run
    def run(self, on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """All rows; `on_update` gets the results so far after each row (a long run reports as it goes)."""
        cfg, started = self.config, time.perf_counter()
        results: dict[str, Any] = {"config": {**cfg.__dict__, "sweep": list(cfg.sweep), "variants": list(cfg.variants)},
                                   "world": self.info["config"], "rows": {}, "sweep": {}}  # fmt: skip
        users = self.users
        truth = np.stack([render(content_of(p), u.style, jitter=False) for u, p in self.requests])
        results["rows"]["ground_truth"] = self.score(truth, users, None)
        base_images = self.generate(None, None, None, users)  # cheap, and every win rate needs it
        results["rows"]["base"], base = self.cached("base", lambda: (self.score(base_images, users, base_images), base_images))
        self.log(f"eval: base {results['rows']['base']}")
        styles = [u.style for u, _ in self.requests]
        pairs = results["pairs"] = {"base": self._pairs(base, styles)}
        images = {"base": base}
        results["examples"] = images
        results["reused"] = self.reused
        results["pending"] = list(cfg.variants) + (["sweep"] if "premier" in cfg.variants else [])

        def update() -> None:
            results["seconds"] = round(time.perf_counter() - started, 1)
            if on_update is not None:
                on_update(results)

        if "premier" in cfg.variants:
            # Stage 2's starting point (the uniform mix of the training users) without any image: what
            # the fit from a user's images adds is the distance from this row to the Premier row.
            def start_row() -> tuple[dict[str, float], np.ndarray]:
                premier, ckpt = self.checkpoint("premier")
                start = premier.users.materialise(torch.full((len(premier.users),), 1.0 / len(premier.users))).detach()
                imgs = self.generate(premier, ckpt, {u.user_id: start for u in users}, users)
                return self.score(imgs, users, base), imgs

            results["rows"]["start"], start_images = self.cached("start", start_row)
            pairs["start"] = self._pairs(start_images, styles)
            self.log(f"eval: start {results['rows']['start']}")

        for variant in sorted(cfg.variants, key=lambda v: v != "premier"):  # Table 1 and the sweep first
            loaded: dict[str, Any] = {}

            def load() -> tuple[PremierModel, str]:
                if not loaded:
                    loaded["model"] = self.checkpoint(variant)
                return loaded["model"]

            def table_row() -> tuple[dict[str, float], np.ndarray]:
                premier, ckpt = load()
                tokens = dict(zip([u.user_id for u in users], self.fit_users(premier, ckpt, users, cfg.history, "coefficients")))
                imgs = self.generate(premier, ckpt, tokens, users)
                return self.score(imgs, users, base), imgs

            results["rows"][variant], images[variant] = self.cached(variant, table_row)
            pairs[variant] = self._pairs(images[variant], styles)
            self.log(f"eval: {variant} {results['rows'][variant]}")
            results["pending"].remove(variant)
            update()
            if variant == "premier":
                sweep_users = users[: cfg.sweep_users]
                n = sum(len(u.test_prompts) for u in sweep_users)
                for mode in ("coefficients", "direct"):
                    for k in cfg.sweep:

                        def sweep_row(mode: str = mode, k: int = k) -> tuple[dict[str, float], np.ndarray]:
                            premier, ckpt = load()
                            toks = dict(zip([u.user_id for u in sweep_users], self.fit_users(premier, ckpt, sweep_users, k, mode)))
                            imgs = self.generate(premier, ckpt, toks, sweep_users)
                            return self.score(imgs, sweep_users, base[:n]), imgs

                        row, imgs = self.cached(f"sweep-{mode}-{k}-users{cfg.sweep_users}", sweep_row)
                        pairs[f"sweep-{mode}-{k}"] = self._pairs(imgs, styles[:n])
                        results["sweep"].setdefault(mode, {})[str(k)] = row
                        self.log(f"eval: sweep {mode} k={k} {row}")
                        update()
                results["pending"].remove("sweep")
                update()
        return results


def write_report(results: dict[str, Any], docs: str | Path, command: str) -> list[Path]:
    """docs/eval.md (tables, the command, its run time), docs/eval.json and the PNG plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    rows, sweep, cfg = results["rows"], results["sweep"], results["config"]
    written = []

    def fmt(row: dict[str, float], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "–"

    lines = [
        "# Evaluation in the synthetic world",
        "",
        "Generated by `premier eval`; do not edit by hand. How the world and its metrics are built: [world.md](world.md).",
        "",
        f"Command: `{command}`  ",
        f"Run time: {results['seconds'] / 60:.1f} min on the development machine (2 CPU cores, shared with other work)"
        + (f", not counting {len(results['reused'])} results reused from earlier runs' cache ({', '.join(results['reused'])})"
           if results.get("reused") else "") + ".  ",
        f"Test users: {cfg['test_users']} held-out users x {results['world']['world']['test_prompts']} "
        f"test prompts, each user fitted by stage 2 (linear combination) from {cfg['history']} history images; "
        f"{cfg['denoise_steps']} denoising steps, one seed per (user, prompt).",
        "",
        "Metrics (all from images, by the probe; see world.md): **alignment** = mean probability of the user's level of each",
        "style factor (ViPer score analogue, higher is better); **win rate** = share of (user, prompt) pairs whose alignment",
        "beats the base model's image for the same prompt and seed (ViPer rate analogue); **text** = mean probability of the",
        "prompt's content levels (CLIP T2I analogue); **distance** = probe-feature distance to the ground-truth render of the",
        "prompt in the user's style (LPIPS analogue, lower is better).",
        "",
        *([f"**Incomplete run**: not yet evaluated: {', '.join(results['pending'])}.", ""] if results.get("pending") else []),
        "## Table 1 / Table 2: base vs Premier and the ablations",
        "",
        "| model | alignment ↑ | win rate vs base ↑ | text ↑ | distance to truth ↓ |",
        "|---|---|---|---|---|",
    ]
    names = {"ground_truth": "ground-truth renders (ceiling)", "base": "base model, no user", "start": START_LABEL, **LABELS}
    for key, row in rows.items():
        lines.append(f"| {names.get(key, key)} | {fmt(row, 'alignment')} | {fmt(row, 'win_rate')} | {fmt(row, 'text')} | {fmt(row, 'distance')} |")
    lines += ["", *findings(rows, sweep, results.get("pairs"))]
    if sweep:
        ks = sorted({int(k) for m in sweep.values() for k in m})
        lines += ["", "## Fig. 6: linear combination vs direct fitting, by number of history images", "",
                  f"{cfg['sweep_users']} test users; alignment ↑ (distance to truth ↓).", "",
                  "| history images | " + " | ".join(str(k) for k in ks) + " |", "|---|" + "---|" * len(ks)]  # fmt: skip
        for mode, label in (("coefficients", "linear combination"), ("direct", "direct fitting")):
            if mode in sweep:
                cells = [f"{sweep[mode][str(k)]['alignment']:.3f} ({sweep[mode][str(k)]['distance']:.3f})"
                         if str(k) in sweep[mode] else "–" for k in ks]  # fmt: skip
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for mode, label in (("coefficients", "linear combination"), ("direct", "direct fitting")):
            if mode in sweep:
                got = sorted(int(k) for k in sweep[mode])
                axes[0].plot(got, [sweep[mode][str(k)]["alignment"] for k in got], marker="o", label=label)
                axes[1].plot(got, [sweep[mode][str(k)]["distance"] for k in got], marker="o", label=label)
        for ax, title in zip(axes, ("preference alignment (higher is better)", "distance to ground truth (lower is better)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ks, [str(k) for k in ks])
            ax.set_xlabel("history images")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].axhline(rows["base"]["alignment"], color="gray", ls="--", lw=1, label="base, no user")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        path = docs / "eval_fitting.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        lines += ["", "![fitting](eval_fitting.png)"]
    # Bar chart of the table.
    fig, ax = plt.subplots(figsize=(8, 3.2))
    keys = [k for k in rows if k != "ground_truth"]
    xs = np.arange(len(keys))
    ax.bar(xs - 0.2, [rows[k]["alignment"] for k in keys], 0.4, label="alignment")
    ax.bar(xs + 0.2, [rows[k]["text"] for k in keys], 0.4, label="text consistency")
    ax.axhline(rows["ground_truth"]["alignment"], color="C0", ls=":", lw=1)
    ax.set_xticks(xs, [names.get(k, k).split(" (")[0] for k in keys], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = docs / "eval_table.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    # Examples: first user's first prompts, one row per model.
    ex = results["examples"]
    n = min(6, len(next(iter(ex.values()))))
    sheet = np.concatenate([np.concatenate(list(ex[k][:n]), axis=1) for k in ex], axis=0)
    path = docs / "eval_examples.png"
    Image.fromarray(sheet).resize((sheet.shape[1] * 3, sheet.shape[0] * 3), Image.NEAREST).save(path)
    written.append(path)
    lines += ["", "![table](eval_table.png)", "",
              f"Examples (rows: {', '.join(ex)}; columns: the first test user's first {n} test prompts):", "",
              "![examples](eval_examples.png)", ""]  # fmt: skip
    path = docs / "eval.md"
    path.write_text("\n".join(lines) + "\n")
    written.append(path)
    path = docs / "eval.json"
    path.write_text(json.dumps({k: v for k, v in results.items() if k != "examples"}, indent=1) + "\n")
    written.append(path)
    return written


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of a - b over the same (user, prompt, seed) pairs and the half-width of its 95 % interval
    (normal approximation): one seed per setting, so this is the noise a difference must beat."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(d.mean()), float(half)


def _versus(a: list[float], b: list[float]) -> str:
    d, half = paired_difference(a, b)
    verdict = "within noise" if abs(d) <= half else ("higher" if d > 0 else "lower")
    return f"{d:+.3f} ± {half:.3f} ({verdict})"


def findings(rows: dict[str, dict[str, float]], sweep: dict[str, dict[str, dict[str, float]]],
             pairs: dict[str, list[float]] | None = None) -> list[str]:  # fmt: skip
    """Plain-words reading of the numbers, whichever way they go (written with the table, never by hand).

    Alignment differences are paired over the same (user, prompt, seed) and given with a 95 %
    interval; "within noise" means the interval includes 0."""
    pairs = pairs or {}
    out = ["Reading (differences against the base model; the win rate's chance level is 0.5; ± is a 95 % interval",
           "of the paired alignment difference over the same users, prompts and seeds):", ""]  # fmt: skip
    base = rows["base"]
    for key in [k for k in LABELS if k in rows]:
        r = rows[key]
        align = _versus(pairs[key], pairs["base"]) if key in pairs and "base" in pairs else f"{r['alignment'] - base['alignment']:+.3f}"
        out.append(f"- {LABELS[key]}: alignment {align}, win rate {r['win_rate']:.3f}, "
                   f"text {r['text'] - base['text']:+.3f}, distance {r['distance'] - base['distance']:+.3f}.")  # fmt: skip
    if "start" in rows and "premier" in rows and {"start", "premier"} <= set(pairs):
        out.append(f"- What fitting adds: Premier minus its starting point, alignment {_versus(pairs['premier'], pairs['start'])}.")
    if "premier" in rows:
        for key in [k for k in LABELS if k in rows and k != "premier"]:
            if key in pairs and "premier" in pairs:
                out.append(f"- {LABELS[key]} vs full Premier: alignment {_versus(pairs[key], pairs['premier'])}.")
            else:
                d = rows[key]["alignment"] - rows["premier"]["alignment"]
                out.append(f"- {LABELS[key]} vs full Premier: alignment {d:+.3f}.")
    missing = [LABELS[k] for k in LABELS if k not in rows]
    if missing:
        out.append(f"- Not run in this report: {', '.join(missing)} (`premier eval --variants ...` adds them; finished rows are reused).")
    if "coefficients" in sweep and "direct" in sweep:
        for k in sorted(set(sweep["coefficients"]) & set(sweep["direct"]), key=int):
            c, d = sweep["coefficients"][k]["alignment"], sweep["direct"][k]["alignment"]
            keys = (f"sweep-coefficients-{k}", f"sweep-direct-{k}")
            detail = f"linear combination minus direct {_versus(pairs[keys[0]], pairs[keys[1]])}" if all(x in pairs for x in keys) \
                else f"{'linear combination' if c > d else 'direct fitting'} aligns better"
            out.append(f"- {k} history images: {detail} ({c:.3f} vs {d:.3f}).")
    return out


def run_eval(world_dir: str | Path, work: str | Path, docs: str | Path, config: EvalConfig, command: str,
             progress: bool = False, log=print) -> dict[str, Any]:  # fmt: skip
    """Run and write the report after every row, so an interrupted run leaves what it finished."""
    results = Evaluator(world_dir, work, config, progress, log).run(on_update=lambda r: write_report(r, docs, command))
    results["written"] = [str(p) for p in write_report(results, docs, command)]
    return results


__all__ = ["EvalConfig", "Evaluator", "run_eval", "write_report"]
