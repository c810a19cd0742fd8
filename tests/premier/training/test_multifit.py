"""Batched multi-user stage 2 (premier.training.multifit) and its warm start (premier.training.warm_start)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from premier.errors import InvalidRequestError
from premier.models.embedded import build_embedded_flux, build_embedded_premier
from premier.training.config import OptimConfig, Stage2Config
from premier.training.multifit import MultiUserFitter
from premier.training.prepared import Batch
from premier.training.warm_start import warm_start_value

CONFIG = Stage2Config.fast(steps=12, eval_every=3, patience=100, warm_start=2, warm_examples=1)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    pipe = build_embedded_flux()
    premier = build_embedded_premier()
    return pipe, premier, premier.checkpoint_id()


def samples(pipe, n: int, seed: int) -> Batch:
    """n random examples of the embedded model's shapes (the loss needs no real images to be deterministic)."""
    g = torch.Generator().manual_seed(seed)
    c = pipe.transformer.config
    side = 32 // pipe.vae_scale_factor
    return Batch(
        torch.randn(n, c.in_channels // 4, side, side, generator=g),
        torch.randn(n, 16, c.joint_attention_dim, generator=g),
        torch.randn(n, c.pooled_projection_dim, generator=g),
        torch.zeros(n, dtype=torch.long),
    )


def test_a_users_fit_is_the_same_alone_or_with_seven_others_joining_and_leaving(model):
    pipe, premier, ckpt = model
    alone = MultiUserFitter(pipe.transformer, premier, ckpt, CONFIG)
    alone.add("target", samples(pipe, 4, 0), replace(CONFIG, seed=3))
    solo = alone.run()["target"]

    shared = MultiUserFitter(pipe.transformer, premier, ckpt, CONFIG)
    shared.add("target", samples(pipe, 4, 0), replace(CONFIG, seed=3))
    shared.add("other0", samples(pipe, 2, 100), replace(CONFIG, seed=100))
    shared.round()
    shared.round()
    for k in range(1, 7):  # six more join after two rounds, with their own seeds and sizes
        shared.add(f"other{k}", samples(pipe, 1 + k % 5, 100 + k), replace(CONFIG, seed=100 + k, batch_size=1 + k % 3))
    assert len(shared.active) == 8
    shared.round()
    assert shared.remove("other3") and shared.remove("other5")  # two leave mid-way (cancelled)
    results = shared.run()
    together = results["target"]
    assert "other3" not in results and "other5" not in results
    assert together.record.fit["shared_with"] == 7
    assert solo.record.fit["steps"] == together.record.fit["steps"] == CONFIG.steps
    assert torch.allclose(solo.record.vector, together.record.vector, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(solo.record.vector, results["other1"].record.vector, atol=1e-3)
    losses = [h["loss"] for h in solo.history if "loss" in h]
    shared_losses = [h["loss"] for h in together.history if "loss" in h]
    # the batched backward sums in another order (gradients agree to ~1e-5 relative); AdamW's normalised steps
    # carry that into later losses, which stay within fp32 noise of the solo run
    assert losses[:3] == pytest.approx(shared_losses[:3], rel=1e-5)
    assert losses == pytest.approx(shared_losses, rel=2e-3)


def test_fit_stops_on_convergence_without_a_held_out_image_and_reports_progress(model):
    pipe, premier, ckpt = model
    config = Stage2Config.fast(
        steps=400, eval_every=2, patience=2, min_delta=0.5, warm_start=0, optim=OptimConfig("adamw", lr=0.01)
    )
    fitter = MultiUserFitter(pipe.transformer, premier, ckpt, config)
    seen: list[dict] = []
    fitter.add("one", samples(pipe, 1, 7), on_progress=seen.append)
    result = fitter.run()["one"]
    fit = result.record.fit
    assert fit["images"] == 1 and fit["held_out_image"] is None
    assert fit["stopped_early"] and fit["steps"] == 2 * 2 < 400  # min_delta 0.5: no evaluation counts as progress
    assert fit["monitored_loss"] <= fit["initial_monitored_loss"]
    assert [p["step"] for p in seen] == list(range(1, fit["steps"] + 1))
    assert all(p["expected_seconds_left"] >= 0 and p["max_steps"] == 400 for p in seen)
    assert torch.allclose(result.record.vector.sum(), torch.tensor(1.0), atol=0.2)  # from the uniform mix


def test_fitter_refuses_a_second_fit_of_a_user_and_mismatched_settings(model):
    pipe, premier, ckpt = model
    fitter = MultiUserFitter(pipe.transformer, premier, ckpt, CONFIG)
    fitter.add("dup", samples(pipe, 1, 0))
    with pytest.raises(InvalidRequestError, match="already being fitted"):
        fitter.add("dup", samples(pipe, 1, 1))
    with pytest.raises(InvalidRequestError, match="must use its"):
        fitter.add("other", samples(pipe, 1, 1), replace(CONFIG, guidance=3.0))
    with pytest.raises(InvalidRequestError, match="no usable images"):
        fitter.add("empty", samples(pipe, 0, 1))
    assert fitter.active == ["dup"]


class _DistanceObjective:
    """A stand-in for FlowObjective whose loss is the distance of the user tokens to one target embedding."""

    def __init__(self, target: torch.Tensor):
        self.target = target

    def draw(self, latents, generator):
        return torch.zeros(latents.shape[0]), torch.zeros_like(latents)

    def loss(self, latents, text, pooled, tokens, t, noise, reduction="mean"):
        per = (tokens - self.target).pow(2).flatten(1).mean(1)
        return per if reduction == "none" else per.mean()


def test_warm_start_starts_from_the_training_users_that_explain_the_images_best():
    torch.manual_seed(0)
    basis = torch.randn(50, 4, 8)
    objective = _DistanceObjective(basis[17] * 0.9 + basis[31] * 0.1)
    train = Batch(torch.zeros(3, 12, 4, 4), torch.zeros(3, 5, 8), torch.zeros(3, 8), torch.zeros(3, dtype=torch.long))
    value, info = warm_start_value(objective, train, basis, Stage2Config(warm_start=1, warm_examples=3), chunk=7)
    assert info["users"] == [17] and info["scored"] == 50
    assert value.shape == (50,) and value[17] == 1.0 and value.sum() == 1.0
    value, info = warm_start_value(objective, train, basis, Stage2Config(warm_start=2, mode="direct"), chunk=64)
    assert info["users"][0] == 17 and value.shape == (4, 8)
    value, info = warm_start_value(objective, train, basis, Stage2Config(warm_start=1, warm_candidates=10), chunk=64)
    assert info["scored"] == 10 and set(info["users"]) <= set(torch.linspace(0, 49, 10).long().tolist())
    # a target at the centre of the training users: the uniform mix beats any few of them and is kept
    centre = _DistanceObjective(basis.mean(0))
    value, info = warm_start_value(centre, train, basis, Stage2Config(warm_start=3), chunk=64)
    assert info["users"] == [] and torch.allclose(value, torch.full((50,), 1 / 50))
