"""Premier: personalized preference modulation for FLUX (the method core).

Heavy submodules (diffusers, transformers) are imported lazily so that `premier --help`
and the error types stay cheap to import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PremierConfig": "premier.config",
    "PremierAdapters": "premier.adapters",
    "AdapterOutput": "premier.adapters",
    "UserEmbeddingTable": "premier.users",
    "PremierTransformer": "premier.transformer",
    "PremierModel": "premier.checkpoint",
    "PremierPipeline": "premier.pipeline",
    "GenerationRequest": "premier.requests",
    "GenerationSettings": "premier.requests",
    "GenerationResult": "premier.requests",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'premier' has no attribute {name!r}")
