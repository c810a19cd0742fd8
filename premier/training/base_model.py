"""The frozen base model for training and fitting: the embedded tiny FLUX or a local FLUX folder.

Training on prepared data needs only the transformer, so for a FLUX folder only
`transformer/` is loaded (the text encoders and VAE of FLUX.1-dev are ~10 GB more);
encoding (`data prepare`, `fit-user`) needs the whole pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

from premier.config import PremierConfig
from premier.errors import ModelLoadError
from premier.models.embedded import EmbeddedSpec, build_embedded_flux, embedded_premier_config
from premier.models.loading import load_flux_folder


def resolve_device(device: str | None) -> torch.device:
    return torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_resolution(model: str | Path | None) -> int:
    """Square training and fitting resolution in pixels: the embedded model's image size, 512 for FLUX."""
    return EmbeddedSpec().image_size if model is None else 512


def load_pipeline(model: str | Path | None, device: torch.device, dtype: torch.dtype | None = None) -> FluxPipeline:
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe = build_embedded_flux() if model is None else load_flux_folder(model, dtype=dtype)
    return pipe.to(device=device, dtype=dtype)


def load_transformer(
    model: str | Path | None, device: torch.device, dtype: torch.dtype | None = None
) -> FluxTransformer2DModel:
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if model is None:
        flux = build_embedded_flux().transformer
    else:
        folder = Path(model).expanduser() / "transformer"
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{folder} is missing config.json (expected a diffusers FLUX folder at {model})")
        try:
            flux = FluxTransformer2DModel.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, torch_dtype=dtype
            )
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"could not load the FLUX transformer from {folder}: {e}") from e
    return flux.to(device=device, dtype=dtype).eval().requires_grad_(False)


def default_premier_config(model: str | Path | None, flux: FluxTransformer2DModel) -> PremierConfig:
    """The embedded model's own sizes, or the reference sizes fitted to a FLUX folder's transformer."""
    return embedded_premier_config() if model is None else PremierConfig.for_transformer(flux.config)
