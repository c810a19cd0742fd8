"""torch.compile for the Premier transformer: regional (per repeated block) or whole-model.

Regional compilation, as diffusers' `compile_repeated_blocks` does it, compiles one graph per
*kind* of block instead of the whole 57-block model, so start-up stays short: every
FluxTransformerBlock shares one graph, as does every FluxSingleTransformerBlock, and the
modulated block forwards of `premier.transformer` (which call the blocks' submodules, not their
`forward`) get one graph each. The stem (embedders, final norm) stays eager.

Users never cause recompilation: their deltas are tensor data. Shapes are static by default
(`dynamic=False`): one compilation per (batch size, resolution, text length) bucket, each with
the best kernels. A batch with no user at all runs stock FLUX blocks (`text_deltas=None`), which
is a separate graph, compiled once. Stock single-stream blocks get two graphs per bucket:
diffusers hands each one the next as strided slices of one tensor, so the first block after
the double-stream stage (contiguous inputs) and the rest (strided) differ in their stride
guards. The recompile limit is raised so that a server's buckets do not exhaust it (dynamo
falls back to eager, silently, when they do).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from premier.transformer import (
    PremierTransformer,
    modulated_double_block_forward,
    modulated_single_block_forward,
)

CompileMode = Literal["regional", "full"]
COMPILE_MODES = ("regional", "full")
RECOMPILE_LIMIT = 64
"""Compiled variants per code object: enough for every bucket a server is configured with."""


def _raise_recompile_limit(limit: int) -> None:
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, limit)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)


def compile_transformer(
    transformer: PremierTransformer,
    mode: CompileMode = "regional",
    *,
    backend: str = "inductor",
    dynamic: bool | None = False,
    options: dict[str, Any] | None = None,
    recompile_limit: int = RECOMPILE_LIMIT,
) -> PremierTransformer | torch.nn.Module:
    """Compile `transformer` with `fullgraph=True` (any graph break is an error, not a slowdown).

    regional: compiles its blocks in place and returns `transformer` itself.
    full: returns `torch.compile(transformer)` (longer start-up; the stem is compiled too).
    Compilation itself happens lazily, at the first forward of each shape bucket.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; expected one of {', '.join(COMPILE_MODES)}")
    if getattr(transformer, "premier_compiled", None):
        raise RuntimeError(f"this transformer is already compiled ({transformer.premier_compiled})")
    _raise_recompile_limit(recompile_limit)
    kwargs: dict[str, Any] = dict(fullgraph=True, backend=backend, dynamic=dynamic)
    if options:
        kwargs["options"] = options
    transformer.premier_compiled = mode
    if mode == "full":
        return torch.compile(transformer, **kwargs)
    compile_flux_blocks(transformer.flux, **kwargs)
    transformer.double_block_forward = torch.compile(modulated_double_block_forward, **kwargs)
    transformer.single_block_forward = torch.compile(modulated_single_block_forward, **kwargs)
    return transformer


def compile_flux_blocks(flux: torch.nn.Module, **compile_kwargs: Any) -> None:
    """Regional compilation of stock FLUX blocks, in place (diffusers' `compile_repeated_blocks`)."""
    _raise_recompile_limit(RECOMPILE_LIMIT)
    flux.compile_repeated_blocks(**compile_kwargs)


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (all functions together)."""
    return int(counters["stats"]["unique_graphs"])


@contextlib.contextmanager
def no_recompiles() -> Iterator[None]:
    """Raise instead of recompiling: a guard failure on an already compiled graph is an error inside."""
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
