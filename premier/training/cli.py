"""`premier data prepare`, `premier train` and `premier fit-user` (registered by premier.cli).

Each command parses its flags and calls the library: `fit-user` is `premier.training.fit.fit_new_user`
(the server's fit job calls the same function). Nothing heavy is imported here at module level:
`premier --help` must stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="prepare a dataset for training",
        description="Dataset tools. A raw dataset is one folder per user holding images and captions.jsonl "
        '(lines {"file": ..., "prompt": ...}).',
    )
    data_sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_sub.required = True
    q = data_sub.add_parser(
        "prepare",
        help="encode images and captions once into safetensors shards",
        description="Encode every image (VAE latents) and caption (T5 states, pooled CLIP) into safetensors shards, "
        "so training never runs the encoders. Resumes where an earlier run stopped; undecodable images are "
        "skipped and listed in OUT/skipped.jsonl.",
    )
    q.add_argument("raw", help="raw dataset folder (one sub-folder per user)")
    q.add_argument("out", help="output folder for the prepared dataset")
    q.add_argument(
        "--resolution", type=int, help="square training resolution in pixels (default: 32 embedded, 512 FLUX)"
    )
    q.add_argument("--max-sequence-length", type=int, help="T5 tokens per caption (default: the model's maximum)")
    q.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    q.add_argument("--batch-size", type=int, default=8, help="encoder batch size (default 8)")
    _model_args(q)
    _finish(q, cmd_prepare)

    p = sub.add_parser(
        "train",
        help="stage 1: train the preference adapters and training-user embeddings",
        description="Stage 1: train both preference adapters and the training-user table on a prepared dataset; "
        "FLUX stays frozen. Writes OUT/checkpoints/step-N (Premier checkpoints), OUT/metrics.jsonl and OUT/loss.png.",
    )
    p.add_argument("--data", required=True, help="prepared dataset folder (premier data prepare)")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoints/latest (exactly; only steps and checkpoint/log intervals may change)",
    )
    p.add_argument("--config", help="JSON file of stage-1 settings (flags override it)")
    p.add_argument(
        "--premier-config", help="premier_config.json with adapter/user sizes (default: the model's reference sizes)"
    )
    g = p.add_argument_group("stage-1 settings (defaults: the reference release)")
    g.add_argument("--steps", type=int)
    g.add_argument("--batch-size", type=int, help="DiT batch (default 16)")
    g.add_argument("--dispersion-users", type=int, help="users per step in the dispersion pass (default 32)")
    g.add_argument("--dispersion-tokens", type=int, help="empty-prompt token rows used by dispersion (default all)")
    g.add_argument("--lambda-shared", type=float, help="dispersion weight, block-shared adapter (default 0.1)")
    g.add_argument("--lambda-distinct", type=float, help="dispersion weight, block-distinct adapter (default 0.1)")
    g.add_argument("--tau", type=float, help="dispersion temperature (default 1.0)")
    g.add_argument(
        "--dispersion-scale",
        choices=("dim", "mean", "none"),
        help="what the dispersion's squared distances are divided by (default dim; mean is bounded, see docs/world.md)",
    )
    g.add_argument("--timestep-sampling", choices=["logit_normal", "uniform"])
    g.add_argument("--logit-mean", type=float)
    g.add_argument("--logit-std", type=float)
    g.add_argument("--guidance", type=float, help="guidance input during training (default 1.0)")
    g.add_argument("--precision", choices=["fp32", "bf16"])
    g.add_argument("--gradient-checkpointing", action="store_true", default=None)
    g.add_argument("--checkpoint-every", type=int)
    g.add_argument("--keep-checkpoints", type=int)
    g.add_argument("--log-every", type=int)
    g.add_argument("--seed", type=int)
    _optim_args(p)
    _model_args(p, dtype=False)
    d = p.add_argument_group('distributed (Ray Train; docs/operations.md "Stage-1 training on 8 GPUs")')
    d.add_argument(
        "--num-workers",
        type=int,
        help="run the same trainer on N Ray Train workers (DDP-style; gloo on CPU, NCCL with --use-gpu); "
        "omit for one process without Ray. --batch-size stays the global batch, so N does not change the run",
    )
    d.add_argument("--use-gpu", action="store_true", help="one GPU per worker (NCCL)")
    d.add_argument(
        "--micro-batch",
        type=int,
        help="run each worker's share of a step's batch in chunks of at most this many images (gradients "
        "accumulate; bounds activation memory, changes nothing else; default: the whole share)",
    )
    d.add_argument("--address", help="Ray cluster to join (e.g. auto, ray://head:10001); default: start a local Ray")
    d.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="worker-group restarts after a worker dies, each from the last checkpoint (default 3)",
    )
    _finish(p, cmd_train)

    p = sub.add_parser(
        "fit-user",
        help="stage 2: fit a new user from a few images",
        description="Stage 2: fit a new user from a folder of captioned images (captions.jsonl) against a stage-1 "
        "checkpoint; writes the user record (safetensors).",
    )
    p.add_argument("--images", required=True, help="folder with the user's images and captions.jsonl")
    p.add_argument("--user-id", required=True, help="id of the new user")
    p.add_argument("--checkpoint", help="stage-1 Premier checkpoint folder (default: the embedded demo checkpoint)")
    p.add_argument("-o", "--out", required=True, help="user record to write (.safetensors)")
    p.add_argument("--mode", choices=["coefficients", "direct"], default="coefficients")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument(
        "--early-stop",
        action="store_true",
        help="hold one image out (from 4 images) and stop when its loss stops improving (default: all --steps, "
        "as the paper fits)",
    )
    p.add_argument("--eval-every", type=int, default=50, help="held-out evaluation interval in steps (--early-stop)")
    p.add_argument("--patience", type=int, default=10, help="evaluations without improvement before stopping")
    p.add_argument(
        "--init",
        choices=["scratch", "mean"],
        help="where --mode direct starts: scratch (default, the paper's direct baseline) or the mean training user",
    )
    p.add_argument("--resolution", type=int, help="square resolution in pixels (default: 32 embedded, 512 FLUX)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--seed", type=int, default=0)
    _optim_args(p, weight_decay_default=0.0)
    _model_args(p)
    _finish(p, cmd_fit_user)


def _finish(p: argparse.ArgumentParser, func: Any) -> None:
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=func)


def _model_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="local diffusers FLUX folder (default: the embedded tiny model)")
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    if dtype:
        g.add_argument("--dtype", choices=_DTYPES, help="encoder dtype (default: bfloat16 on GPU, float32 on CPU)")


def _optim_args(p: argparse.ArgumentParser, weight_decay_default: float | None = None) -> None:
    g = p.add_argument_group("optimizer (default: Prodigy, lr 1.0, as the paper)")
    g.add_argument("--optimizer", choices=["prodigy", "adamw"])
    g.add_argument("--lr", type=float)
    g.add_argument("--weight-decay", type=float, default=weight_decay_default)
    g.add_argument("--grad-clip", type=float)


def _dtype(name: str | None) -> Any:
    import torch

    return getattr(torch, name) if name else None


# ----------------------------------------------------------------------------- data prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from premier.training.base_model import default_resolution, load_pipeline, resolve_device
    from premier.training.prepared import DataEncoder, prepare_dataset

    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, device, _dtype(args.dtype))
    encoder = DataEncoder(
        pipe, args.resolution or default_resolution(args.model), args.max_sequence_length, args.batch_size
    )
    bar = tqdm(disable=not args.progress, desc="prepare", unit="img")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        manifest = prepare_dataset(args.raw, args.out, encoder, shard_size=args.shard_size, progress=progress)
    finally:
        bar.close()
    print(f"prepared {manifest['num_examples']} images of {len(manifest['users'])} users into {args.out}")
    if manifest["num_skipped"]:
        print(f"skipped {manifest['num_skipped']} unreadable images; see {Path(args.out) / 'skipped.jsonl'}")
    return 0


# ----------------------------------------------------------------------------- train
def _stage1_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "steps",
        "batch_size",
        "dispersion_users",
        "dispersion_tokens",
        "lambda_shared",
        "lambda_distinct",
        "tau",
        "dispersion_scale",
        "timestep_sampling",
        "logit_mean",
        "logit_std",
        "guidance",
        "precision",
        "gradient_checkpointing",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "seed",
    )
    out: dict[str, Any] = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    optim = {
        n: getattr(args, n) for n in ("optimizer", "lr", "weight_decay", "grad_clip") if getattr(args, n) is not None
    }
    if optim:
        out["optim"] = optim
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from premier.errors import InvalidRequestError
    from premier.training.base_model import default_premier_config, load_transformer, resolve_device
    from premier.training.config import Stage1Config
    from premier.training.prepared import PreparedDataset
    from premier.training.stage1 import Stage1Trainer, _merge

    overrides = _stage1_overrides(args)
    if args.config:
        try:
            file_cfg = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise InvalidRequestError("config", f"cannot read {args.config}: {e}") from None
        if not isinstance(file_cfg, dict):
            raise InvalidRequestError("config", f"{args.config} must hold a JSON object")
        overrides = _merge(file_cfg, overrides)
    dataset = PreparedDataset(args.data)
    if args.num_workers is not None:
        return _train_distributed(args, dataset, overrides)
    if args.use_gpu or args.address:
        raise InvalidRequestError("num_workers", "--use-gpu and --address need --num-workers")
    flux = load_transformer(args.model, resolve_device(args.device))
    if args.resume:
        trainer = Stage1Trainer.resume(flux, dataset, args.out, overrides, micro_batch=args.micro_batch)
        print(f"resuming from {trainer.last_checkpoint} at step {trainer.step}", file=sys.stderr)
    else:
        config = Stage1Config.from_dict(overrides)
        pcfg = _premier_config(args.premier_config) if args.premier_config else default_premier_config(args.model, flux)
        trainer = Stage1Trainer(flux, dataset, args.out, config, pcfg, micro_batch=args.micro_batch)
    result = trainer.run(progress=args.progress)
    last = result["last"]
    if last:
        print(f"step {result['step']}: loss {last['loss']:.5f} (flow matching {last['fm']:.5f})")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _train_distributed(args: argparse.Namespace, dataset: Any, overrides: dict[str, Any]) -> int:
    """`premier train --num-workers N`: check what can be checked here, then run the TorchTrainer."""
    import os

    from premier.errors import InvalidRequestError
    from premier.training.collectives import assign_users
    from premier.training.config import Stage1Config
    from premier.training.distributed import run_distributed
    from premier.training.stage1 import latest_checkpoint

    if args.num_workers < 1:
        raise InvalidRequestError("num_workers", f"must be at least 1, got {args.num_workers}")
    if args.micro_batch is not None and args.micro_batch < 1:
        raise InvalidRequestError("micro_batch", f"must be at least 1, got {args.micro_batch}")
    if args.max_failures < 0:
        raise InvalidRequestError("max_failures", f"must be >= 0, got {args.max_failures}")
    if args.device:
        raise InvalidRequestError(
            "device", "--device is for one process; workers use --use-gpu (one GPU each) or the CPU"
        )
    assign_users(dataset.user_counts, args.num_workers)  # enough users for the workers
    if args.resume:
        if latest_checkpoint(args.out) is None:
            raise InvalidRequestError("resume", f"{Path(args.out) / 'checkpoints'} holds no checkpoint to resume from")
    else:
        Stage1Config.from_dict(overrides).check(num_users=len(dataset.user_ids))
    pcfg = _premier_config(args.premier_config).to_dict() if args.premier_config else None
    import ray

    started = not ray.is_initialized()  # already connected (called from Python): use that cluster
    if started and args.address:
        ray.init(address=args.address)
    elif started:
        ray.init(num_cpus=max(os.cpu_count() or 1, args.num_workers), include_dashboard=False)
    try:
        result = run_distributed(
            args.data,
            args.out,
            overrides,
            args.num_workers,
            use_gpu=args.use_gpu,
            model=args.model,
            premier_config=pcfg,
            resume=args.resume,
            max_failures=args.max_failures,
            progress=args.progress,
            micro_batch=args.micro_batch,
        )
    finally:
        if started:
            ray.shutdown()
    last = result["metrics"]
    if "loss" in last:
        print(
            f"step {last['step']}: loss {last['loss']:.5f} (flow matching {last['fm']:.5f}) on {args.num_workers} workers"
        )
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _premier_config(path: str) -> Any:
    """A checkpoint folder or a premier_config.json file."""
    from premier.config import PremierConfig
    from premier.errors import CheckpointError

    p = Path(path)
    if p.is_dir():
        return PremierConfig.load(p)
    try:
        data = json.loads(p.read_text())
        return PremierConfig.from_dict(data)
    except (OSError, json.JSONDecodeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"cannot read a Premier config from {path}: {e}") from None


# ----------------------------------------------------------------------------- fit-user
def cmd_fit_user(args: argparse.Namespace) -> int:
    from premier.training.fit import fit_new_user

    options = {
        n: getattr(args, n)
        for n in (
            "mode",
            "steps",
            "batch_size",
            "eval_every",
            "patience",
            "early_stop",
            "init",
            "resolution",
            "precision",
            "seed",
            "optimizer",
            "lr",
            "weight_decay",
            "grad_clip",
            "device",
            "dtype",
        )
    }
    record = fit_new_user(
        args.user_id,
        args.images,
        model=args.model,
        checkpoint=args.checkpoint,
        progress=args.progress,
        on_skip=_print_skipped,
        **options,
    )
    path = record.save(args.out)
    fit = record.fit
    held = (
        f", held-out loss {fit['held_out_loss']:.5f} (from {fit['initial_held_out_loss']:.5f})"
        if fit["held_out_loss"] is not None
        else ""
    )
    print(
        f"fitted {args.user_id!r} ({args.mode}) on {fit['train_images']} images in {fit['steps']} steps: loss {fit['final_loss']:.5f}{held}"
    )
    print(f"record: {path}")
    return 0


def _print_skipped(file: str, reason: str) -> None:
    """An image that does not decode: one line on stderr, and the fit goes on without it."""
    print(f"skipped {file}: {reason}", file=sys.stderr)
