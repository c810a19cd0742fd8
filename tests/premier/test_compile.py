"""torch.compile of the Premier transformer: equal to eager, fullgraph, no recompiles across users.

Recompilation is decided by dynamo's guards, before any backend runs, so the recompile tests
use the cheap "eager" backend; one test compiles with inductor end to end.
"""

from __future__ import annotations

import argparse

import pytest
import torch
import torch._dynamo
from conftest import flux_inputs, tiny_flux, tiny_premier_config

import kernels
from premier.adapters import PremierAdapters
from premier.compile import compile_transformer, compiled_graphs, no_recompiles
from premier.transformer import PremierTransformer


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(**premier_kwargs):
    flux = tiny_flux()
    cfg = tiny_premier_config(flux, **premier_kwargs)
    return flux, cfg, PremierTransformer(flux, cfg)


def _deltas(cfg, batch: int, text_len: int, seed: int, scale: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, cfg.num_modulated_blocks, text_len, cfg.inner_dim, generator=g)


def test_inductor_compiled_transformer_equals_eager_through_the_custom_ops():
    """Regional inductor compile, fullgraph, with the kernels as custom operators (the GPU's path)."""
    flux, cfg, model = _model(single_blocks=(1,))
    inputs = flux_inputs(flux, batch=2)
    deltas = _deltas(cfg, 2, 7, seed=0)
    with kernels.use_backend("torch"), torch.no_grad():
        expected = model(**inputs, text_deltas=deltas)  # before compiling: regional compilation is in place
        stock = flux(**inputs, return_dict=False)[0]
        compiled = compile_transformer(model, "regional")
        kernels.reset_kernel_calls()
        before = compiled_graphs()
        out = compiled(**inputs, text_deltas=deltas)
        plain = compiled(**inputs, text_deltas=None)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain, stock, rtol=1e-5, atol=1e-5)
    # The compiled graphs call the operators at run time (they are opaque to inductor).
    assert kernels.kernel_calls()[("adaln_modulate_cat", "torch")] == 1
    # One graph per kind of block: with deltas, modulated double (shared by both blocks), stock
    # single (block 0), modulated single (block 1); without, stock double and stock single again,
    # for block 1's input, which is a strided view of block 0's output (diffusers' slicing).
    assert compiled_graphs() - before == 5


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_changing_users_or_delta_values_never_recompiles(mode):
    flux, cfg, model = _model(single_blocks=(0,))
    adapters = PremierAdapters(cfg).eval()
    model = compile_transformer(model, mode, backend="eager")
    inputs = flux_inputs(flux, batch=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model(**inputs, text_deltas=_deltas(cfg, 3, 7, seed=1))
        graphs = compiled_graphs()
        with no_recompiles():
            for step in range(4):  # a different set of users per batch, and a sample without a user
                users = torch.rand(3, cfg.num_user_tokens, cfg.user_dim, generator=g) * 0.2 - 0.1
                deltas = adapters.text_deltas(inputs["encoder_hidden_states"], users)
                if step % 2:
                    deltas[1] = 0
                model(**inputs, text_deltas=deltas)
                model(**inputs, text_deltas=deltas * 10)
                model(**dict(inputs, timestep=torch.rand(3, generator=g)), text_deltas=deltas)
    assert compiled_graphs() == graphs


def test_at_most_one_compilation_per_bucket():
    """Each new (batch, resolution, text length) bucket compiles once; revisiting any bucket compiles nothing."""
    flux, cfg, model = _model(single_blocks=(1,))
    model = compile_transformer(model, "regional", backend="eager")
    buckets = [(1, 4, 7), (2, 4, 7), (2, 6, 7), (2, 4, 9), (3, 6, 9)]
    kinds = 3  # graphs per bucket: modulated double, modulated single, stock single
    seen = []
    with torch.no_grad():
        for batch, grid, text_len in buckets:
            inputs = flux_inputs(flux, batch=batch, grid=grid, text_len=text_len)
            before = compiled_graphs()
            model(**inputs, text_deltas=_deltas(cfg, batch, text_len, seed=batch))
            assert compiled_graphs() - before <= kinds, (batch, grid, text_len)
            seen.append(compiled_graphs() - before)
            with no_recompiles():
                model(**inputs, text_deltas=_deltas(cfg, batch, text_len, seed=batch + 100))
        with no_recompiles():
            for batch, grid, text_len in buckets:  # every bucket again: all cached
                inputs = flux_inputs(flux, batch=batch, grid=grid, text_len=text_len)
                model(**inputs, text_deltas=_deltas(cfg, batch, text_len, seed=7))
    assert seen[0] == kinds


def test_compiling_twice_is_refused():
    _, _, model = _model()
    compile_transformer(model, "regional", backend="eager")
    with pytest.raises(RuntimeError, match="already compiled"):
        compile_transformer(model, "regional", backend="eager")
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_transformer(_model()[2], "blocks")


def test_compiled_pipeline_matches_eager_and_users_do_not_recompile(embedded_pipeline):
    from premier.pipeline import PremierPipeline
    from premier.requests import GenerationRequest

    settings = embedded_pipeline.default_settings(steps=2, height=64, width=64)
    users = embedded_pipeline.user_ids
    batch1 = [GenerationRequest("a red circle", users[0], 1), GenerationRequest("a blue square", users[1], 2)]
    batch2 = [GenerationRequest("a red circle", users[2], 1), GenerationRequest("a yellow star", None, 3)]
    compiled = PremierPipeline.load(device="cpu", dtype=torch.float32).optimize(compile=True, backend="eager")
    assert compiled.transformer.premier_compiled == "regional"
    first = compiled(batch1, settings, output_type="np")
    graphs = compiled_graphs()
    with no_recompiles():
        second = compiled(batch2, settings, output_type="np")
    assert compiled_graphs() == graphs
    expected = embedded_pipeline(batch1, settings, output_type="np") + embedded_pipeline(
        batch2, settings, output_type="np"
    )
    for got, want in zip(first + second, expected):
        assert abs(got.image.astype(int) - want.image.astype(int)).max() <= 1


def test_cli_passes_compile_and_quantize_through(monkeypatch):
    from premier import commands as cli
    from premier.pipeline import PremierPipeline

    seen = {}
    monkeypatch.setattr(PremierPipeline, "load", classmethod(lambda cls, **kw: seen.update(kw) or "pipe"))
    p = argparse.ArgumentParser()
    cli._add_model_args(p)
    assert cli._load_pipeline(p.parse_args(["--compile", "--quantize", "int8"])) == "pipe"
    assert seen["compile"] == "regional" and seen["quantize"] == "int8"
    cli._load_pipeline(p.parse_args(["--compile", "full"]))
    assert seen["compile"] == "full" and seen["quantize"] is None
    cli._load_pipeline(p.parse_args([]))
    assert seen["compile"] is None
    with pytest.raises(SystemExit):
        p.parse_args(["--quantize", "int4"])
