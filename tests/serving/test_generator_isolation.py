"""One request's failure is its own: the Generator's batch logic in-process (no Ray), on the embedded model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.protocol import ImageRequest, ImageResult, RequestError


@pytest.fixture(scope="module")
def generator():
    from serving.config import build_config
    from serving.generator import Generator

    return Generator(build_config({"max_batch_size": 8, "torch_threads": 2}, environ={}).to_args())


def _requests(generator, poisoned: ImageRequest | None = None) -> list[ImageRequest]:
    settings = generator.pipe.default_settings(steps=2)
    users = [*generator.pipe.user_ids[:6], None]
    out = [ImageRequest(f"a red circle {i}", 10 + i, settings, user=u) for i, u in enumerate(users)]
    if poisoned is not None:
        out.insert(3, poisoned)
    return out


def _alone(generator, request: ImageRequest) -> np.ndarray:
    (result,) = generator._run_batch([request])
    assert isinstance(result, ImageResult)
    return result.image


def test_a_prompt_that_fails_only_at_encoding_fails_alone(generator):
    settings = generator.pipe.default_settings(steps=2)
    poisoned = ImageRequest("a \ud800 surrogate", 3, settings)  # the ingress refuses it; here it reaches the model
    requests = _requests(generator, poisoned)
    results = generator._run_batch(requests)
    assert len(results) == 8
    bad = results[3]
    assert isinstance(bad, RequestError) and bad.status == 400 and bad.field == "prompt"
    served = [(req, res) for req, res in zip(requests, results, strict=True) if req is not poisoned]
    assert all(isinstance(res, ImageResult) for _, res in served)
    for req, res in served:
        assert np.array_equal(res.image, _alone(generator, req)), req.prompt


def test_out_of_memory_for_one_shape_fails_only_that_request(generator, monkeypatch):
    settings = generator.pipe.default_settings(steps=2)
    victim = ImageRequest("a huge request", 666, settings)
    pipeline_type = type(generator.pipe)
    real_call = pipeline_type.__call__
    calls = []

    def call(self, batch, *args, **kwargs):
        calls.append(len(batch.requests))
        if any(r.seed == 666 for r in batch.requests):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_call(self, batch, *args, **kwargs)

    monkeypatch.setattr(pipeline_type, "__call__", call)
    requests = _requests(generator, victim)
    results = generator._run_batch(requests)
    oom = results[3]
    assert isinstance(oom, RequestError) and oom.status == 503 and "out of memory" in oom.message
    assert calls[0] == 8 and 1 in calls  # the whole batch first, then halves down to the victim alone
    monkeypatch.setattr(pipeline_type, "__call__", real_call)
    for req, res in zip(requests, results, strict=True):
        if req is not victim:
            assert isinstance(res, ImageResult) and np.array_equal(res.image, _alone(generator, req))


def test_expired_and_cancelled_requests_never_reach_the_model(generator, monkeypatch):
    settings = generator.pipe.default_settings(steps=2)
    late = ImageRequest("late", 1, settings, deadline=0.0)
    gone = ImageRequest("gone", 2, settings)
    fine = ImageRequest("fine", 3, settings)
    generator._cancelled.add(gone.request_id)
    seen = []
    real_call = type(generator.pipe).__call__
    monkeypatch.setattr(
        type(generator.pipe),
        "__call__",
        lambda self, b, *a, **k: seen.extend(b.requests) or real_call(self, b, *a, **k),
    )
    late_result, gone_result, fine_result = generator._run_batch([late, gone, fine])
    assert isinstance(late_result, RequestError) and late_result.reason == "expired"
    assert isinstance(gone_result, RequestError) and gone_result.reason == "cancelled"
    assert isinstance(fine_result, ImageResult) and [r.prompt for r in seen] == ["fine"]
    assert gone.request_id not in generator._cancelled
