"""`premier eval`: the paper's Table 1, Table 2 and Fig. 6 questions, asked of the world.

On the held-out test users (disjoint from the training users): each is fitted by stage 2 from
its first `history` images, then every test prompt is generated for it and scored by the probe
against the ground truth. Rows:

- ground truth: canonical renders (the metrics' ceiling);
- base: the base model without a user (the FLUX.1-dev analogue);
- premier and the ablations (`premier.world.stages.VARIANTS`, optionally with other dispersion
  settings), each its own stage-1 run with the same data and budget (the shipped checkpoint is
  `premier`; the others are trained into WORK on first use and reused afterwards);
- the Fig. 6 sweep: linear combination vs direct fitting at each history size, and the onboarding
  fast fit (`Stage2Config.fast()`, what the server's resident fit workers run);
- per style factor alignment and Fig. 8's user distinguishability (premier/world/analysis.py).
premier/world/report.py writes the report (Markdown, plots, JSON).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.lora import check_rank
from premier.models.embedded import PREMIER_DIR, EmbeddedSpec, build_embedded_flux, embedded_premier_config
from premier.models.loading import profile_for
from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest, GenerationSettings
from premier.training.config import Stage1Config, Stage2Config
from premier.training.prepared import DataEncoder, PreparedDataset
from premier.training.stage1 import latest_checkpoint
from premier.world import stages
from premier.world.analysis import distinct_row, factor_means
from premier.world.build import PROBE_DIR, read_world, stage1_dir
from premier.world.eval_cache import RUN_SETTINGS, ResultCache, check_settings
from premier.world.lora_rows import lora_modes, lora_sweep_row, rank_of
from premier.world.report import write_report
from premier.world.spec import content_of
from premier.world.users import WorldUser
from premier.world.worlds import load_probe, world_config, world_of

SWEEP_MODES = ("coefficients", "direct", "fast")
"""The sweep's fits: linear combination and direct (the reference loop), and the onboarding fast fit."""


@dataclass(frozen=True)
class EvalConfig:
    test_users: int = 12  # all of the world's held-out users
    history: int = 8
    sweep: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    sweep_users: int = 4
    variants: tuple[str, ...] = stages.VARIANTS
    denoise_steps: int = 8
    seed: int = 0
    baselines: tuple[str, ...] = ()  # "lora": per-user LoRA rows in the sweep (premier/world/lora_rows.py)
    lora_ranks: tuple[int, ...] = (4, 16)
    distinct_users: int = 16  # Fig. 8 (premier/world/analysis.py): the first test users, at most test_users
    distinct_prompts: int = 5
    stage1_seed: int | None = None  # None: the world's (Premier: the shipped checkpoint); others train in WORK
    fit_seed: int | None = None  # stage 2's seed; None: the world's

    def check(self, world: Any) -> None:  # a WorldConfig or WorldV2Config
        for v in self.variants:  # parsed (a bad one is named), one spelling each: one run and one row per setting
            if stages.canonical_variant(v) != v:
                raise InvalidRequestError("variants", f"write {v!r} as {stages.canonical_variant(v)!r}")
        if len(set(self.variants)) != len(self.variants):
            raise InvalidRequestError("variants", f"a variant is given twice: {', '.join(self.variants)}")
        if not 1 <= self.test_users <= world.test_users:
            raise InvalidRequestError("test_users", f"must be in [1, {world.test_users}] (the world's test users)")
        if not 1 <= self.sweep_users <= self.test_users:
            raise InvalidRequestError("sweep_users", f"must be in [1, {self.test_users}]")
        for k in (self.history, *self.sweep):
            if not 1 <= k <= world.test_history:
                raise InvalidRequestError("history", f"history sizes must be in [1, {world.test_history}], got {k}")
        if self.denoise_steps < 1:
            raise InvalidRequestError("denoise_steps", "must be positive")
        if self.distinct_users < 2 or not 1 <= self.distinct_prompts <= world.test_prompts:
            raise InvalidRequestError("distinct_users", f"needs >= 2 users, 1 to {world.test_prompts} prompts")
        for name, seed in (("stage1_seed", self.stage1_seed), ("fit_seed", self.fit_seed)):
            if seed is not None and not 0 <= seed < 2**31:
                raise InvalidRequestError(name, f"must be in [0, 2^31), got {seed}")
        lora_modes(self.baselines, self.lora_ranks)
        for r in self.lora_ranks:
            check_rank(r)

    @classmethod
    def quick(cls) -> EvalConfig:
        return cls(test_users=1, history=2, sweep=(1, 2), sweep_users=1, denoise_steps=2, distinct_prompts=2)


