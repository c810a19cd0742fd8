"""Low-level ops for per-token modulation: fused Triton kernels with a PyTorch reference and CPU fallback.

This package imports nothing from the project (and not triton, until a fused kernel first runs).
See `kernels.modulation` for how an implementation is chosen per call.
"""

from kernels.modulation import (
    POLICIES,
    adaln_modulate,
    adaln_modulate_cat,
    adaln_modulate_reference,
    backend_for,
    fused_unsupported,
    gated_residual,
    gated_residual_reference,
    get_backend,
    kernel_calls,
    reset_kernel_calls,
    set_backend,
    use_backend,
)

__all__ = [
    "POLICIES",
    "adaln_modulate",
    "adaln_modulate_cat",
    "adaln_modulate_reference",
    "backend_for",
    "fused_unsupported",
    "gated_residual",
    "gated_residual_reference",
    "get_backend",
    "kernel_calls",
    "reset_kernel_calls",
    "set_backend",
    "use_backend",
]
