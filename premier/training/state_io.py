"""Optimizer and RNG state as safetensors (never pickle), so a resumed run continues exactly.

`optimizer.state_dict()` is split into its tensors (safetensors entries) and everything else
(JSON in the file's metadata); floats survive JSON exactly (Python writes the shortest repr
that round-trips), so Prodigy's running d estimates resume bit for bit.
"""

from __future__ import annotations

import json
from typing import Any

import torch

_TENSOR = "__tensor__"


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().cpu()
        return {_TENSOR: prefix}
    if isinstance(value, dict):
        return {str(k): _split(v, f"{prefix}.{k}", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {prefix}")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def optimizer_to_tensors(
    optimizer: torch.optim.Optimizer, prefix: str = "optimizer"
) -> tuple[dict[str, torch.Tensor], str]:
    tensors: dict[str, torch.Tensor] = {}
    structure = _split(optimizer.state_dict(), prefix, tensors)
    return tensors, json.dumps(structure)


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], structure: str) -> None:
    state = _join(json.loads(structure), tensors)
    # JSON turns the per-parameter state keys (ints) into strings; torch expects the ints back.
    state["state"] = {int(k): v for k, v in state["state"].items()}
    for group in state["param_groups"]:
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict(state)
