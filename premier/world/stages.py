"""The world's runs of the project's own trainers: data prepare, stage 1 (and its ablations), stage 2.

Ablations (DESIGN section 1; the paper's Table 2), each a stage-1 run on the same data and budget:

- `no_dispersion`: both dispersion weights 0;
- `no_shared` / `no_distinct`: that adapter's output is held at exactly zero (its output
  LayerNorm gain and bias are zeroed and frozen), so only the other adapter modulates;
- `no_ppm`: the adapters read the empty prompt instead of the prompt, in training and at
  inference, so the offset depends on the user only (no prompt preference modulation).

A variant may carry stage-1 settings that differ from the world's, for the dispersion comparisons (issue 18's
forms and lambda sweep): `<variant>:<setting>:...`, each setting a dispersion form (`dim`, `diag`, `mean`, `none`:
`premier.training.losses.dispersion_loss`), `lambda=<x>` (both dispersion weights) or `tau=<x>`; for example
`premier:diag`, `premier:dim:lambda=0.01`. Each is its own stage-1 run and row.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from diffusers import FluxPipeline

from premier.adapters import PremierAdapters
from premier.checkpoint import PremierModel
from premier.errors import InvalidRequestError
from premier.training.config import Stage1Config, Stage2Config
from premier.training.losses import DISPERSION_SCALES
from premier.training.objective import build_optimizer
from premier.training.prepared import Batch, DataEncoder, PreparedDataset, prepare_dataset
from premier.training.stage1 import Stage1Trainer, latest_checkpoint
from premier.training.stage2 import FitResult, fit_user
from premier.world.eval_cache import RUN_SETTINGS
from premier.world.users import WorldUser

VARIANTS = ("premier", "no_dispersion", "no_shared", "no_distinct", "no_ppm")


class EmptyPromptAdapters(nn.Module):
    """The `no_ppm` ablation: wraps the adapters so that they always read the empty prompt's states."""

    def __init__(self, adapters: PremierAdapters, empty_text: torch.Tensor):
        super().__init__()
        self.inner = adapters
        self.config = adapters.config
        self.register_buffer("empty_text", empty_text.detach().clone(), persistent=False)

    def forward(self, text_states: torch.Tensor, user_tokens: torch.Tensor):
        return self.inner(self._empty(text_states), user_tokens)

    def text_deltas(
        self, text_states: torch.Tensor, user_tokens: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.inner.text_deltas(self._empty(text_states), user_tokens, active)

    def _empty(self, text_states: torch.Tensor) -> torch.Tensor:
        e = self.empty_text.to(text_states.device, text_states.dtype)
        if e.shape[0] != text_states.shape[1]:
            raise InvalidRequestError(
                "prompt", f"text length {text_states.shape[1]} != empty prompt length {e.shape[0]}"
            )
        return e.unsqueeze(0).expand(text_states.shape[0], -1, -1)


def prepare(
    pipe: FluxPipeline, raw: str | Path, out: str | Path, resolution: int, max_sequence_length: int
) -> PreparedDataset:
    encoder = DataEncoder(
        pipe, resolution, max_sequence_length=max_sequence_length, batch_size=64, storage_dtype=torch.float32
    )
    prepare_dataset(raw, out, encoder, shard_size=256)
    return PreparedDataset(out)


def parse_variant(name: str) -> tuple[str, dict[str, Any]]:
    """A variant's ablation and its stage-1 settings (the module docstring's grammar), refused with the part named."""
    ablation, *parts = name.split(":")
    if ablation not in VARIANTS:
        raise InvalidRequestError("variants", f"unknown {ablation!r} in {name!r}; choose from {', '.join(VARIANTS)}")
    settings: dict[str, Any] = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq and part in DISPERSION_SCALES:
            key, parsed = "dispersion", part
        elif eq and key in ("lambda", "tau"):
            try:
                parsed = float(value)
            except ValueError:
                parsed = math.nan
            if not math.isfinite(parsed) or parsed < 0 or (key == "tau" and parsed == 0):
                raise InvalidRequestError("variants", f"{key} in {name!r} must be a finite number >= 0 (tau > 0)")
        else:
            raise InvalidRequestError(
                "variants",
                f"unknown setting {part!r} in {name!r}: a dispersion form ({', '.join(DISPERSION_SCALES)}), "
                "lambda=<x> or tau=<x>",
            )
        if key in settings:
            raise InvalidRequestError("variants", f"{key} is given twice in {name!r}")
        settings[key] = parsed
    if ablation == "no_dispersion" and settings:
        raise InvalidRequestError("variants", f"{name!r}: no_dispersion has no dispersion to set")
    return ablation, settings


def canonical_variant(name: str) -> str:
    """One spelling per configuration (`premier:lambda=0.10:diag` is `premier:diag:lambda=0.1`): one run each."""
    ablation, settings = parse_variant(name)
    parts = [settings["dispersion"]] if "dispersion" in settings else []
    parts += [f"{k}={settings[k]:g}" for k in ("lambda", "tau") if k in settings]
    return ":".join([ablation, *parts])


def variant_folder(name: str) -> str:
    """The variant as a file name: `premier:dim:lambda=0.01` is `premier-dim-lambda0.01`."""
    return canonical_variant(name).replace(":", "-").replace("=", "")


def stage1_config(variant: str, base: Stage1Config) -> Stage1Config:
    ablation, settings = parse_variant(variant)
    if "dispersion" in settings:
        base = replace(base, dispersion_scale=settings["dispersion"])
    if "lambda" in settings:
        base = replace(base, lambda_shared=settings["lambda"], lambda_distinct=settings["lambda"])
    if "tau" in settings:
        base = replace(base, tau=settings["tau"])
    if ablation == "no_dispersion":
        return replace(base, lambda_shared=0.0, lambda_distinct=0.0)
    return base


def build_trainer(
    flux: Any, dataset: PreparedDataset, out: str | Path, variant: str, base: Stage1Config, premier_config: Any
) -> Stage1Trainer:
    """A Stage1Trainer set up for one variant (see the module docstring)."""
    trainer = Stage1Trainer(flux, dataset, out, stage1_config(variant, base), premier_config)
    adapters, variant = trainer.model.adapters, parse_variant(variant)[0]
    if variant in ("no_shared", "no_distinct"):
        silenced = adapters.shared if variant == "no_shared" else adapters.distinct
        with torch.no_grad():
            silenced.norm_out_weight.zero_()
            silenced.norm_out_bias.zero_()
        silenced.requires_grad_(False)
        trainer.params = [p for p in trainer.model.parameters() if p.requires_grad]
        o = trainer.config.optim
        trainer.optimizer = build_optimizer(trainer.params, o.optimizer, o.lr, o.weight_decay, o.betas)
    elif variant == "no_ppm":
        trainer.objective.adapters = EmptyPromptAdapters(adapters, dataset.empty_text)
    return trainer


def resume_trainer(
    flux: Any, dataset: PreparedDataset, out: str | Path, variant: str, steps: int
) -> Stage1Trainer | None:
    """A variant's interrupted run, continued from its last checkpoint to `steps` with its saved settings; None for
    the variants that train a subset of the parameters (their optimizer state does not map back: they restart)."""
    variant = parse_variant(variant)[0]
    if variant in ("no_shared", "no_distinct"):
        return None
    trainer = Stage1Trainer.resume(flux, dataset, out, overrides={"steps": steps})
    if variant == "no_ppm":
        trainer.objective.adapters = EmptyPromptAdapters(trainer.model.adapters, dataset.empty_text)
    return trainer


def use_variant(premier: PremierModel, variant: str, empty_text: torch.Tensor) -> PremierModel:
    """Make a loaded checkpoint behave as its variant at inference and in stage 2 (only no_ppm differs)."""
    if parse_variant(variant)[0] == "no_ppm" and not isinstance(premier.adapters, EmptyPromptAdapters):
        premier.adapters = EmptyPromptAdapters(premier.adapters, empty_text)
    return premier


def encode_user(encoder: DataEncoder, user: WorldUser, n: int | None = None) -> Batch:
    """A world user's first n history images (and their prompts), encoded as stage 2 takes them."""
    items = user.history_items(n)
    latents = encoder.encode_images([image for _, image, _ in items])
    text, pooled = encoder.encode_prompts([prompt for _, _, prompt in items])
    return Batch(latents, text, pooled, torch.zeros(len(items), dtype=torch.long))


def fit(
    flux: Any, premier: PremierModel, checkpoint_id: str, samples: Batch, user_id: str, mode: str, config: Stage2Config
) -> FitResult:
    return fit_user(flux, premier, checkpoint_id, samples, user_id, replace(config, mode=mode), progress=False)


def fit_together(
    flux: Any, premier: PremierModel, checkpoint_id: str, samples: dict[str, Batch], config: Stage2Config
) -> list[torch.Tensor]:
    """The onboarding path's fits (serving's resident workers): every user in the same passes; tokens in order."""
    from premier.training.multifit import MultiUserFitter

    fitter = MultiUserFitter(flux, premier, checkpoint_id, config)
    for user_id, batch in samples.items():
        fitter.add(user_id, batch)
    results = fitter.run()
    out = []
    for user_id in samples:
        if isinstance(result := results[user_id], Exception):
            raise result
        out.append(result.record.materialise(premier.users, checkpoint_id))
    return out


def train_variant(
    flux: Any,
    dataset: PreparedDataset,
    run: Path,
    variant: str,
    config: Stage1Config,
    premier_config: Any,
    settings: dict[str, Any],
    resume: bool,
    log: Callable[[str], None],
    progress: bool = False,
) -> Path:
    """Train a variant's stage 1 into `run`, or continue its interrupted run (`resume`: it has a checkpoint and
    was started with these `settings`, which a fresh run records first); the last checkpoint's folder."""
    started = time.perf_counter()
    trainer = resume_trainer(flux, dataset, run, variant, config.steps) if resume else None
    if trainer is None:
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        (run / RUN_SETTINGS).write_text(json.dumps(settings, indent=1) + "\n")
        trainer = build_trainer(flux, dataset, run, variant, config, premier_config)
    else:
        log(f"eval: resuming stage 1 '{variant}' at step {trainer.step}")
    trainer.run(progress=progress)
    log(f"eval: trained stage 1 '{variant}' ({config.steps} steps) in {time.perf_counter() - started:.0f}s")
    folder = latest_checkpoint(run)
    assert folder is not None
    return folder
