"""torchao quantization of the FLUX transformer's block linears (the adapters stay in full precision).

Only the Linear layers inside the 57 repeated blocks are quantized: they hold ~99% of the
weights, while the small embedders and the output projection are the most sensitive to
rounding. The per-token AdaLN linears of modulated blocks are in the blocks, so Premier's text
modulation runs on the same quantized weights as FLUX's own.

Modes:
- ``int8``: weight-only int8, per output channel (CPU and GPU); halves the weight memory.
- ``float8``: weight-only float8 (e4m3), per output channel (CPU and GPU).
- ``float8-dynamic``: float8 weights and dynamically quantized float8 activations (per row),
  for float8 tensor cores: needs CUDA compute capability >= 8.9 (H100, L40S, ...).
Quantize before `premier.compile.compile_transformer`, so the compiled graphs see the
quantized weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where used, so the CLI can list the modes without loading it
    import torch
    import torch.nn as nn

QUANTIZE_MODES = ("int8", "float8", "float8-dynamic")


class QuantizationUnavailable(RuntimeError):
    """The requested quantization cannot run on this device."""


def _config(mode: str) -> Any:
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        Int8WeightOnlyConfig,
        PerRow,
    )

    if mode == "int8":
        return Int8WeightOnlyConfig()
    if mode == "float8":
        return Float8WeightOnlyConfig()
    return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())


def check_supported(mode: str, device: torch.device) -> None:
    """Raise QuantizationUnavailable (with the reason) before touching any weight."""
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    if mode == "float8-dynamic":
        if device.type != "cuda":
            raise QuantizationUnavailable(
                "float8-dynamic quantization needs a CUDA GPU with compute capability >= 8.9 (float8 tensor cores); "
                f"this model is on {device.type}. Use --quantize int8 or float8 (weight-only) instead."
            )
        import torch

        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationUnavailable(
                f"float8-dynamic quantization needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} has {cap}"
            )


def _is_block_linear(module: nn.Module, fqn: str) -> bool:
    import torch.nn as nn

    return isinstance(module, nn.Linear) and fqn.startswith(("transformer_blocks.", "single_transformer_blocks."))


def quantize_flux(flux: nn.Module, mode: str) -> int:
    """Quantize the block linears of a diffusers FluxTransformer2DModel in place; returns how many."""
    device = next(flux.parameters()).device
    check_supported(mode, device)
    from torchao.quantization import quantize_

    names = [n for n, m in flux.named_modules() if _is_block_linear(m, n)]
    if not names:
        raise ValueError("no block Linear layers found: is this a FluxTransformer2DModel?")
    quantize_(flux, _config(mode), filter_fn=_is_block_linear, device=device)
    flux.premier_quantized = mode
    return len(names)


def _tensor_bytes(t: torch.Tensor) -> int:
    import torch
    import torch.nn as nn

    if type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()  # a tensor subclass (torchao): count its packed inner tensors
    return sum(_tensor_bytes(getattr(t, n)) for n in names)


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by parameters and buffers, counting quantized tensors by their packed storage."""
    import torch.nn as nn

    return sum(
        _tensor_bytes(t.data if isinstance(t, nn.Parameter) else t) for t in [*module.parameters(), *module.buffers()]
    )
