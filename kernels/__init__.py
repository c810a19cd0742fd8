"""Low-level ops for per-token modulation.

This package imports nothing from the project. Each op has a PyTorch reference
implementation; fused Triton versions plug in behind the same functions.
"""

from kernels.modulation import adaln_modulate, gated_residual

__all__ = ["adaln_modulate", "gated_residual"]
