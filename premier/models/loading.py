"""Loading a real FLUX pipeline from a local diffusers-format folder, and each model's limits.

Only local files are read (`local_files_only=True`) and only safetensors weights are accepted
(`use_safetensors=True`): nothing downloads and nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import FluxPipeline

from premier.errors import ModelLoadError
from premier.requests import ModelProfile  # (defined with the requests it limits; imported here by many)

_WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")
_TOKENIZERS = ("tokenizer", "tokenizer_2")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def _check_folder(path: Path) -> None:
    """Raise ModelLoadError naming the first missing piece, before diffusers gives a vaguer error."""
    if not path.is_dir():
        raise ModelLoadError(f"model folder {path} does not exist")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder: model_index.json is missing")
    try:
        components = json.loads(index.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{index} is not valid JSON: {e}") from e
    for name in _WEIGHT_COMPONENTS + _TOKENIZERS + ("scheduler",):
        if name not in components or components[name] in (None, [None, None]):
            raise ModelLoadError(f"{index} does not list the '{name}' component a FLUX pipeline needs")
        sub = path / name
        if not sub.is_dir():
            raise ModelLoadError(f"{path} is missing the folder {name}/")
    for name in _WEIGHT_COMPONENTS:
        sub = path / name
        if not (sub / "config.json").is_file():
            raise ModelLoadError(f"{sub} is missing config.json")
        if not list(sub.glob("*.safetensors")):
            extra = " (only pickle weights found; convert them to safetensors)" if list(sub.glob("*.bin")) else ""
            raise ModelLoadError(f"{sub} has no .safetensors weights{extra}")
        for idx in sub.glob("*.safetensors.index.json"):
            shards = set(json.loads(idx.read_text()).get("weight_map", {}).values())
            missing = sorted(s for s in shards if not (sub / s).is_file())
            if missing:
                raise ModelLoadError(f"{sub} is missing weight shards: {', '.join(missing[:4])}")
    for name in _TOKENIZERS:
        sub = path / name
        if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
            raise ModelLoadError(f"{sub} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    if not (path / "scheduler" / "scheduler_config.json").is_file():
        raise ModelLoadError(f"{path / 'scheduler'} is missing scheduler_config.json")


def load_flux_folder(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """FLUX.1-dev (or any FluxPipeline) from a local diffusers folder."""
    path = Path(path).expanduser()
    _check_folder(path)
    try:
        pipe = FluxPipeline.from_pretrained(str(path), local_files_only=True, use_safetensors=True, torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the FLUX pipeline from {path}: {e}") from e
    for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe


def profile_for(pipe: FluxPipeline, embedded: bool) -> ModelProfile:
    multiple = pipe.vae_scale_factor * 2  # VAE downsampling, then 2x2 latent packing
    seq = int(getattr(pipe.tokenizer_2, "model_max_length", 512) or 512)
    seq = min(seq, 512)  # FLUX's T5 limit
    if embedded:
        # The embedded model's default size is the one it was trained at (its codec's sample size).
        size = int(getattr(pipe.vae.config, "sample_size", 128))
        return ModelProfile(
            seq, multiple, min_size=multiple * 2, max_size=512, default_size=size, default_steps=8, default_guidance=3.5
        )
    return ModelProfile(
        seq, multiple, min_size=256, max_size=2048, default_size=1024, default_steps=28, default_guidance=3.5
    )
