"""`premier eval --baseline lora`: per-user LoRA rows of the history sweep, beside Premier's fits.

Each sweep user gets a LoRA (`premier.lora.fit_lora`: the attention projections, rank r) fitted on
the same first k history images with stage 2's own loop and configuration; it goes through a file
in diffusers' format and back (`save_lora`, `read_lora`, `FluxPipeline.load_lora_weights`), as a
team would ship it, and generates that user's test prompts with the same seeds as every other row.
The row also carries what the user costs: fit time and steps, parameters and bytes on disk.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from premier.errors import InvalidRequestError
from premier.lora import LoraBank, fit_lora, save_lora
from premier.world.stages import encode_user
from premier.world.users import WorldUser

BASELINES = ("lora",)
LORA_PREFIX = "lora-r"


def lora_modes(baselines: tuple[str, ...], ranks: tuple[int, ...]) -> tuple[str, ...]:
    """The sweep modes the baselines add: 'lora-r4', 'lora-r16', ..."""
    bad = [b for b in baselines if b not in BASELINES]
    if bad:
        raise InvalidRequestError("baseline", f"unknown {', '.join(bad)}; choose from {', '.join(BASELINES)}")
    return tuple(f"{LORA_PREFIX}{r}" for r in ranks) if "lora" in baselines else ()


def rank_of(mode: str) -> int | None:
    return int(mode[len(LORA_PREFIX) :]) if mode.startswith(LORA_PREFIX) else None


def lora_sweep_row(ev: Any, users: list[WorldUser], k: int, rank: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The users' images with their own fitted LoRA each, and the per-user costs (means over the users).

    `ev`: the `premier.world.evaluate.Evaluator` running the sweep (its pipeline, encoder, stage-2 config and
    `generate`); not imported here, which would make the two modules import each other."""
    pipe = ev.flux_pipe
    bank = LoraBank(pipe, rank)
    images, seconds, steps, params, disk = [], [], [], [], []
    with tempfile.TemporaryDirectory(prefix="premier-lora-") as tmp:
        for user in users:
            started = time.perf_counter()
            fit = fit_lora(pipe.transformer, encode_user(ev.encoder, user, k), user.user_id, rank, ev.stage2)
            seconds.append(time.perf_counter() - started)
            steps.append(fit.fit["steps"])
            params.append(fit.parameters)
            path = save_lora(Path(tmp) / fit.user_id.replace("/", "_"), fit)
            disk.append(path.stat().st_size)
            bank.load(user.user_id, path)
            bank.activate(user.user_id)
            try:
                images.append(ev.generate(None, None, None, [user]))
            finally:
                bank.unload(user.user_id)
    pipe.transformer.unload_lora()  # plain Linear layers again for the rows that follow
    costs = {
        "fit_seconds": float(np.mean(seconds)),
        "fit_steps": float(np.mean(steps)),
        "parameters_per_user": int(np.mean(params)),
        "bytes_on_disk_per_user": int(np.mean(disk)),
    }
    return np.concatenate(images), costs


__all__ = ["BASELINES", "lora_modes", "lora_sweep_row", "rank_of"]
