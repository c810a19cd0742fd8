"""Stage 1: train both preference adapters and the training-user table; FLUX stays frozen.

Each step: a DiT batch of (image, caption, user) examples gives the flow-matching loss; a
separate empty-prompt pass of the adapters over `dispersion_users` users (no DiT involved)
gives the dispersion terms, so dispersion sees many users per step on one device whatever
the DiT batch is (the reference release only gets it across GPUs).

Everything random comes from one CPU generator whose state is checkpointed with the model
and the optimizer, so a resumed run takes exactly the steps an uninterrupted one would.

The same trainer runs on N Ray Train workers (launched by premier.training.distributed): `comm`
(premier.training.collectives) supplies the collectives (the identity in one process), every
rank draws the same global batch from the same generator and computes only the examples of the
users it owns; rank 0 writes checkpoints and metrics. Nothing saved depends on N, so a run
resumes on any number of workers.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from premier.checkpoint import PremierModel
from premier.config import PremierConfig
from premier.errors import CheckpointError, InvalidRequestError, TrainingError
from premier.files import atomic_save_safetensors, atomic_write_bytes, fsync_dir, read_safetensors
from premier.training.collectives import LocalComm, assign_users, chunk
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
    def __init__(
        self,
        flux: FluxTransformer2DModel,
        dataset: PreparedDataset,
        out: str | Path,
        config: Stage1Config,
        premier_config: PremierConfig,
        comm: LocalComm | None = None,
        micro_batch: int | None = None,
    ):
        """`comm`: the workers' collectives (None: one process). `micro_batch`: run this rank's share of
        a step's DiT batch in chunks of at most this many images, accumulating gradients; it bounds the
        activation memory (the share varies from step to step with N workers) and changes nothing else."""
        config.check(num_users=len(dataset.user_ids))
        if micro_batch is not None and micro_batch < 1:
            raise InvalidRequestError("micro_batch", f"must be at least 1, got {micro_batch}")
        self.micro_batch = micro_batch
        self.comm = comm or LocalComm()
        # users -> ranks; this rank loads only the examples of its users (its shards of the dataset)
        self.owner = assign_users(dataset.user_counts, self.comm.world_size)
        self._owned = self.owner == self.comm.rank
        first_own = int(torch.nonzero(self._owned[dataset.user_of]).flatten()[0])
        self._sample_shape = dataset.sample_shape(first_own)
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
            self.transformer,
            self.model.adapters,
            config.guidance,
            config.precision,
            config.timestep_sampling,
            config.logit_mean,
            config.logit_std,
        )
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
    def resume(
        cls,
        flux: FluxTransformer2DModel,
        dataset: PreparedDataset,
        out: str | Path,
        overrides: dict[str, Any] | None = None,
        checkpoint: str | Path | None = None,
        comm: LocalComm | None = None,
        micro_batch: int | None = None,
    ) -> Stage1Trainer:
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
        now, then = flatten_settings(merged), flatten_settings(saved)
        changed = sorted(k for k in now if k not in RESUMABLE_CHANGES and now[k] != then[k])
        if changed:
            raise InvalidRequestError(
                "resume",
                f"settings differ from the checkpoint's: {', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change)",
            )
        saved = Stage1Config.from_dict(merged)
        model, ckpt_id = PremierModel.load(folder)
        if model.users.user_ids != list(dataset.user_ids):
            raise InvalidRequestError("resume", f"{folder} was trained on other users than {dataset.folder} holds")
        trainer = cls(flux, dataset, out, saved, model.config, comm=comm, micro_batch=micro_batch)
        with torch.no_grad():
            for mine, theirs in zip(trainer.model.parameters(), model.parameters()):
                mine.copy_(theirs)
        load_optimizer(
            trainer.optimizer, {k: v for k, v in tensors.items() if k.startswith("optimizer.")}, meta["optimizer"]
        )
        trainer.generator.set_state(tensors["rng.generator"])
        trainer.step = int(meta["step"])
        trainer.last_checkpoint = folder
        trainer._resumed = True
        return trainer

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """One step on the global batch; with N workers each computes its users' part (module docstring)."""
        cfg, g, ds, comm = self.config, self.generator, self.dataset, self.comm
        started = time.perf_counter()
        # Identical on every rank: the global batch, its timesteps and noise, the dispersion users.
        indices = torch.randint(len(ds), (cfg.batch_size,), generator=g)
        t, noise = self.objective.draw_shape((cfg.batch_size, *self._sample_shape), g)
        mine = torch.nonzero(self._owned[ds.user_of[indices]]).flatten()  # may be empty
        self.optimizer.zero_grad(set_to_none=True)
        fm_sum = torch.zeros((), device=self.device)
        for part in mine.split(self.micro_batch or len(mine)) if len(mine) else ():
            batch = ds.get(indices[part].tolist())
            part_sum = self.objective.loss(
                batch.latents,
                batch.text,
                batch.pooled,
                self.model.users(batch.users.to(self.device)),
                t[part],
                noise[part],
                reduction="sum",
            )
            (part_sum / cfg.batch_size).backward()  # this rank's share of the global mean
            fm_sum = fm_sum + part_sum.detach()
        fm = comm.sum(fm_sum / cfg.batch_size)
        loss = fm
        metrics: dict[str, Any] = {}
        if cfg.dispersion_enabled:
            k = len(ds.user_ids)
            chosen = torch.randperm(k, generator=g)[: min(cfg.dispersion_users, k)].to(self.device)
            lo, hi = chunk(len(chosen), comm.rank, comm.world_size)
            rows = chosen[lo:hi] if hi > lo else chosen[:1]  # fewer users than workers: run one, keep none
            text = self._empty_text.unsqueeze(0).expand(len(rows), -1, -1)
            with self.objective.autocast():
                out = self.model.adapters(text, self.model.users(rows))
            # every rank gets all the step's users (in `chosen` order) with gradients flowing back
            d_s = dispersion_loss(comm.gather_rows(out.shared[: hi - lo]), cfg.tau, cfg.dispersion_scale)
            d_b = dispersion_loss(comm.gather_rows(out.distinct[: hi - lo]), cfg.tau, cfg.dispersion_scale)
            disp = cfg.lambda_shared * d_s + cfg.lambda_distinct * d_b
            # each rank back-propagates 1/N of it; the gather's backward and the gradient all-reduce sum the N parts
            (disp / comm.world_size).backward()
            loss = loss + disp.detach()
            metrics.update(disp_shared=float(d_s.detach()), disp_distinct=float(d_b.detach()))
        metrics = {"fm": float(fm), **metrics}
        comm.all_reduce_grads(self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
        if not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm))):
            where = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written yet"
            )
            raise TrainingError(
                f"non-finite loss ({float(loss)}) or gradient norm ({float(grad_norm)}) at step {self.step + 1}; "
                f"stopped without applying it; {where}"
            )
        self.optimizer.step()
        self.step += 1
        metrics.update(
            step=self.step,
            loss=float(loss),
            grad_norm=float(grad_norm),
            lr=current_lr(self.optimizer),
            seconds=time.perf_counter() - started,
        )
        return metrics

    def evaluate(self, indices: list[int], draws: int = 4, seed: int = 12345) -> float:
        """Flow-matching loss of dataset examples at fixed draws (does not touch the training generator)."""
        batch = self.dataset.get(indices)
        fixed = FixedDrawLoss(self.objective, batch, draws, seed)
        with torch.no_grad():
            return fixed(self.model.users(batch.users.to(self.device)))

    # ------------------------------------------------------------------ the loop
    @property
    def is_writer(self) -> bool:
        """Rank 0 writes metrics, plots and checkpoints; the other ranks hold identical state."""
        return self.comm.rank == 0

    def run(
        self,
        progress: bool = True,
        on_step: Callable[[Stage1Trainer, dict[str, Any]], None] | None = None,
        on_checkpoint: Callable[[Stage1Trainer, dict[str, Any], Path | None], None] | None = None,
    ) -> dict[str, Any]:
        """Train to `config.steps`. `on_step(trainer, metrics)` runs after every step on every rank;
        `on_checkpoint(trainer, metrics, folder)` after every checkpoint step on every rank, with the
        folder written on rank 0 and None elsewhere (Ray Train reports from it)."""
        cfg = self.config
        if self.is_writer:
            self._log = MetricsLog(self.out / METRICS, resume_step=self.step if self._resumed else None)
            self.out.mkdir(parents=True, exist_ok=True)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, desc="stage 1", unit="step")
        last: dict[str, Any] = {}
        try:
            while self.step < cfg.steps:
                last = self.train_step()
                if self._log is not None and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                    self._log.write(last)
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", fm=f"{last['fm']:.4f}")
                if on_step is not None:
                    on_step(self, last)
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                    folder = self.save_checkpoint() if self.is_writer else None
                    if on_checkpoint is not None:
                        on_checkpoint(self, last, folder)
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
        return {
            "step": self.step,
            "last": last,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
        }

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
            meta = {
                "step": str(self.step),
                "config": self.config.to_json(),
                "optimizer": structure,
                "checkpoint_id": ckpt_id,
                "dataset": str(self.dataset.folder),
            }
            atomic_save_safetensors(tensors, tmp / TRAINER_STATE, metadata=meta)
            final = folder / name
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)
            fsync_dir(folder)
            atomic_write_bytes(folder / LATEST, name.encode())
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no earlier checkpoint exists"
            )
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


def flatten_settings(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(flatten_settings(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = list(v) if isinstance(v, tuple) else v
    return flat
