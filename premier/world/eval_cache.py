"""What a resumed `premier eval` may reuse: finished rows (`ResultCache`) and runs made with the same settings.

A changed configuration must not reuse a stale run: a run's settings are recorded beside it (`RUN_SETTINGS`) and
compared, not its step count.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from premier.errors import InvalidRequestError
from premier.files import atomic_save_safetensors, read_safetensors
from premier.training.stage1 import flatten_settings

RUN_SETTINGS = "eval-run.json"
"""In WORK/prepared and an eval's ablation runs (WORK/stage1-<variant>): the settings they were made with."""


class ResultCache:
    """Finished rows (scores and images) and fitted users' tokens under WORK/eval-cache/<key>/, so a stopped or
    extended eval (more variants, more history sizes) redoes nothing it already did with the same settings."""

    def __init__(self, folder: Path, settings: dict[str, Any]):
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        self.folder = folder / key

    def get(self, name: str) -> tuple[dict[str, float], np.ndarray] | None:
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        tensors, meta = read_safetensors(path, error=lambda m: InvalidRequestError("eval cache", m))
        return json.loads(meta["row"]), tensors["images"].numpy()

    def put(self, name: str, row: dict[str, float], images: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            {"images": torch.from_numpy(np.ascontiguousarray(images))},
            self.folder / f"{name}.safetensors",
            metadata={"row": json.dumps(row)},
        )

    def get_tensor(self, name: str) -> torch.Tensor | None:
        path = self.folder / f"{name}.safetensors"
        if not path.is_file():
            return None
        tensors, _ = read_safetensors(path, error=lambda m: InvalidRequestError("eval cache", m))
        return tensors["tensor"]

    def put_tensor(self, name: str, tensor: torch.Tensor) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({"tensor": tensor.detach().contiguous()}, self.folder / f"{name}.safetensors")


def check_settings(path: Path, expected: dict[str, Any]) -> None:
    """Refuse to reuse a run whose recorded settings differ from `expected` (or are not recorded), naming them."""
    if not path.is_file():
        raise InvalidRequestError(
            "work", f"{path.parent} has no record of its settings ({path.name}): remove it or use another --work"
        )
    saved, wanted = flatten_settings(json.loads(path.read_text())), flatten_settings(expected)
    differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k)!r} (now {wanted.get(k)!r})" for k in differ[:6])
        raise InvalidRequestError(
            "work", f"{path.parent} was made with other settings: {shown}; remove it or use another --work"
        )
