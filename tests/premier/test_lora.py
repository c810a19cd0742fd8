"""premier/lora.py: the per-user LoRA baseline's fit, files, checks and the two ways of serving many LoRA users."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from training_data import PixelEncoder, make_raw_dataset

from premier.compile import compile_flux_blocks, compiled_graphs, no_recompiles
from premier.errors import InvalidRequestError
from premier.lora import (
    LORA_FILE,
    LoraBank,
    LoraSlot,
    fit_lora,
    lora_parameters,
    random_lora_state,
    read_lora,
    save_lora,
    targeted_linears,
)
from premier.models.embedded import build_embedded_flux
from premier.models.loading import profile_for
from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest
from premier.training.config import OptimConfig, Stage2Config
from premier.training.objective import FixedDrawLoss, FlowObjective
from premier.training.prepared import PreparedDataset, prepare_dataset
from premier.transformer import PremierTransformer

CONFIG = Stage2Config(
    steps=30, batch_size=2, eval_every=5, patience=100, early_stop=True, optim=OptimConfig("adamw", lr=1e-2)
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> PreparedDataset:
    root = tmp_path_factory.mktemp("lora-users")
    raw = make_raw_dataset(root / "raw", per_user=6)
    prepare_dataset(raw, root / "prep", PixelEncoder(build_embedded_flux(), 64), shard_size=4)
    return PreparedDataset(root / "prep")


@pytest.fixture(scope="module")
def fitted(dataset):
    """Two users' rank-4 LoRAs, fitted on their images on one transformer."""
    flux = build_embedded_flux().transformer
    before = {k: v.clone() for k, v in flux.state_dict().items()}
    fits = {u: fit_lora(flux, dataset.get(dataset.indices_of(u)), u, 4, CONFIG) for u in dataset.user_ids[:2]}
    return flux, before, fits


def test_a_lora_fit_lowers_the_held_out_loss_and_leaves_the_model_as_it_was(dataset, fitted):
    flux, before, fits = fitted
    after = flux.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(flux, "peft_config", {})  # the adapter left with the fit
    fit = fits[dataset.user_ids[0]]
    assert fit.fit["held_out_loss"] < fit.fit["initial_held_out_loss"]
    assert fit.fit["images"] == 6 and fit.fit["train_images"] == 5 and fit.fit["steps"] == 30
    assert len(fit.state_dict) == 2 * len(list(targeted_linears(flux)))
    assert fit.parameters == lora_parameters(flux, 4) > 0
    assert all(torch.isfinite(v).all() for v in fit.state_dict.values())
    again = fit_lora(flux, dataset.get(dataset.indices_of(dataset.user_ids[0])), dataset.user_ids[0], 4, CONFIG)
    assert all(torch.equal(again.state_dict[k], v) for k, v in fit.state_dict.items())  # deterministic


def test_the_fitted_lora_round_trips_through_diffusers_and_lowers_its_users_loss(dataset, fitted, tmp_path):
    _, _, fits = fitted
    user = dataset.user_ids[0]
    path = save_lora(tmp_path / "u0", fits[user])
    assert path.name == LORA_FILE and path.is_file()
    pipe = build_embedded_flux()
    tensors = read_lora(path, pipe.transformer, 4)
    assert {k.removeprefix("transformer.") for k in tensors} == set(fits[user].state_dict)
    samples = dataset.get(dataset.indices_of(user))
    objective = FlowObjective(PremierTransformer(pipe.transformer, None), None)
    fixed = FixedDrawLoss(objective, samples, 4, seed=3)
    base_loss = fixed(None)
    bank = LoraBank(pipe, 4)
    bank.load(user, path)
    bank.activate(user)
    assert fixed(None) < base_loss
    bank.activate(None)
    assert fixed(None) == pytest.approx(base_loss, rel=1e-6)
    assert bank.resident_bytes() == 4 * fits[user].parameters  # fp32


def test_a_mixed_batch_gives_each_sample_its_own_users_image(dataset, fitted, tmp_path):
    _, _, fits = fitted
    pipe = build_embedded_flux()
    bank = LoraBank(pipe, 4)
    users = dataset.user_ids[:2]
    for u in users:
        bank.load(u, save_lora(tmp_path / u, fits[u]))
    generator = PremierPipeline(pipe, None, profile_for(pipe, embedded=True), None)
    settings = generator.default_settings()
    who = [users[0], users[1], None, users[1]]
    reqs = [GenerationRequest(f"a cat {i}", None, i) for i in range(len(who))]
    with bank.mixed(who):
        mixed = [r.image for r in generator(reqs, settings, output_type="np")]
    for i, u in enumerate(who):
        bank.activate(u)
        (solo,) = generator([reqs[i]], settings, output_type="np")
        np.testing.assert_allclose(mixed[i].astype(float), solo.image.astype(float), atol=1)
    bank.activate(None)
    (base,) = generator([reqs[0]], settings, output_type="np")
    assert not np.array_equal(base.image, mixed[0])  # the LoRA changed the image
    bank.unload(users[0])
    assert list(bank.users) == [users[1]]


