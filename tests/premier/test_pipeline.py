"""The batched personalized pipeline on the embedded model (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from premier.requests import GenerationRequest as R


@pytest.fixture
def pipe(embedded_pipeline):
    return embedded_pipeline


@pytest.fixture
def strong_adapters(pipe):
    """Make users visibly different on the untrained embedded model; restore afterwards."""
    adapters = pipe.premier.adapters
    saved = {k: v.clone() for k, v in adapters.state_dict().items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for a in (adapters.shared, adapters.distinct):
            a.reset_parameters(0.3)
    yield
    adapters.load_state_dict(saved)


def _diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def test_batched_equals_alone(pipe, strong_adapters):
    settings = pipe.default_settings(steps=4, height=64, width=96)
    requests = [
        R("a red circle in the center", "u0000", 11),
        R("two blue squares", "u0001", 12),
        R("a yellow star", None, 13),
        R("a red circle in the center", "u0002", 11),
        R("green stripes on a black background", pipe.premier.users.get("u0003") * 0.5, 14),
    ]
    batched = pipe(requests, settings, output_type="np")
    for req, res in zip(requests, batched):
        alone = pipe([req], settings, output_type="np")[0]
        assert res.image.shape == (64, 96, 3) and res.image.dtype == np.uint8
        assert _diff(alone.image, res.image) <= 1, req.user_label
    # Different users, same prompt and seed: different images (the deltas reach the output).
    assert _diff(batched[0].image, batched[3].image) > 1  # more than the batching tolerance


def test_user_none_is_plain_flux(pipe):
    """A request without a user equals diffusers' own FluxPipeline with the same seed."""
    settings = pipe.default_settings(steps=3, height=64, width=64, guidance=4.0)
    ours = pipe([R("a red circle", None, 7), R("a blue square", "u0000", 8)], settings, output_type="np")[0].image
    flux = pipe.flux_pipe
    ref = flux(
        prompt="a red circle",
        height=64,
        width=64,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(7),
        max_sequence_length=pipe.profile.max_sequence_length,
        output_type="np",
    ).images[0]
    ref = (ref * 255).round().clip(0, 255).astype(np.uint8)
    assert _diff(ours, ref) <= 1


def test_adapters_run_once_per_request_not_per_step(pipe):
    calls = []
    hooks = [
        a.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        for a in (pipe.premier.adapters.shared, pipe.premier.adapters.distinct)
    ]
    try:
        pipe(
            [R("a", "u0000", 0), R("b", None, 0), R("c", "u0001", 0)],
            pipe.default_settings(steps=6, height=32, width=32),
        )
    finally:
        for h in hooks:
            h.remove()
    assert calls == [2, 2]  # one call per adapter, for the two requests that have a user


def test_text_encodings_are_cached(pipe):
    settings = pipe.default_settings(steps=1, height=32, width=32)
    encoded = []
    hook = pipe.flux_pipe.text_encoder_2.register_forward_hook(lambda m, i, o: encoded.append(i[0].shape[0]))
    try:
        pipe([R("cache me", None, 0), R("cache me", "u0000", 1), R("and me", "u0001", 1)], settings)
        assert encoded == [2]  # two distinct prompts, encoded in one call
        pipe([R("cache me", "u0001", 2), R("and me", None, 3)], settings)
        assert encoded == [2]  # both cached: the encoder does not run again
    finally:
        hook.remove()


def test_seeds_and_timings(pipe):
    settings = pipe.default_settings(steps=2, height=32, width=32)
    a, b, c = pipe([R("x", "u0000", 1), R("x", "u0000", 1), R("x", "u0000", 2)], settings, output_type="np")
    assert np.array_equal(a.image, b.image) and _diff(a.image, c.image) > 0
    for key in ("encode_s", "adapters_s", "denoise_s", "decode_s", "total_s"):
        assert a.timings[key] >= 0
    assert a.timings["batch_size"] == 3


def test_pil_output(pipe):
    res = pipe([R("a red circle", "u0000", 0)], pipe.default_settings(steps=1, height=48, width=80))[0]
    assert res.image.size == (80, 48) and res.image.mode == "RGB"
    assert res.user == "u0000" and res.seed == 0 and res.prompt == "a red circle"


def test_a_prepared_batch_is_validated_once_and_gives_the_same_images(pipe, monkeypatch):
    """Requests prepared one by one and merged (what a server replica does) run as one batch, unvalidated again."""
    from premier.requests import PreparedBatch

    settings = pipe.default_settings(steps=2)
    requests = [R("a red circle in the center", "u0000", 1), R("two blue squares", None, 2)]
    expected = pipe(requests, settings, output_type="np")
    prepared = PreparedBatch.merge([pipe.prepare([r], settings) for r in requests])
    assert [r.prompt for r in prepared.requests] == [r.prompt for r in requests]
    counted = []
    monkeypatch.setattr(type(pipe), "count_tokens", lambda self, p: counted.append(p) or 0)
    monkeypatch.setattr("premier.pipeline.check_prompt_tokens", lambda *a: counted.append(a) or 0)
    got = pipe(prepared, output_type="np")
    assert counted == []  # not tokenized for validation again
    assert all(np.array_equal(a.image, b.image) for a, b in zip(expected, got, strict=True))
    with pytest.raises(ValueError, match="same settings"):
        PreparedBatch.merge([prepared, pipe.prepare(requests[:1], pipe.default_settings(steps=3))])


def test_checked_requests_resolve_only_their_users(pipe):
    """A front end that validated the request already (the server's ingress) skips those checks; users are still checked."""
    from premier.errors import InvalidRequestError

    settings = pipe.default_settings(steps=2)
    batch = pipe.prepare([R("x" * 30_000, None, 0)], settings, checked=True)  # over-long prompt: not checked again
    assert batch.user_tokens == [None]
    with pytest.raises(InvalidRequestError, match="user"):
        pipe.prepare([R("a cat", torch.zeros(2, 2), 0)], settings, checked=True)
    with pytest.raises(InvalidRequestError, match="prompt"):
        pipe.prepare([R("x" * 30_000, None, 0)], settings)
