"""Regenerate every shipped file of the world from scratch: `premier world build`.

    OUT/ (default premier/assets/world, what the embedded default loads)
      world.json          settings of every step, what each produced and how long it took
      transformer/        the base model (diffusers FluxTransformer2DModel, float16 safetensors)
      premier/            the stage-1 Premier checkpoint (adapters + training users)
      users/<id>.safetensors  the fitted demo users (coefficient records)
      probe/probe.safetensors the metric probe
    WORK/ (not shipped)
      raw/                training users' histories (PNG + captions.jsonl per user)
      prepared/           the same, encoded (`premier data prepare` format)
      stage1-premier/     the stage-1 run (checkpoints, metrics.jsonl, loss.png)

Steps run in order (data, base, stage1, users, probe); `only` runs a subset against what an
earlier run left in OUT and WORK.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from premier.checkpoint import ADAPTERS_FILE, USERS_FILE, PremierModel
from premier.config import CONFIG_NAME
from premier.errors import InvalidRequestError
from premier.models.embedded import (
    DEMO_USERS,
    PREMIER_DIR,
    USERS_DIR,
    EmbeddedSpec,
    build_embedded_flux,
    embedded_premier_config,
)
from premier.training.config import OptimConfig, Stage1Config, Stage2Config
from premier.training.prepared import DataEncoder, PreparedDataset
from premier.training.stage1 import latest_checkpoint
from premier.world.base_train import BaseTrainConfig, train_base
from premier.world.eval_cache import RUN_SETTINGS
from premier.world.probe import ProbeConfig
from premier.world.stages import build_trainer, encode_user, fit, prepare
from premier.world.users import WorldConfig
from premier.world.v2 import WorldV2Config
from premier.world.worlds import world_of

STEPS = ("data", "base", "stage1", "users", "probe")
WORLD_FILE = "world.json"
PROBE_DIR = "probe"


@dataclass(frozen=True)
class BuildConfig:
    world: WorldConfig | WorldV2Config = WorldConfig()
    base: BaseTrainConfig = BaseTrainConfig()
    # AdamW, not the paper's Prodigy: Prodigy's step size is still ~1e-5 after 60 steps here and the
    # CPU budget is a few thousand steps, hence the high learning rate. Dispersion with the paper's
    # weights but on mean-scaled distances: the feature-dimension scaling is unbounded below and its
    # inflated deltas stopped the model from personalising (docs/world.md).
    stage1: Stage1Config = Stage1Config(
        steps=3000,
        batch_size=32,
        dispersion_users=64,
        dispersion_scale="mean",
        checkpoint_every=500,
        keep_checkpoints=1,
        log_every=10,
        optim=OptimConfig("adamw", lr=5e-3, weight_decay=1e-4),
    )
    # No held-out early stopping (the paper's fixed steps; also, with one held-out 32x32 image the loss at
    # 8 draws is too noisy to rank steps: measured, 3 of 4 demo users kept their initial coefficients).
    stage2: Stage2Config = Stage2Config(steps=100, batch_size=4, optim=OptimConfig("adamw", lr=5e-3, weight_decay=0.0))
    probe: ProbeConfig = ProbeConfig()

    def to_dict(self) -> dict[str, Any]:
        return {
            "world": self.world.to_dict(),
            "base": asdict(self.base),
            "stage1": self.stage1.to_dict(),
            "stage2": self.stage2.to_dict(),
            "probe": asdict(self.probe),
        }

    @classmethod
    def v2(cls, **world: Any) -> BuildConfig:
        """World v2 (docs/world.md) with v1's training recipe; `world` overrides WorldV2Config's defaults."""
        return cls(world=WorldV2Config(**world))

    @classmethod
    def quick_v2(cls) -> BuildConfig:
        """`quick()` in world v2."""
        q = cls.quick()
        w = WorldV2Config(
            train_users=4, min_images=3, max_images=5, test_users=2, test_history=4, test_prompts=2, demo_images=3
        )
        return cls(world=w, base=q.base, stage1=q.stage1, stage2=q.stage2, probe=q.probe)

    @classmethod
    def quick(cls) -> BuildConfig:
        """Seconds, not minutes: for tests and smoke runs (the result is not a useful model)."""
        return cls(
            world=WorldConfig(
                train_users=4, min_images=3, max_images=5, test_users=2, test_history=4, test_prompts=2, demo_images=3
            ),
            base=BaseTrainConfig(steps=2, batch_size=4, warmup=1, log_every=1, stop_at=None),
            stage1=Stage1Config(
                steps=2,
                batch_size=2,
                dispersion_users=4,
                checkpoint_every=2,
                keep_checkpoints=1,
                optim=OptimConfig("adamw", lr=1e-3),
            ),
            stage2=Stage2Config(steps=2, batch_size=2, eval_every=1, patience=1, optim=OptimConfig("adamw", lr=5e-3)),
            probe=ProbeConfig(steps=2, batch_size=8, width=8, features=16),
        )


def stage1_dir(work: Path, variant: str) -> Path:
    return work / f"stage1-{variant}"


def read_world(out: str | Path) -> dict[str, Any]:
    path = Path(out) / WORLD_FILE
    if not path.is_file():
        raise InvalidRequestError("world", f"{path} does not exist: run `premier world build --out {out}` first")
    return json.loads(path.read_text())


def build(
    out: str | Path,
    work: str | Path,
    config: BuildConfig = BuildConfig(),
    only: tuple[str, ...] = STEPS,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    unknown = sorted(set(only) - set(STEPS))
    if unknown:
        raise InvalidRequestError("steps", f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    world = world_of(config.world)  # checks it
    config.base.check()
    config.stage1.check()
    config.stage2.check()
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    spec = EmbeddedSpec()
    record: dict[str, Any] = {"config": config.to_dict(), "steps": {}}
    if (out / WORLD_FILE).is_file():
        record["steps"] = json.loads((out / WORLD_FILE).read_text()).get("steps", {})

    def done(step: str, started: float, **info: Any) -> None:
        info["seconds"] = round(time.perf_counter() - started, 1)
        record["steps"][step] = info
        (out / WORLD_FILE).write_text(json.dumps(record, indent=1) + "\n")
        log(
            f"world build: {step} done in {info['seconds']:.0f}s {json.dumps({k: v for k, v in info.items() if k != 'seconds'})}"
        )

    if "data" in only:
        t = time.perf_counter()
        shutil.rmtree(work / "raw", ignore_errors=True)
        shutil.rmtree(work / "prepared", ignore_errors=True)
        world.write_training_data(work / "raw")
        ds = prepare(
            build_embedded_flux(weights=None),
            work / "raw",
            work / "prepared",
            spec.image_size,
            spec.max_sequence_length,
        )
        (work / "prepared" / RUN_SETTINGS).write_text(json.dumps({"world": config.world.to_dict()}, indent=1) + "\n")
        done("data", t, users=len(ds.user_ids), images=len(ds))

    if "base" in only:
        t = time.perf_counter()
        pipe = build_embedded_flux(weights=None)  # random transformer from the seed; text encoders as shipped
        info = train_base(pipe, out, config.base, spec.max_sequence_length, progress=progress, world=world)
        done("base", t, steps=info["steps"], final_loss=round(info["final_loss"], 4))

    if "stage1" in only:
        t = time.perf_counter()
        flux = build_embedded_flux(weights=out).transformer
        ds = PreparedDataset(work / "prepared")
        run = stage1_dir(work, "premier")
        shutil.rmtree(run, ignore_errors=True)
        trainer = build_trainer(flux, ds, run, "premier", config.stage1, embedded_premier_config(spec))
        summary = trainer.run(progress=progress)
        ckpt = copy_checkpoint(latest_checkpoint(run), out / PREMIER_DIR)
        done("stage1", t, checkpoint_id=ckpt, final_fm=round(summary["last"].get("fm", float("nan")), 4))

    if "users" in only:
        t = time.perf_counter()
        pipe = build_embedded_flux(weights=out)
        premier, ckpt = PremierModel.load(out / PREMIER_DIR)
        encoder = DataEncoder(
            pipe, spec.image_size, spec.max_sequence_length, batch_size=64, storage_dtype=torch.float32
        )
        (out / USERS_DIR).mkdir(parents=True, exist_ok=True)
        fitted = {}
        for user in world.demo_users():
            result = fit(
                pipe.transformer, premier, ckpt, encode_user(encoder, user), user.user_id, "coefficients", config.stage2
            )
            fit_info = dict(result.record.fit, source="premier world build", style=user.style.describe())
            result.record.touched(fit=fit_info).save(out / USERS_DIR / f"{user.user_id}.safetensors")
            fitted[user.user_id] = {"steps": fit_info["steps"], "held_out_loss": fit_info["held_out_loss"]}
        assert tuple(fitted) == DEMO_USERS
        done("users", t, users=fitted)

    if "probe" in only:
        t = time.perf_counter()
        probe, info = world.train_probe(config.probe, progress=progress)
        probe.save(out / PROBE_DIR)
        checks = world.validate_probe(probe)
        done(
            "probe", t, final_loss=round(info["final_loss"], 4), validation={k: round(v, 4) for k, v in checks.items()}
        )
    return record


def copy_checkpoint(src: Path | None, dst: Path) -> str:
    """Ship only the Premier checkpoint files of a stage-1 step folder (not the trainer state)."""
    if src is None:
        raise InvalidRequestError("stage1", "the stage-1 run wrote no checkpoint")
    _, ckpt = PremierModel.load(src)  # verifies the content id
    tmp = dst.with_name(f".{dst.name}.new")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in (CONFIG_NAME, ADAPTERS_FILE, USERS_FILE):
        shutil.copy2(src / name, tmp / name)
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return ckpt
