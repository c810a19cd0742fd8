"""The per-token modulated transformer against stock diffusers FLUX."""

from __future__ import annotations

import pytest
import torch
from conftest import flux_inputs, tiny_flux, tiny_premier_config

from premier.adapters import PremierAdapters
from premier.transformer import PremierTransformer
from premier.users import UserEmbeddingTable

CONFIGS = [
    dict(),
    dict(num_layers=3, num_single_layers=1, guidance_embeds=False),
    dict(num_layers=1, num_single_layers=3, num_attention_heads=3, attention_head_dim=12, axes_dims_rope=(4, 4, 4)),
]
PREMIER = [dict(), dict(single_blocks=(0, 1)), dict(double_blocks=(1,), single_blocks=(0,))]


def _premier(flux_kwargs, premier_kwargs):
    flux = tiny_flux(**flux_kwargs)
    pk = dict(premier_kwargs)
    pk["single_blocks"] = tuple(i for i in pk.get("single_blocks", ()) if i < flux.config.num_single_layers)
    pk["double_blocks"] = tuple(
        i for i in pk.get("double_blocks", range(flux.config.num_layers)) if i < flux.config.num_layers
    )
    cfg = tiny_premier_config(flux, **pk)
    return flux, cfg, PremierTransformer(flux, cfg)


@pytest.mark.parametrize("flux_kwargs", CONFIGS)
@pytest.mark.parametrize("premier_kwargs", PREMIER)
def test_zero_deltas_equal_stock_flux(flux_kwargs, premier_kwargs):
    flux, cfg, model = _premier(flux_kwargs, premier_kwargs)
    inputs = flux_inputs(flux, batch=3)
    with torch.no_grad():
        stock = flux(**inputs, return_dict=False)[0]
        zeros = torch.zeros(3, cfg.num_modulated_blocks, 7, cfg.inner_dim)
        ours = model(**inputs, text_deltas=zeros)
        plain = model(**inputs, text_deltas=None)
    assert ours.shape == stock.shape
    assert (ours - stock).abs().max().item() <= 1e-5
    assert torch.equal(plain, stock)


@pytest.mark.parametrize("premier_kwargs", PREMIER)
def test_delta_on_one_sample_changes_only_that_sample(premier_kwargs):
    flux, cfg, model = _premier({}, premier_kwargs)
    inputs = flux_inputs(flux, batch=3)
    deltas = torch.zeros(3, cfg.num_modulated_blocks, 7, cfg.inner_dim)
    with torch.no_grad():
        base = model(**inputs, text_deltas=deltas)
        deltas[0] = torch.randn_like(deltas[0])
        moved = model(**inputs, text_deltas=deltas)
    assert (moved[0] - base[0]).abs().max() > 1e-3
    assert (moved[1:] - base[1:]).abs().max().item() <= 1e-6


def test_each_modulated_block_and_token_matters():
    flux, cfg, model = _premier({}, dict(single_blocks=(1,)))
    inputs = flux_inputs(flux, batch=1)
    zeros = torch.zeros(1, cfg.num_modulated_blocks, 7, cfg.inner_dim)
    with torch.no_grad():
        base = model(**inputs, text_deltas=zeros)
        for slot in range(cfg.num_modulated_blocks):
            for token in (0, 6):
                d = zeros.clone()
                d[0, slot, token] = 1.0
                assert (model(**inputs, text_deltas=d) - base).abs().max() > 1e-4, (slot, token)


def test_single_block_text_delta_is_per_token_not_per_sample():
    """A delta that is the same for every token must differ from one on a single token."""
    flux, cfg, model = _premier({}, dict(double_blocks=(), single_blocks=(0, 1)))
    inputs = flux_inputs(flux, batch=1)
    one = torch.zeros(1, cfg.num_modulated_blocks, 7, cfg.inner_dim)
    one[0, :, 3] = 0.5
    every = torch.zeros_like(one)
    every[0, :, :] = 0.5
    with torch.no_grad():
        assert (model(**inputs, text_deltas=one) - model(**inputs, text_deltas=every)).abs().max() > 1e-4


def test_gradients_reach_adapters_and_users_never_flux():
    flux, cfg, model = _premier({}, dict(single_blocks=(0,)))
    adapters = PremierAdapters(cfg)
    users = UserEmbeddingTable(cfg, ["u0", "u1", "u2"])
    inputs = flux_inputs(flux, batch=2)
    user_rows = users(torch.tensor([0, 2]))
    deltas = adapters.text_deltas(inputs["encoder_hidden_states"], user_rows)
    out = model(**inputs, text_deltas=deltas)
    out.pow(2).mean().backward()
    assert all(p.grad is None for p in flux.parameters())
    assert not any(p.requires_grad for p in flux.parameters())
    for name, p in adapters.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sum(p.grad.abs().sum() for p in adapters.parameters()) > 0
    g = users.weight.grad
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    assert torch.equal(g[1], torch.zeros_like(g[1]))  # a user not in the batch gets no gradient


def test_gradient_checkpointing_gives_the_same_gradients():
    flux, cfg, model = _premier({}, dict(single_blocks=(0,)))
    adapters = PremierAdapters(cfg)
    torch.nn.init.normal_(adapters.shared.norm_out_weight, std=0.5)
    users = UserEmbeddingTable(cfg, ["u0", "u1"])
    inputs = flux_inputs(flux, batch=2)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            flux.enable_gradient_checkpointing()
        adapters.zero_grad(set_to_none=True)
        deltas = adapters.text_deltas(inputs["encoder_hidden_states"], users(torch.tensor([0, 1])))
        model(**inputs, text_deltas=deltas).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in adapters.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_wrong_delta_shape_is_refused():
    flux, cfg, model = _premier({}, {})
    inputs = flux_inputs(flux, batch=2)
    with pytest.raises(ValueError, match="text_deltas has shape"):
        model(**inputs, text_deltas=torch.zeros(2, cfg.num_modulated_blocks, 6, cfg.inner_dim))
