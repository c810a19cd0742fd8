"""Every kind of bad generation input gets a clear error naming the offending value."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_flux, tiny_premier_config

from premier.checkpoint import PremierModel
from premier.errors import CheckpointError, InvalidRequestError, UnknownUserError
from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest as R
from premier.requests import GenerationSettings as S


@pytest.fixture
def pipe(embedded_pipeline):
    return embedded_pipeline


def _fails(pipe, requests, settings=None, field=None, match=None):
    with pytest.raises(InvalidRequestError, match=match) as info:
        pipe(requests, settings or pipe.default_settings(steps=1, height=32, width=32))
    if field is not None:
        assert info.value.field == field
    return info.value


def test_unknown_user(pipe):
    err = _fails(pipe, [R("a red circle", "mallory", 0)], field="user", match="unknown user 'mallory'")
    assert isinstance(err, UnknownUserError) and "u0000" in str(err)


def test_unknown_user_in_a_batch_names_the_request(pipe):
    _fails(pipe, [R("ok", "u0000", 0), R("ok", "nobody", 0)], field="requests[1].user", match="nobody")


@pytest.mark.parametrize("prompt", ["", "   \n\t"])
def test_empty_prompt(pipe, prompt):
    _fails(pipe, [R(prompt, "u0000", 0)], field="prompt", match="empty")


def test_prompt_not_a_string(pipe):
    _fails(pipe, [R(None, "u0000", 0)], field="prompt", match="must be a string")  # type: ignore[arg-type]


def test_over_long_prompt(pipe):
    limit = pipe.profile.max_sequence_length
    _fails(
        pipe,
        [R("red " * limit, None, 0)],
        field="prompt",
        match=rf"has {limit + 1} tokens; this model accepts at most {limit}",
    )
    _fails(pipe, [R("x" * 30_000, None, 0)], field="prompt", match="characters")
    pipe(
        [R("red " * (limit - 1), None, 0)], pipe.default_settings(steps=1, height=32, width=32)
    )  # exactly at the limit


@pytest.mark.parametrize(
    "settings, field, match",
    [
        (S(height=102, width=128, steps=2, guidance=3.5), "height", "102 is not a multiple of 4"),
        (S(height=128, width=134, steps=2, guidance=3.5), "width", "134 is not a multiple of 4"),
        (S(height=4, width=128, steps=2, guidance=3.5), "height", r"4 is outside \[8, 512\]"),
        (S(height=128, width=1024, steps=2, guidance=3.5), "width", r"1024 is outside \[8, 512\]"),
        (S(height=128, width=128, steps=0, guidance=3.5), "steps", r"0 is outside \[1, 200\]"),
        (S(height=128, width=128, steps=-3, guidance=3.5), "steps", "-3"),
        (S(height=128, width=128, steps=1000, guidance=3.5), "steps", "1000"),
        (S(height=128, width=128, steps=2.5, guidance=3.5), "steps", "must be an integer"),  # type: ignore[arg-type]
        (S(height=128, width=128, steps=2, guidance=-1.0), "guidance", r"-1.0 is outside \[0, 30.0\]"),
        (S(height=128, width=128, steps=2, guidance=float("nan")), "guidance", "nan"),
        (S(height=128, width=128, steps=2, guidance=100.0), "guidance", "100.0"),
        (S(height=True, width=128, steps=2, guidance=3.5), "height", "must be an integer"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings(pipe, settings, field, match):
    _fails(pipe, [R("a red circle", "u0000", 0)], settings, field=field, match=match)


@pytest.mark.parametrize("seed", [-1, 2**63, "7", 1.5])
def test_bad_seed(pipe, seed):
    _fails(pipe, [R("a red circle", "u0000", seed)], field="seed")


@pytest.mark.parametrize("user_id", ["../etc/passwd", "a b", "x" * 300])
def test_bad_user_id(pipe, user_id):
    _fails(pipe, [R("a red circle", user_id, 0)], field="user_id")


def test_non_finite_or_misshaped_embedding(pipe):
    good = pipe.premier.users.get("u0000").clone()
    for bad, match in [
        (good.clone().fill_(float("nan")), "NaN"),
        (torch.where(torch.arange(good.numel()).view_as(good) == 5, torch.inf, good), "infinite"),
        (good[:-1], r"shape \(7, 32\); this checkpoint expects \(8, 32\)"),
    ]:
        _fails(pipe, [R("a red circle", bad, 0)], field="user", match=match)


def test_empty_batch(pipe):
    _fails(pipe, [], field="requests", match="empty")


def test_checkpoint_that_does_not_fit(tmp_path):
    flux = tiny_flux()  # inner dim 32; the embedded model's is 128
    PremierModel(tiny_premier_config(flux), ["u"]).save(tmp_path / "other")
    with pytest.raises(CheckpointError, match="inner_dim 32 != transformer inner dim 128"):
        PremierPipeline.load(checkpoint=tmp_path / "other", device="cpu")


def test_user_without_checkpoint(pipe):
    plain = PremierPipeline(pipe.flux_pipe, None, pipe.profile)
    _fails(plain, [R("a red circle", "u0000", 0)], field="user", match="no Premier checkpoint")
    assert plain([R("a red circle", None, 0)], plain.default_settings(steps=1, height=32, width=32))
