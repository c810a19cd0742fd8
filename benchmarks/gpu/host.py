"""What the host offers: the GPU (or why there is none), the packages that import, their versions."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import platform
from pathlib import Path
from typing import Any

import torch


def detect_device() -> tuple[torch.device, dict[str, Any]]:
    if torch.cuda.is_available():
        d = torch.device("cuda")
        info = {"type": "cuda", "cuda": True, "name": torch.cuda.get_device_name(d)}
        return d, {**info, "capability": list(torch.cuda.get_device_capability(d)), "no_gpu_reason": None}
    if torch.version.cuda is None:
        reason = f"this torch ({torch.__version__}) is a CPU build"
    else:
        try:
            torch.cuda.init()
            reason = "torch.cuda.is_available() is False"
        except Exception as e:  # e.g. "Found no NVIDIA driver on your system"
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            reason += f" (CUDA_VISIBLE_DEVICES={visible!r})"
    info = {"type": "cpu", "cuda": False, "name": None, "capability": None, "no_gpu_reason": reason}
    return torch.device("cpu"), info


def missing(module: str) -> str | None:
    """Why `module` (and each package above it) cannot be imported here, or None."""
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[: i + 1])
        try:
            importlib.import_module(name)
        except Exception as e:
            return f"{name} is not importable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in ("torch", "triton", "diffusers", "torchao", "transformers", "huggingface_hub", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["torch_cuda"] = torch.version.cuda
    for name in ("diffusers", "torchao"):  # the wheel gpu-run.sh installed, or the host's own copy
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        out[f"{name}_from"] = str(Path(spec.origin).parent.parent) if spec and spec.origin else None
    return out
