"""Premier checkpoint folders: round trip, content id, and refusing what does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_flux, tiny_premier_config
from safetensors.torch import load_file, save_file

from premier.checkpoint import ADAPTERS_FILE, USERS_FILE, PremierModel
from premier.config import CONFIG_NAME
from premier.errors import CheckpointError
from premier.transformer import PremierTransformer


@pytest.fixture
def model() -> PremierModel:
    torch.manual_seed(0)
    return PremierModel(tiny_premier_config(tiny_flux()), ["ann", "ben", "cy"])


def test_round_trip(tmp_path, model):
    ckpt_id = model.save(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([CONFIG_NAME, ADAPTERS_FILE, USERS_FILE])
    loaded, loaded_id = PremierModel.load(tmp_path / "ckpt")
    assert loaded_id == ckpt_id == model.checkpoint_id()
    assert loaded.config == model.config and loaded.users.user_ids == ["ann", "ben", "cy"]
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    # Saving over an existing checkpoint replaces it whole.
    with torch.no_grad():
        model.users.weight[0] += 1
    new_id = model.save(tmp_path / "ckpt")
    assert new_id != ckpt_id and PremierModel.load(tmp_path / "ckpt")[1] == new_id
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_content_id_names_content(model):
    a = model.checkpoint_id()
    assert a == model.checkpoint_id() and len(a) == 64
    with torch.no_grad():
        model.adapters.shared.proj_out.bias[0] = 1e-3
    assert model.checkpoint_id() != a


def test_corrupt_tensor_is_detected(tmp_path, model):
    model.save(tmp_path / "c")
    path = tmp_path / "c" / ADAPTERS_FILE
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(path))
    state["shared.proj_out.bias"][0] += 1.0
    save_file(state, str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="corrupt"):
        PremierModel.load(tmp_path / "c")


def test_truncated_file_is_refused(tmp_path, model):
    model.save(tmp_path / "c")
    path = tmp_path / "c" / USERS_FILE
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="unreadable"):
        PremierModel.load(tmp_path / "c")


def test_missing_pieces_are_named(tmp_path, model):
    with pytest.raises(CheckpointError, match="does not exist"):
        PremierModel.load(tmp_path / "nope")
    model.save(tmp_path / "c")
    (tmp_path / "c" / ADAPTERS_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"missing {ADAPTERS_FILE}"):
        PremierModel.load(tmp_path / "c")
    (tmp_path / "c" / CONFIG_NAME).unlink()
    with pytest.raises(CheckpointError, match=CONFIG_NAME):
        PremierModel.load(tmp_path / "c")


def test_config_and_tensors_must_agree(tmp_path, model):
    model.save(tmp_path / "c")
    cfg_path = tmp_path / "c" / CONFIG_NAME
    cfg = json.loads(cfg_path.read_text())
    cfg["adapter_width"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError, match=r"attn.to_k.weight: checkpoint \(32, 32\) vs config \(64, 64\).*\(118 problems\)"
    ):
        PremierModel.load(tmp_path / "c")


def test_checkpoint_that_does_not_fit_the_model(model):
    other = tiny_flux(num_attention_heads=3)  # inner dim 48, not 32
    with pytest.raises(CheckpointError, match="inner_dim 32 != transformer inner dim 48"):
        PremierTransformer(other, model.config)
    fewer_blocks = tiny_flux(num_layers=1)
    with pytest.raises(CheckpointError, match=r"double_blocks \[1\] out of range"):
        PremierTransformer(fewer_blocks, model.config)
