"""Preference adapters and the user-embedding table."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flux, tiny_premier_config

from premier.adapters import PremierAdapters
from premier.config import PremierConfig
from premier.errors import CheckpointError, InvalidEmbeddingError, InvalidRequestError, UnknownUserError
from premier.users import UserEmbeddingTable, validate_user_embedding, validate_user_id


@pytest.fixture
def cfg() -> PremierConfig:
    return tiny_premier_config(tiny_flux(), single_blocks=(1,))


def test_output_shapes(cfg):
    adapters = PremierAdapters(cfg)
    text, users = torch.randn(3, 9, cfg.text_dim), torch.randn(3, cfg.num_user_tokens, cfg.user_dim)
    out = adapters(text, users)
    assert out.shared.shape == (3, 9, cfg.inner_dim)
    assert out.distinct.shape == (3, cfg.num_modulated_blocks, 9, cfg.inner_dim) == (3, 3, 9, cfg.inner_dim)
    torch.testing.assert_close(out.combined(), out.shared[:, None] + out.distinct)
    assert len(adapters.shared.blocks) == len(adapters.distinct.blocks) == 3


def test_initialisation_matches_the_method(cfg):
    adapters = PremierAdapters(cfg)
    linears = [m for m in adapters.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    weights = torch.cat([m.weight.flatten() for m in linears] + [adapters.distinct.norm_out_weight.flatten()])
    assert abs(weights.std().item() - cfg.init_std) < 0.1 * cfg.init_std
    assert abs(weights.mean().item()) < 0.05 * cfg.init_std
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
    out = adapters(torch.randn(2, 5, cfg.text_dim), torch.rand(2, cfg.num_user_tokens, cfg.user_dim) * 0.2 - 0.1)
    assert out.combined().abs().max() < 0.1  # deltas start near zero


def test_text_tokens_query_user_tokens(cfg):
    """Each text token gets its own offset, and the offsets depend on the user."""
    adapters = PremierAdapters(cfg)
    torch.nn.init.normal_(adapters.shared.norm_out_weight, std=1.0)
    text = torch.randn(1, 6, cfg.text_dim)
    u1, u2 = torch.randn(2, 1, cfg.num_user_tokens, cfg.user_dim)
    a, b = adapters(text, u1).shared, adapters(text, u2).shared
    assert (a - b).abs().max() > 1e-4
    assert (a[0, 0] - a[0, 1]).abs().max() > 1e-4
    # The number of user tokens is free in the attention; the text length fixes the output length.
    assert adapters(text, u1[:, :2]).shared.shape == (1, 6, cfg.inner_dim)


def test_inactive_rows_are_exactly_zero(cfg):
    adapters = PremierAdapters(cfg)
    deltas = adapters.text_deltas(
        torch.randn(3, 4, cfg.text_dim),
        torch.randn(3, cfg.num_user_tokens, cfg.user_dim),
        active=torch.tensor([True, False, True]),
    )
    assert torch.count_nonzero(deltas[1]) == 0 and torch.count_nonzero(deltas[0]) > 0


def test_reference_defaults():
    cfg = PremierConfig()
    assert (cfg.inner_dim, cfg.text_dim, cfg.num_user_tokens, cfg.user_dim, cfg.adapter_width) == (
        3072,
        4096,
        30,
        1024,
        3072,
    )
    assert cfg.double_blocks == tuple(range(19)) and cfg.single_blocks == ()
    with torch.device("meta"):
        adapters = PremierAdapters(cfg)
    assert adapters.distinct.proj_out.out_features == 19 * 3072


def test_config_json_round_trip_and_errors(tmp_path, cfg):
    cfg.save(tmp_path)
    assert PremierConfig.load(tmp_path) == cfg
    with pytest.raises(CheckpointError, match="divisible"):
        PremierConfig(adapter_width=100, adapter_heads=3)
    with pytest.raises(CheckpointError, match="unknown PremierConfig fields"):
        PremierConfig.from_dict({"bogus": 1})
    with pytest.raises(CheckpointError, match="at least one block"):
        PremierConfig(double_blocks=(), single_blocks=())


def test_user_table_and_materialise(cfg):
    table = UserEmbeddingTable(cfg, ["a", "b", "c"])
    assert table.weight.abs().max() <= cfg.user_init_range
    assert table.weight.shape == (3, cfg.num_user_tokens, cfg.user_dim)
    torch.testing.assert_close(table.materialise(torch.tensor([0.0, 1.0, 0.0])), table.get("b"))
    mix = table.materialise(torch.tensor([[0.5, 0.25, 0.25]]))
    torch.testing.assert_close(mix[0], 0.5 * table.get("a") + 0.25 * table.get("b") + 0.25 * table.get("c"))
    with pytest.raises(UnknownUserError, match="unknown user 'z'"):
        table.get("z")
    with pytest.raises(InvalidEmbeddingError, match="length 2"):
        table.materialise(torch.ones(2))
    with pytest.raises(InvalidEmbeddingError, match="NaN"):
        table.materialise(torch.tensor([float("nan"), 0, 0]))
    with pytest.raises(InvalidRequestError, match="unique"):
        UserEmbeddingTable(cfg, ["a", "a"])


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "a b", "x" * 257, "-lead", "é"])
def test_user_ids_are_validated(bad):
    with pytest.raises(InvalidRequestError):
        validate_user_id(bad)


def test_user_embedding_validation(cfg):
    ok = torch.zeros(cfg.num_user_tokens, cfg.user_dim)
    assert validate_user_embedding(ok, cfg) is ok
    for bad, match in [
        (torch.zeros(cfg.num_user_tokens + 1, cfg.user_dim), "shape"),
        (ok.clone().fill_(float("nan")), "NaN"),
        (ok.clone().index_fill_(0, torch.tensor([0]), float("inf")), "infinite"),
        (ok.long(), "floating"),
    ]:
        with pytest.raises(InvalidEmbeddingError, match=match):
            validate_user_embedding(bad, cfg)
