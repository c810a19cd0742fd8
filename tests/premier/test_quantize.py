"""torchao quantization of the FLUX block linears: runs, stays close, refuses what the device cannot do."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_premier_config

from premier.quantize import QuantizationUnavailable, check_supported, quantize_flux, weight_bytes
from premier.transformer import PremierTransformer

# Relative L2 error of the velocity against the unquantized model (tiny random model, fp32).
MAX_REL_ERROR = {"int8": 0.01, "float8": 0.03}


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", ["int8", "float8"])
def test_quantized_transformer_runs_and_stays_close(mode):
    flux = tiny_flux(num_layers=2, num_single_layers=2, num_attention_heads=4, attention_head_dim=16)
    cfg = tiny_premier_config(flux, single_blocks=(0,))
    inputs = flux_inputs(flux, batch=2)
    deltas = 0.5 * torch.randn(
        2, cfg.num_modulated_blocks, 7, cfg.inner_dim, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ref = PremierTransformer(flux, cfg)(**inputs, text_deltas=deltas)
        ref_plain = flux(**inputs, return_dict=False)[0]
        quantized = copy.deepcopy(flux)
        n = quantize_flux(quantized, mode)
        out = PremierTransformer(quantized, cfg)(**inputs, text_deltas=deltas)
        plain = quantized(**inputs, return_dict=False)[0]
    linears = sum(isinstance(m, torch.nn.Linear) for name, m in flux.named_modules() if "transformer_blocks" in name)
    assert n == linears > 0
    assert torch.isfinite(out).all()
    assert 0 < _relative_error(out, ref) < MAX_REL_ERROR[mode]  # > 0: the weights really changed
    assert 0 < _relative_error(plain, ref_plain) < MAX_REL_ERROR[mode]
    # Users still matter after quantization.
    with torch.no_grad():
        zero = PremierTransformer(quantized, cfg)(**inputs, text_deltas=torch.zeros_like(deltas))
    assert (zero - out).abs().max() > 1e-3


def test_only_block_linears_are_quantized_and_memory_shrinks():
    flux = tiny_flux()
    before = weight_bytes(flux)
    quantized = copy.deepcopy(flux)
    quantize_flux(quantized, "int8")
    assert type(quantized.transformer_blocks[0].attn.to_q.weight) is not type(
        flux.transformer_blocks[0].attn.to_q.weight
    )
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert torch.equal(getattr(quantized, name).weight, getattr(flux, name).weight), name
    assert weight_bytes(quantized) < 0.6 * before
    assert quantized.premier_quantized == "int8"


def test_float8_dynamic_and_unknown_modes_are_refused_clearly():
    flux = tiny_flux()
    with pytest.raises(QuantizationUnavailable, match="needs a CUDA GPU with compute capability >= 8.9"):
        quantize_flux(flux, "float8-dynamic")
    assert type(flux.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter  # nothing was touched
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        check_supported("int4", torch.device("cpu"))


def test_quantized_compiled_pipeline_stays_close(embedded_pipeline):
    from premier.pipeline import PremierPipeline
    from premier.requests import GenerationRequest

    settings = embedded_pipeline.default_settings(steps=2, height=64, width=64)
    users = embedded_pipeline.user_ids
    requests = [GenerationRequest("a red circle", users[0], 1), GenerationRequest("a blue square", users[1], 2)]
    lazy = PremierPipeline.load(device="cpu", dtype=torch.float32, quantize="float8", compile="full")
    assert lazy.flux_pipe.transformer.premier_quantized == "float8" and lazy.transformer.premier_compiled == "full"
    torch._dynamo.reset()
    # Inductor on a 2-core CPU takes minutes for this; dynamo + AOTAutograd exercise the same tracing.
    pipe = PremierPipeline.load(device="cpu", dtype=torch.float32, quantize="int8").optimize(
        compile=True, backend="aot_eager"
    )
    assert pipe.flux_pipe.transformer.premier_quantized == "int8" and pipe.transformer.premier_compiled == "regional"
    got = pipe(requests, settings, output_type="np")
    want = embedded_pipeline(requests, settings, output_type="np")
    for g, w in zip(got, want):
        diff = abs(g.image.astype(int) - w.image.astype(int))
        assert diff.mean() < 2.0 and diff.max() <= 24
