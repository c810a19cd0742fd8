"""Quieter third-party libraries for the command line and the serving replicas."""

from __future__ import annotations

import logging
import os


def quiet_libraries() -> None:
    """Silence the libraries' import-time warnings and progress bars and keep Hugging Face offline.

    Imports diffusers and transformers (call it where they are about to be used anyway).
    """
    # diffusers imports torchao when it is installed; on CPU-only torch builds torchao logs a warning
    # for each CUDA extension it cannot load, and torch warns about torchao's pytree registrations.
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


__all__ = ["quiet_libraries"]