def test_a_hot_swapped_slot_on_compiled_blocks_serves_each_user_without_recompiling():
    """diffusers' hotswap is how a compiled transformer serves many LoRA users: swapping is weight data,
    so dynamo's guards hold (the "eager" backend: recompilation is decided before any backend runs)."""
    states = [random_lora_state(build_embedded_flux().transformer, 4, seed=s, scale=0.1) for s in (1, 2)]
    kept = [{k: v.clone() for k, v in state.items()} for state in states]
    reqs = [GenerationRequest("a cat", None, 7)]

    def image(pipe) -> np.ndarray:
        generator = PremierPipeline(pipe, None, profile_for(pipe, embedded=True), None)
        (out,) = generator(reqs, generator.default_settings(), output_type="np")
        return out.image.astype(float)

    plain = build_embedded_flux()  # the reference: each user's adapter loaded on its own, uncompiled
    bank = LoraBank(plain, 4)
    expected = []
    for k, state in enumerate(states):
        bank.load(f"u{k}", state)
        bank.activate(f"u{k}")
        expected.append(image(plain))
    torch._dynamo.reset()
    try:
        pipe = build_embedded_flux()
        slot = LoraSlot(pipe, 4, states[0])
        compile_flux_blocks(pipe.transformer, backend="eager", fullgraph=True)
        first = image(pipe)
        graphs = compiled_graphs()
        assert graphs > 0  # the blocks did compile
        with no_recompiles():
            slot.swap(states[1])
            second = image(pipe)
            slot.swap(states[0])
            again = image(pipe)
        assert compiled_graphs() == graphs
    finally:
        torch._dynamo.reset()
    np.testing.assert_allclose(first, expected[0], atol=1)
    np.testing.assert_allclose(second, expected[1], atol=1)
    np.testing.assert_array_equal(again, first)  # the first user came back whole
    assert np.abs(second - first).max() > 1  # the users' images differ: the swap took effect
    for state, copy in zip(states, kept):  # the caller's tensors are not the slot's: a swap never writes them
        assert all(torch.equal(state[k], copy[k]) for k in copy)


def _good(fits, dataset) -> dict[str, torch.Tensor]:
    return {f"transformer.{k}": v for k, v in fits[dataset.user_ids[0]].state_dict.items()}


@pytest.mark.parametrize(
    "spoil, says",
    [
        (lambda t, k: t.__setitem__(k, torch.full_like(t[k], float("nan"))), "NaN"),
        (lambda t, k: t.__setitem__(k, torch.zeros(8, t[k].shape[1])), "rank 8, not 4"),
        (lambda t, k: t.__setitem__(k, torch.zeros(4, 3 * t[k].shape[1])), "another model's shape"),
        (lambda t, k: t.__setitem__("transformer.blocks.0.ff.net.0.lora_A.weight", torch.zeros(4, 4)), "not a LoRA"),
        (lambda t, k: t.pop(k.replace("lora_A", "lora_B")), "is missing"),
    ],
    ids=["nan", "other-rank", "other-model", "unknown-tensor", "missing-pair"],
)
def test_a_bad_lora_file_is_refused_naming_the_file_and_tensor(dataset, fitted, tmp_path, spoil, says):
    flux, _, fits = fitted
    tensors = _good(fits, dataset)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    spoil(tensors, key)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(InvalidRequestError, match=says) as e:
        read_lora(path, flux, 4)
    assert "bad.safetensors" in str(e.value) and (says == "is missing" or "tensor transformer." in str(e.value))


def test_only_readable_safetensors_lora_files_are_read(dataset, fitted, tmp_path):
    flux, _, fits = fitted
    pickled = tmp_path / "lora.bin"
    torch.save(_good(fits, dataset), pickled)
    with pytest.raises(InvalidRequestError, match="only .safetensors"):
        read_lora(pickled, flux, 4)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidRequestError, match="garbage.safetensors: not a readable safetensors"):
        read_lora(garbage, flux, 4)
    with pytest.raises(InvalidRequestError, match="rank"):
        read_lora(tmp_path / "x.safetensors", flux, 0)
    with pytest.raises(InvalidRequestError, match="rank"):
        LoraBank(build_embedded_flux(), 1000)
