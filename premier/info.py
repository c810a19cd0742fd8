"""Sizes a deployer plans with: parameters per component, adapter bytes, bytes per user."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from premier.adapters import PremierAdapters
from premier.config import PremierConfig


def _params(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def adapter_info(config: PremierConfig, adapters: PremierAdapters, dtype: torch.dtype) -> dict[str, Any]:
    n_shared, n_distinct = _params(adapters.shared), _params(adapters.distinct)
    return {
        "adapter_shared_params": n_shared,
        "adapter_distinct_params": n_distinct,
        "adapter_bytes": (n_shared + n_distinct) * _itemsize(dtype),
        "modulated_double_blocks": len(config.double_blocks),
        "modulated_single_blocks": len(config.single_blocks),
        "user_embedding_shape": f"{config.num_user_tokens}x{config.user_dim}",
        "bytes_per_user": config.num_user_tokens * config.user_dim * _itemsize(dtype),
        "dtype": str(dtype).removeprefix("torch."),
    }


def model_info(pipe) -> dict[str, Any]:
    """Sizes of a loaded `PremierPipeline`."""
    fp = pipe.flux_pipe
    info: dict[str, Any] = {
        "transformer_params": _params(fp.transformer),
        "text_encoder_clip_params": _params(fp.text_encoder),
        "text_encoder_t5_params": _params(fp.text_encoder_2),
        "vae_params": _params(fp.vae),
        "max_sequence_length": pipe.profile.max_sequence_length,
    }
    if pipe.premier is not None:
        info.update(adapter_info(pipe.premier.config, pipe.premier.adapters, pipe.dtype))
        info["training_users"] = len(pipe.premier.users)
        info["checkpoint_id"] = pipe.checkpoint_id
    else:
        info["checkpoint_id"] = None
    return info


def reference_info(dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """The reference FLUX.1-dev configuration, counted on the meta device (no memory, no weights)."""
    config = PremierConfig()
    with torch.device("meta"):
        adapters = PremierAdapters(config)
    info = {"configuration": "FLUX.1-dev reference (D=3072, T5 4096, 19 double blocks modulated)"}
    info.update(adapter_info(config, adapters, dtype))
    info["bytes_per_1000_training_users"] = 1000 * info["bytes_per_user"]
    return info
