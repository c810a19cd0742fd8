"""Shared fixtures: tiny FLUX-architecture models built in code, on the CPU, in fp32."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Ray's workers run at nice 15 by default: on a busy machine (CI beside other jobs) they starve (serving/server.py)
os.environ.setdefault("RAY_worker_niceness", "0")

import pytest
import torch
from diffusers import FluxTransformer2DModel

from premier.config import PremierConfig

torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_flux(seed: int = 0, **overrides) -> FluxTransformer2DModel:
    cfg = dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=20,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**cfg).eval()


def tiny_premier_config(flux: FluxTransformer2DModel, **overrides) -> PremierConfig:
    values = dict(num_user_tokens=5, user_dim=12, adapter_width=32, adapter_heads=2, adapter_depth=3)
    values.update(overrides)
    return PremierConfig.for_transformer(flux.config, **values)


def flux_inputs(flux: FluxTransformer2DModel, batch: int = 2, text_len: int = 7, grid: int = 4, seed: int = 1):
    """Random inputs for a transformer forward: a grid x grid latent, `text_len` text tokens."""
    g = torch.Generator().manual_seed(seed)
    c = flux.config
    inputs = dict(
        hidden_states=torch.randn(batch, grid * grid, c.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, c.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, c.pooled_projection_dim, generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.stack(
            torch.meshgrid(torch.zeros(1), torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij"), -1
        ).reshape(-1, 3),
        txt_ids=torch.zeros(text_len, 3),
    )
    if c.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


@pytest.fixture(scope="session")
def embedded_pipeline():
    from premier.pipeline import PremierPipeline

    return PremierPipeline.load(device="cpu", dtype=torch.float32)
