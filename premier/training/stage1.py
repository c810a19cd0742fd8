"""Stage 1: train both preference adapters and the training-user table; FLUX stays frozen.

Each step: a DiT batch of (image, caption, user) examples gives the flow-matching loss; a
separate empty-prompt pass of the adapters over `dispersion_users` users (no DiT involved)
gives the dispersion terms, so dispersion sees many users per step on one device whatever
the DiT batch is (the reference release only gets it across GPUs).

Everything random comes from one CPU generator whose state is checkpointed with the model
and the optimizer, so a resumed run takes exactly the steps an uninterrupted one would.

    OUT/
      checkpoints/step-0000500/    a Premier checkpoint (loadable with --checkpoint) + trainer_state.safetensors
      checkpoints/latest           name of the newest complete checkpoint
      metrics.jsonl                one line per logged step
      loss.png                     the loss curves
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from premier.files import atomic_save_safetensors, atomic_write_bytes, fsync_dir, read_safetensors
from premier.checkpoint import PremierModel
from premier.config import PremierConfig
from premier.errors import CheckpointError, InvalidRequestError, TrainingError
from premier.training.config import Stage1Config
from premier.training.losses import dispersion_loss
from premier.training.metrics import MetricsLog, plot_losses
from premier.training.objective import FixedDrawLoss, FlowObjective, build_optimizer, current_lr
from premier.training.prepared import PreparedDataset, check_signature
from premier.training.state_io import load_optimizer, optimizer_to_tensors
from premier.transformer import PremierTransformer

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.safetensors"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
# Settings a resumed run may change; everything else must match the checkpoint.
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "keep_checkpoints", "log_every")


class Stage1Trainer:
    def __init__(self, flux: FluxTransformer2DModel, dataset: PreparedDataset, out: str | Path,
                 config: Stage1Config, premier_config: PremierConfig):  # fmt: skip
        config.check(num_users=len(dataset.user_ids))
        check_signature(dataset.signature, flux.config)
        premier_config.check_fits(flux.config)
        self.config, self.dataset, self.out = config, dataset, Path(out)
        self.device = flux.device
        flux.requires_grad_(False).eval()
        if config.precision == "bf16":
            flux.to(torch.bfloat16)
        if config.gradient_checkpointing:
            flux.enable_gradient_checkpointing()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.model = PremierModel(premier_config, list(dataset.user_ids)).to(self.device).train()
        self.transformer = PremierTransformer(flux, premier_config)
        self.objective = FlowObjective(
            self.transformer, self.model.adapters, config.guidance, config.precision,
            config.timestep_sampling, config.logit_mean, config.logit_std,
        )  # fmt: skip
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        o = config.optim
        self.optimizer = build_optimizer(self.params, o.optimizer, o.lr, o.weight_decay, o.betas)
        self.generator = torch.Generator("cpu").manual_seed(config.seed)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._log: MetricsLog | None = None
        self._resumed = False
        tokens = config.dispersion_tokens or dataset.empty_text.shape[0]
        self._empty_text = dataset.empty_text[:tokens].to(self.device)

    # ------------------------------------------------------------------ resume
    @classmethod
    def resume(cls, flux: FluxTransformer2DModel, dataset: PreparedDataset, out: str | Path,
               overrides: dict[str, Any] | None = None, checkpoint: str | Path | None = None) -> "Stage1Trainer":  # fmt: skip
        """Continue from `checkpoint` (default: OUT/checkpoints/latest) with its saved settings.

        `overrides` may change only RESUMABLE_CHANGES (e.g. more steps); any other setting that
        differs from the checkpoint's is refused, since the run would no longer be the same run.
        """
        out = Path(out)
        folder = Path(checkpoint) if checkpoint else latest_checkpoint(out)
        if folder is None:
            raise InvalidRequestError("resume", f"{out / CHECKPOINTS} holds no checkpoint to resume from")
        state_file = folder / TRAINER_STATE
        if not state_file.is_file():
            raise CheckpointError(f"{folder} is a Premier checkpoint without {TRAINER_STATE}; it cannot be resumed")
        tensors, meta = read_safetensors(state_file, error=CheckpointError)
        try:
            saved = json.loads(meta["config"])
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{state_file} has no readable settings: {e}") from None
        merged = _merge(saved, overrides or {})
        changed = sorted(k for k in _flatten(merged) if k not in RESUMABLE_CHANGES and _flatten(merged)[k] != _flatten(saved)[k])
        if changed:
            raise InvalidRequestError(
                "resume", f"settings differ from the checkpoint's: {', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change)"
            )
        saved = Stage1Config.from_dict(merged)
        model, ckpt_id = PremierModel.load(folder)
        if model.users.user_ids != list(dataset.user_ids):
            raise InvalidRequestError("resume", f"{folder} was trained on other users than {dataset.folder} holds")
        trainer = cls(flux, dataset, out, saved, model.config)
        with torch.no_grad():
            for mine, theirs in zip(trainer.model.parameters(), model.parameters()):
                mine.copy_(theirs)
        load_optimizer(trainer.optimizer, {k: v for k, v in tensors.items() if k.startswith("optimizer.")}, meta["optimizer"])
        trainer.generator.set_state(tensors["rng.generator"])
        trainer.step = int(meta["step"])
        trainer.last_checkpoint = folder
        trainer._resumed = True
        return trainer

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        cfg, g, ds = self.config, self.generator, self.dataset
        started = time.perf_counter()
        indices = torch.randint(len(ds), (cfg.batch_size,), generator=g)
        batch = ds.get(indices.tolist())
        t, noise = self.objective.draw(batch.latents, g)
        fm = self.objective.loss(batch.latents, batch.text, batch.pooled, self.model.users(batch.users.to(self.device)), t, noise)
        loss = fm
        metrics: dict[str, Any] = {"fm": float(fm.detach())}
        if cfg.dispersion_enabled:
            k = len(ds.user_ids)
            chosen = torch.randperm(k, generator=g)[: min(cfg.dispersion_users, k)].to(self.device)
            text = self._empty_text.unsqueeze(0).expand(len(chosen), -1, -1)
            with self.objective.autocast():
                out = self.model.adapters(text, self.model.users(chosen))
            d_s = dispersion_loss(out.shared, cfg.tau, cfg.normalise_dispersion)
            d_b = dispersion_loss(out.distinct, cfg.tau, cfg.normalise_dispersion)
            loss = loss + cfg.lambda_shared * d_s + cfg.lambda_distinct * d_b
            metrics.update(disp_shared=float(d_s.detach()), disp_distinct=float(d_b.detach()))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        if not (math.isfinite(float(loss.detach())) and math.isfinite(float(grad_norm))):
            where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise TrainingError(
                f"non-finite loss ({float(loss.detach())}) or gradient norm ({float(grad_norm)}) at step {self.step + 1}; "
                f"stopped without applying it; {where}"
            )
        self.optimizer.step()
        self.step += 1
        metrics.update(step=self.step, loss=float(loss.detach()), grad_norm=float(grad_norm), lr=current_lr(self.optimizer),
                       seconds=time.perf_counter() - started)  # fmt: skip
        return metrics

    def evaluate(self, indices: list[int], draws: int = 4, seed: int = 12345) -> float:
        """Flow-matching loss of dataset examples at fixed draws (does not touch the training generator)."""
        batch = self.dataset.get(indices)
        fixed = FixedDrawLoss(self.objective, batch, draws, seed)
        with torch.no_grad():
            return fixed(self.model.users(batch.users.to(self.device)))

    # ------------------------------------------------------------------ the loop
    def run(self, progress: bool = True) -> dict[str, Any]:
        cfg = self.config
        self._log = MetricsLog(self.out / METRICS, resume_step=self.step if self._resumed else None)
        self.out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="stage 1", unit="step")
        last: dict[str, Any] = {}
        try:
            while self.step < cfg.steps:
                last = self.train_step()
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log.write(last)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", fm=f"{last['fm']:.4f}")
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    self.save_checkpoint()
        finally:
            bar.close()
            self._log.close()
        return {"step": self.step, "last": last, "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path:
        """Write OUT/checkpoints/step-N completely, then point `latest` at it; a failure leaves the previous one."""
        folder = self.out / CHECKPOINTS
        name = f"step-{self.step:07d}"
        tmp = folder / f".{name}.partial"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            ckpt_id = self.model.save(tmp)
            tensors, structure = optimizer_to_tensors(self.optimizer)
            tensors["rng.generator"] = self.generator.get_state()
            meta = {"step": str(self.step), "config": self.config.to_json(), "optimizer": structure,
                    "checkpoint_id": ckpt_id, "dataset": str(self.dataset.folder)}  # fmt: skip
            atomic_save_safetensors(tensors, tmp / TRAINER_STATE, metadata=meta)
            final = folder / name
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(folder)
            atomic_write_bytes(folder / LATEST, name.encode())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no earlier checkpoint exists"
            raise TrainingError(f"could not write checkpoint {name} ({e.strerror or e}); {kept}") from e
        self.last_checkpoint = final
        self._prune(folder)
        if self._log is not None:
            try:
                plot_losses(self.out / METRICS, self.out / PLOT)
            except OSError:
                pass  # the plot is a convenience; a full disk must not lose a good checkpoint
        return final

    def _prune(self, folder: Path) -> None:
        steps = sorted(p for p in folder.glob("step-*") if p.is_dir())
        for old in steps[: -self.config.keep_checkpoints]:
            if old != self.last_checkpoint:
                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out: str | Path) -> Path | None:
    """OUT/checkpoints/<latest>, or the newest complete step folder if the pointer is missing."""
    folder = Path(out) / CHECKPOINTS
    pointer = folder / LATEST
    if pointer.is_file():
        candidate = folder / pointer.read_text().strip()
        if (candidate / TRAINER_STATE).is_file():
            return candidate
    steps = sorted(p for p in folder.glob("step-*") if (p / TRAINER_STATE).is_file())
    return steps[-1] if steps else None


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = list(v) if isinstance(v, tuple) else v
    return flat
