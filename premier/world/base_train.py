"""Pretraining the world's base model: plain text-conditional FLUX flow matching, no users.

Images are rendered on the fly (a random prompt in a random style each), so the base model
learns to follow prompts and samples styles from the mixture of all styles, preferring no
user: the role FLUX.1-dev plays for Premier. Text states of the world's few prompts are
encoded once. The weights are rounded to float16 when saved (the shipped size halves) and
reloaded as float32, so what later stages train against is exactly what ships.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline

from premier.errors import InvalidRequestError
from premier.models.embedded import TRANSFORMER_DIR
from premier.training.losses import flow_matching_loss, noisy_latents, sample_timesteps
from premier.world.spec import PROMPTS


@dataclass(frozen=True)
class BaseTrainConfig:
    steps: int = 1200
    batch_size: int = 48
    lr: float = 1e-3
    warmup: int = 100
    final_lr_fraction: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 300  # an interrupted run still leaves a usable transformer
    stop_at: int | None = 600  # end here, part-way through the `steps` schedule (the CPU budget; docs/world.md)

    def check(self) -> None:
        for name in ("steps", "batch_size", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise InvalidRequestError(name, f"must be a positive integer, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise InvalidRequestError("lr", f"must be positive, got {self.lr!r}")


def pixels_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1], what the VAE (here the codec) takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


class PromptBank:
    """T5 states and pooled CLIP vectors of every world prompt (and the empty one), encoded once."""

    def __init__(self, pipe: FluxPipeline, max_sequence_length: int):
        prompts = list(PROMPTS) + [""]
        with torch.inference_mode():
            text, pooled, _ = pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=pipe.transformer.device, max_sequence_length=max_sequence_length
            )
        self.text, self.pooled = text.clone().float(), pooled.clone().float()
        self.index = {p: i for i, p in enumerate(prompts)}

    def get(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([self.index[p] for p in prompts])
        return self.text[idx], self.pooled[idx]


def flux_loss(
    flux: torch.nn.Module,
    latents: torch.Tensor,
    text: torch.Tensor,
    pooled: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Flow-matching loss of the plain diffusers transformer (no Premier deltas)."""
    b, c, h, w = latents.shape
    xt, target = noisy_latents(latents, noise, t)
    packed = FluxPipeline._pack_latents(xt, b, c, h, w)
    target = FluxPipeline._pack_latents(target, b, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    txt_ids = torch.zeros(text.shape[1], 3, device=latents.device, dtype=latents.dtype)
    pred = flux(
        hidden_states=packed,
        encoder_hidden_states=text,
        pooled_projections=pooled,
        timestep=t,
        img_ids=img_ids,
        txt_ids=txt_ids,
        guidance=None,
        return_dict=False,
    )[0]
    return flow_matching_loss(pred, target)


def encode_pixels(pipe: FluxPipeline, images: np.ndarray) -> torch.Tensor:
    vae = pipe.vae
    with torch.no_grad():
        z = vae.encode(pixels_to_tensor(images).to(vae.device, vae.dtype)).latent_dist.mode()
    return (z - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def train_base(
    pipe: FluxPipeline,
    out: str | Path,
    config: BaseTrainConfig = BaseTrainConfig(),
    max_sequence_length: int = 16,
    progress: bool = True,
    *,
    world: Any,
) -> dict[str, Any]:
    """Train `pipe.transformer` in place on renders of `world` (a `premier.world.worlds.World`);
    write OUT/transformer (float16 safetensors) and OUT/base_metrics.jsonl."""
    config.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    flux = pipe.transformer.float().train().requires_grad_(True)
    bank = PromptBank(pipe, max_sequence_length)
    optimizer = torch.optim.AdamW(flux.parameters(), lr=config.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        frac = (step - config.warmup) / max(1, config.steps - config.warmup)
        return config.final_lr_fraction + (1 - config.final_lr_fraction) * 0.5 * (1 + math.cos(math.pi * frac))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    rng = np.random.default_rng([config.seed, 7])
    g = torch.Generator("cpu").manual_seed(config.seed)
    started = time.perf_counter()
    recent: list[float] = []
    from tqdm.auto import tqdm

    with open(out / "base_metrics.jsonl", "w") as log:
        last = min(config.steps, config.stop_at or config.steps)
        for step in tqdm(range(last), disable=not progress, desc="base", unit="step"):
            items = world.random_items(rng, config.batch_size)
            latents = encode_pixels(pipe, world.render_batch(items))
            text, pooled = bank.get([c.prompt for c, _, _ in items])
            t = sample_timesteps(config.batch_size, g, "logit_normal", config.logit_mean, config.logit_std)
            noise = torch.randn(latents.shape, generator=g)
            loss = flux_loss(flux, latents, text, pooled, t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flux.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            recent = (recent + [float(loss.detach())])[-config.log_every :]
            if (step + 1) % config.log_every == 0 or step + 1 == last:
                log.write(
                    json.dumps(
                        {"step": step + 1, "loss": sum(recent) / len(recent), "seconds": time.perf_counter() - started}
                    )
                    + "\n"
                )
                log.flush()
            if (step + 1) % config.save_every == 0 and step + 1 < last:
                save_transformer(flux, out / TRANSFORMER_DIR)
    seconds = time.perf_counter() - started
    flux.eval().requires_grad_(False)
    save_transformer(flux, out / TRANSFORMER_DIR)
    (out / "base_config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    return {"steps": last, "seconds": seconds, "final_loss": sum(recent) / len(recent)}


def save_transformer(flux: torch.nn.Module, folder: Path) -> None:
    """Round to float16 for shipping, save, and keep the rounded weights in `flux` (float32)."""
    with torch.no_grad():
        for p in flux.parameters():
            p.copy_(p.half().float())
    flux.to(torch.float16).save_pretrained(str(folder), safe_serialization=True)
    flux.to(torch.float32)