class Evaluator:
    def __init__(self, world_dir: str | Path, work: str | Path, config: EvalConfig, progress: bool = False, log=print):
        self.world_dir, self.work = Path(world_dir), Path(work)
        self.info = read_world(self.world_dir)
        cfg = self.info["config"]
        self.world = world_config(cfg["world"])
        self.world_ops = world_of(self.world)
        s1, s2 = Stage1Config.from_dict(cfg["stage1"]), Stage2Config.from_dict(cfg["stage2"])
        self.shipped_seeds, given = (s1.seed, s2.seed), (config.stage1_seed, config.fit_seed)
        self.seeds = tuple(s if c is None else c for c, s in zip(given, self.shipped_seeds))
        self.stage1, self.stage2 = replace(s1, seed=self.seeds[0]), replace(s2, seed=self.seeds[1])
        config.check(self.world)
        self.config, self.progress, self.log = config, progress, log
        self.spec = EmbeddedSpec()
        self.flux_pipe = build_embedded_flux(weights=self.world_dir)
        self.profile = profile_for(self.flux_pipe, embedded=True)
        self.encoder = DataEncoder(
            self.flux_pipe,
            self.spec.image_size,
            self.spec.max_sequence_length,
            batch_size=64,
            storage_dtype=torch.float32,
        )
        self.probe = load_probe(self.world_dir / PROBE_DIR)
        self.users = self.world_ops.held_out_users()[: config.test_users]
        self.empty_text = self.encoder.encode_prompts([""])[0][0]
        self.requests = [(u, p) for u in self.users for p in u.test_prompts]
        self.settings = GenerationSettings(
            height=self.spec.image_size, width=self.spec.image_size, steps=config.denoise_steps, guidance=1.0
        )
        self.reused: list[str] = []
        self.cache = ResultCache(
            self.work / "eval-cache",
            {
                "world": {k: self.info["steps"].get(k, {}).get("checkpoint_id") for k in ("stage1",)},
                "config": self.info["config"],
                "test_users": config.test_users,
                "history": config.history,
                "denoise_steps": config.denoise_steps,
                "seed": config.seed,
                **({"seeds": list(self.seeds)} if self.seeds != self.shipped_seeds else {}),
            },
        )

    def cached(
        self, name: str, compute: Callable[[], tuple[dict[str, float], np.ndarray]]
    ) -> tuple[dict[str, float], np.ndarray]:
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
        if variant == "premier" and self.stage1.seed == self.shipped_seeds[0]:
            model, ckpt = PremierModel.load(self.world_dir / PREMIER_DIR)
        else:  # an ablation, or Premier with another stage-1 seed
            seed = self.stage1.seed
            name = stages.variant_folder(variant)
            run = stage1_dir(self.work, name if seed == self.shipped_seeds[0] else f"{name}-seed{seed}")
            settings = {"variant": variant, "world": self.info["config"]["world"], "stage1": self.stage1.to_dict()}
            folder = latest_checkpoint(run)
            if folder is not None or (run / RUN_SETTINGS).is_file():  # recorded when a run starts: finished or
                check_settings(run / RUN_SETTINGS, settings)  # not, a run is reused only if made with these settings
            if folder is None or int(folder.name.split("-")[-1]) < self.stage1.steps:
                folder = self._train(variant, run, settings, resume=folder is not None)
            model, ckpt = PremierModel.load(folder)
        return stages.use_variant(model, variant, self.empty_text), ckpt

    def _train(self, variant: str, run: Path, settings: dict[str, Any], resume: bool) -> Path:
        """Train (or continue: an interrupted eval resumes from the run's last checkpoint) a variant's stage 1."""
        prepared = self.work / "prepared"
        world = {"world": self.info["config"]["world"]}
        if not (prepared / "dataset.json").is_file():
            self.log(f"eval: writing and preparing the training data in {self.work}")
            self.world_ops.write_training_data(self.work / "raw")
            stages.prepare(
                self.flux_pipe, self.work / "raw", prepared, self.spec.image_size, self.spec.max_sequence_length
            )
            (prepared / RUN_SETTINGS).write_text(json.dumps(world, indent=1) + "\n")
        else:  # the training users of another world would train a stage 1 that has nothing to do with this one
            check_settings(prepared / RUN_SETTINGS, world)
        return stages.train_variant(
            self.flux_pipe.transformer,
            PreparedDataset(prepared),
            run,
            variant,
            self.stage1,
            embedded_premier_config(self.spec),
            settings,
            resume,
            self.log,
            self.progress,
        )

    def fit_users(
        self, premier: PremierModel, ckpt: str, users: list[WorldUser], k: int, mode: str, keep: str | None = None
    ) -> list[torch.Tensor]:
        """Each user's tokens; with `keep` (a variant), cached per user so later rows reuse the fit. Mode "fast":
        the onboarding path's fits, every user in the same passes."""
        if mode == "fast":
            batches = {u.user_id: stages.encode_user(self.encoder, u, k) for u in users}
            return stages.fit_together(
                self.flux_pipe.transformer, premier, ckpt, batches, Stage2Config.fast(seed=self.stage2.seed)
            )
        tokens = []
        for user in users:
            name = f"tokens-{keep}-{mode}-k{k}-{user.user_id}"
            if keep is not None and (hit := self.cache.get_tensor(name)) is not None:
                tokens.append(hit)
                continue
            result = stages.fit(
                self.flux_pipe.transformer,
                premier,
                ckpt,
                stages.encode_user(self.encoder, user, k),
                user.user_id,
                mode,
                self.stage2,
            )
            tokens.append(
                result.record.materialise(premier.users, ckpt) if mode == "coefficients" else result.record.vector
            )
            if keep is not None:
                self.cache.put_tensor(name, tokens[-1])
        return tokens

    def generate(
        self,
        premier: PremierModel | None,
        ckpt: str | None,
        tokens: dict[str, torch.Tensor] | None,
        users: list[WorldUser],
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
    ) -> np.ndarray:
        """Each user's test prompts, seeds counted up from the eval's; or the same `prompts` and `seeds` for all."""
        pipe = PremierPipeline(self.flux_pipe, premier, self.profile, ckpt)
        pairs = [(u, p, seeds[i] if seeds else None) for u in users for i, p in enumerate(prompts or u.test_prompts)]
        reqs = [
            GenerationRequest(p, tokens[u.user_id] if tokens else None, s if s is not None else self.config.seed + i)
            for i, (u, p, s) in enumerate(pairs)
        ]
        out = []
        for i in range(0, len(reqs), 128):
            out += [r.image for r in pipe(reqs[i : i + 128], self.settings, output_type="np")]
        return np.stack(out)

    def score(self, images: np.ndarray, users: list[WorldUser], base: np.ndarray | None) -> dict[str, float]:
        pairs = [(u, p) for u in users for p in u.test_prompts]
        styles = [u.target(p) for u, p in pairs]  # the user's taste for the prompt (v1: the user's one style)
        contents = [content_of(p) for _, p in pairs]
        truth = np.stack([self.world_ops.render(c, s, jitter=False) for c, s in zip(contents, styles)])
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
        results: dict[str, Any] = {
            "config": {
                **cfg.__dict__,
                "sweep": list(cfg.sweep),
                "variants": list(cfg.variants),
                "baselines": list(cfg.baselines),
                "lora_ranks": list(cfg.lora_ranks),
            },
            "world": self.info["config"],
            "rows": {},
            "sweep": {},
        }
        users, styles = self.users, [u.target(p) for u, p in self.requests]
        results["factors"], results["distinct"] = {}, {}

        def readings(key: str, imgs: np.ndarray, model: Callable[[], tuple[PremierModel, str]] | None = None) -> None:
            """Per-factor alignment and (but for the no-history start) Fig. 8's distinguishability."""
            results["factors"][key] = factor_means(self.probe, imgs, styles[: len(imgs)])
            if key != "start" and (row := distinct_row(self, key, model)) is not None:
                results["distinct"][key] = row

        truth = np.stack([self.world_ops.render(content_of(p), u.target(p), jitter=False) for u, p in self.requests])
        results["rows"]["ground_truth"] = self.score(truth, users, None)
        readings("ground_truth", truth)
        base_images = self.generate(None, None, None, users)  # cheap, and every win rate needs it
        results["rows"]["base"], base = self.cached(
            "base", lambda: (self.score(base_images, users, base_images), base_images)
        )
        readings("base", base)
        self.log(f"eval: base {results['rows']['base']}")
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
            readings("start", start_images)
            self.log(f"eval: start {results['rows']['start']}")

        for variant in sorted(cfg.variants, key=lambda v: v != "premier"):  # Table 1 and the sweep first
            loaded: dict[str, Any] = {}

            def load() -> tuple[PremierModel, str]:
                if not loaded:
                    loaded["model"] = self.checkpoint(variant)
                return loaded["model"]

            def table_row() -> tuple[dict[str, float], np.ndarray]:
                premier, ckpt = load()
                tokens = dict(
                    zip(
                        [u.user_id for u in users],
                        self.fit_users(premier, ckpt, users, cfg.history, "coefficients", variant),
                    )
                )
                imgs = self.generate(premier, ckpt, tokens, users)
                return self.score(imgs, users, base), imgs

            results["rows"][variant], images[variant] = self.cached(variant, table_row)
            pairs[variant] = self._pairs(images[variant], styles)
            readings(variant, images[variant], load)
            self.log(f"eval: {variant} {results['rows'][variant]}")
            results["pending"].remove(variant)
            update()
            if variant == "premier":
                sweep_users = users[: cfg.sweep_users]
                n = sum(len(u.test_prompts) for u in sweep_users)
                for mode in SWEEP_MODES + lora_modes(cfg.baselines, cfg.lora_ranks):
                    for k in cfg.sweep:

                        def sweep_row(mode: str = mode, k: int = k) -> tuple[dict[str, float], np.ndarray]:
                            rank = rank_of(mode)
                            if rank is not None:
                                imgs, costs = lora_sweep_row(self, sweep_users, k, rank)
                                return {**self.score(imgs, sweep_users, base[:n]), **costs}, imgs
                            premier, ckpt = load()
                            fitted = self.fit_users(premier, ckpt, sweep_users, k, mode)
                            toks = dict(zip([u.user_id for u in sweep_users], fitted))
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


def run_eval(
    world_dir: str | Path,
    work: str | Path,
    docs: str | Path,
    config: EvalConfig,
    command: str,
    progress: bool = False,
    log=print,
) -> dict[str, Any]:
    """Run and write the report after every row, so an interrupted run leaves what it finished."""
    results = Evaluator(world_dir, work, config, progress, log).run(on_update=lambda r: write_report(r, docs, command))
    results["written"] = [str(p) for p in write_report(results, docs, command)]
    return results


__all__ = ["EvalConfig", "Evaluator", "run_eval", "write_report"]
