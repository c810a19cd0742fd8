"""Stage 1 on N workers with Ray Train: the launcher (`run_distributed`) and its worker loop.

The trainer has one `train_step`; what differs between one process and N is a `Comm` from
`premier.training.collectives` (`LocalComm` in one process, `TorchComm` inside a Ray Train worker,
whose `TorchTrainer` set up the process group: gloo on CPU, NCCL on GPU). This module builds the
`Stage1Trainer` on each worker with a `TorchComm` and reports its checkpoints to Ray Train.

How a step is split (DESIGN section 1; docs/operations.md "Stage-1 training on 8 GPUs"):

- Sampling is global and identical on every rank: each rank draws the step's B example indices,
  timesteps, noise and dispersion users from the same checkpointed CPU generator, exactly as one
  process does. The run therefore does not depend on N: the loss sequence of N workers equals that
  of one process (to float rounding), and a checkpoint written by N workers resumes on M.
- Reading is sharded by user: every user belongs to one rank (`assign_users`, balanced by example
  count), and a rank loads, noises and runs the DiT on only the examples of the global batch whose
  user it owns; the shards of other users are never opened. The price: the per-rank DiT batch varies
  from step to step (binomially around B/N; a rank may get none), so a step waits for the busiest
  rank. Balanced per-rank batches would need per-rank sampling, which makes the run depend on N.
- Gradients: each rank's loss is (sum of its examples' flow-matching losses) / B, plus the global
  dispersion term / N; one SUM all-reduce of every trainable gradient (adapters and the whole
  training-user table, rows of users absent from the step being exactly zero) then gives every rank
  the single-process gradient, and the identical optimizer step keeps the replicas identical. This is
  DDP's all-reduce, done explicitly after backward rather than by torch's DDP wrapper: DDP averages
  over ranks (wrong when the per-rank batches differ), needs every rank to run the same forward (a
  rank may own none of a step's examples), and the adapters run twice per step (DiT pass and
  dispersion pass).
- Dispersion: the step's dispersion users are split into N contiguous chunks; each rank runs the
  adapters on its chunk and `gather_rows` concatenates the chunks on every rank (gradients flow back:
  the backward sums the gathered gradient over ranks and keeps the rank's rows), so the loss spans all
  the step's users whatever N is.

Checkpoints: rank 0 writes the project's own checkpoint (Stage1Trainer.save_checkpoint: atomic,
`latest` pointer, pruning) and reports a small Ray Train checkpoint that holds only a pointer to that
folder; after a worker failure Ray Train restarts the worker group (FailureConfig(max_failures)) and
the workers resume from the newest checkpoint this launch wrote: the run folder's `latest` (rank 0
writes it before reporting, so it is never older than `ray.train.get_checkpoint()`'s pointer, and it
survives a failure that strikes before Ray Train's controller collected the report). The model
state stays in one format (loadable with `--checkpoint`, resumable by `premier train --resume` with
or without Ray, on any number of workers) and is not copied into Ray's storage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from premier.config import PremierConfig
from premier.errors import InvalidRequestError, TrainingError
from premier.training.base_model import default_premier_config, load_transformer
from premier.training.collectives import TorchComm
from premier.training.config import Stage1Config
from premier.training.prepared import PreparedDataset
from premier.training.stage1 import TRAINER_STATE, Stage1Trainer, latest_checkpoint

POINTER_FILE = "premier_checkpoint.json"


# ----------------------------------------------------------------------------- the Ray Train worker
def train_worker(cfg: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the TorchTrainer: build (or resume) the one Stage1Trainer and run it."""
    import ray.train  # Ray is imported when a launch or a worker runs, not with this module
    import ray.train.torch

    comm = TorchComm()
    device = ray.train.torch.get_device() if cfg.get("use_gpu") else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dataset = PreparedDataset(cfg["data"])
    flux = load_transformer(cfg.get("model"), device)
    out = Path(cfg["out"])
    resume_from: Path | None = None
    latest = latest_checkpoint(out)
    ray_ckpt = ray.train.get_checkpoint()
    if latest is not None and checkpoint_stamp(latest) != cfg.get("latest_at_launch"):
        # A restart after a failure, and an earlier attempt of this launch wrote `latest`. Rank 0
        # writes it before reporting the pointer to Ray Train, so it is never older than
        # ray.train.get_checkpoint(), and it survives a failure that strikes before Ray Train
        # registered the report (the controller collects reports asynchronously).
        resume_from = latest
    elif ray_ckpt is not None:
        with ray_ckpt.as_directory() as d:
            resume_from = Path(json.loads((Path(d) / POINTER_FILE).read_text())["checkpoint"])
    elif cfg.get("resume"):
        resume_from = latest_checkpoint(out)
        if resume_from is None:
            raise InvalidRequestError("resume", f"{out / 'checkpoints'} holds no checkpoint to resume from")
    if resume_from is not None:
        trainer = Stage1Trainer.resume(
            flux,
            dataset,
            out,
            cfg.get("overrides") or {},
            checkpoint=resume_from,
            comm=comm,
            micro_batch=cfg.get("micro_batch"),
        )
        if comm.rank == 0:
            print(f"resuming from {resume_from} at step {trainer.step} on {comm.world_size} workers", file=sys.stderr)
    else:
        config = Stage1Config.from_dict(cfg.get("overrides") or {})
        pcfg = (
            PremierConfig.from_dict(cfg["premier_config"])
            if cfg.get("premier_config")
            else default_premier_config(cfg.get("model"), flux)
        )
        trainer = Stage1Trainer(flux, dataset, out, config, pcfg, comm=comm, micro_batch=cfg.get("micro_batch"))

    fault = cfg.get("fault")  # {"rank", "step", "flag"}: kill this worker once (fault-tolerance tests and drills)

    def on_step(tr: Stage1Trainer, metrics: dict[str, Any]) -> None:
        if fault and comm.rank == fault["rank"] and tr.step == fault["step"] and not Path(fault["flag"]).exists():
            Path(fault["flag"]).write_text(f"killed rank {comm.rank} (pid {os.getpid()}) after step {tr.step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_checkpoint(tr: Stage1Trainer, metrics: dict[str, Any], folder: Path | None) -> None:
        report = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if folder is None:  # not rank 0: every worker reports, only rank 0 with a checkpoint
            ray.train.report(report)
            return
        with tempfile.TemporaryDirectory(prefix="premier-ray-ckpt-") as d:
            (Path(d) / POINTER_FILE).write_text(json.dumps({"checkpoint": str(folder.resolve()), "step": tr.step}))
            ray.train.report(
                {**report, "checkpoint": str(folder.resolve())}, checkpoint=ray.train.Checkpoint.from_directory(d)
            )

    trainer.run(progress=bool(cfg.get("progress")) and comm.rank == 0, on_step=on_step, on_checkpoint=on_checkpoint)


def checkpoint_stamp(folder: Path | None) -> list[Any] | None:
    """Identifies one written checkpoint (name and write time of its trainer state)."""
    if folder is None:
        return None
    return [folder.name, (folder / TRAINER_STATE).stat().st_mtime_ns]


def run_distributed(
    data: str | Path,
    out: str | Path,
    overrides: dict[str, Any],
    num_workers: int,
    *,
    use_gpu: bool = False,
    model: str | None = None,
    premier_config: dict[str, Any] | None = None,
    resume: bool = False,
    max_failures: int = 3,
    progress: bool = False,
    fault: dict[str, Any] | None = None,
    micro_batch: int | None = None,
    cpus_per_worker: float = 1.0,
) -> dict[str, Any]:
    """Run stage 1 with a TorchTrainer on the Ray cluster this process is connected to (ray.init first)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    loop_config = {
        "data": str(Path(data).resolve()),
        "out": str(out),
        "overrides": overrides,
        "model": model,
        "premier_config": premier_config,
        "resume": resume,
        "use_gpu": use_gpu,
        "progress": progress,
        "fault": fault,
        "micro_batch": micro_batch,
        "latest_at_launch": checkpoint_stamp(latest_checkpoint(out)),
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            # A new name per launch: Ray Train would otherwise restore an earlier launch's state;
            # `--resume` goes through the project's own checkpoints instead.
            name=f"stage1-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",
            storage_path=str(out / "ray"),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps worker errors (TrainingFailedError); surface the cause
        raise TrainingError(f"distributed stage-1 training failed: {e}") from e
    if getattr(result, "error", None):
        raise TrainingError(f"distributed stage-1 training failed: {result.error}")
    ckpt = latest_checkpoint(out)
    return {"metrics": dict(result.metrics or {}), "checkpoint": str(ckpt) if ckpt else None}
