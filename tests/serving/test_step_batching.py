"""Step-level batching in a generator, in-process (no Ray): exact images whatever joins and leaves around a
request, and failures, cancellations and deadlines that touch only their own request."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch

from serving.protocol import ImageRequest, ImageResult, Progress, RequestError


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """Caps from a committed-style profile (throughput grows up to 8), not a measurement on a busy machine."""
    from premier.step_profile import StepProfile
    from serving.config import build_config
    from serving.generator import Generator

    profile = tmp_path_factory.mktemp("profile") / "steps.json"
    profile.write_text(StepProfile.single(64, {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.4}, 8).to_json())
    args = {"max_batch_size": 8, "torch_threads": 2, "batching": "step", "step_profile": str(profile)}
    g = Generator(build_config(args, environ={}).to_args())
    assert g.stepper is not None and g.step_profile.cap_for(64) == 8
    return g


def _request(generator, seed: int, steps: int, user_index: int | None = 0, guidance: float = 3.5, **kw):
    settings = generator.pipe.default_settings(steps=steps, guidance=guidance)
    user = None if user_index is None else generator.pipe.user_ids[user_index]
    return ImageRequest(f"a shape number {seed}", seed, settings, user=user, received_at=time.time(), **kw)


def _solo(generator, request: ImageRequest) -> np.ndarray:
    from premier.requests import GenerationRequest

    req = GenerationRequest(request.prompt, request.user, request.seed)
    return generator.pipe([req], request.settings, output_type="np")[0].image


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).max() <= 1  # within 1/255


def test_staggered_arrivals_mixed_steps_guidance_and_users_give_solo_images(generator):
    first = [
        _request(generator, 1, 28, 0),
        _request(generator, 2, 2, 1, guidance=1.0),
        _request(generator, 3, 8, None),
        _request(generator, 4, 4, 2, guidance=5.0),
    ]
    second = [_request(generator, 5, 2, 3), _request(generator, 6, 8, 0, guidance=2.0), _request(generator, 7, 4, None)]

    async def main():
        stepper = generator.stepper
        tasks = []
        wave_sent = asyncio.Event()

        def on_progress(step: int, steps: int) -> None:  # the second wave arrives mid-run of the first
            if step == 3 and not wave_sent.is_set():
                wave_sent.set()
                tasks.extend(asyncio.ensure_future(stepper.submit(r)) for r in second)

        tasks.append(asyncio.ensure_future(stepper.submit(first[0], on_progress)))
        tasks.extend(asyncio.ensure_future(stepper.submit(r)) for r in first[1:])
        await wave_sent.wait()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    requests = first[:1] + first[1:] + second
    assert all(isinstance(r, ImageResult) for r in results), results
    log = [entry for r in results for entry in r.step_log]
    assert sum(j for _, j, _ in log) == 7 and sum(v for _, _, v in log) == 7  # every join and leave counted once
    assert max(o for o, _, _ in log) >= 5 and any(j > 0 for _, j, _ in log[1:])  # joined mid-run, shared steps
    assert len(log) == 28  # the 28-step request set the pace: one forward per step
    for req, res in zip(requests, results):
        assert _close(res.image, _solo(generator, req)), req.seed
        assert res.timings["first_step_s"] >= res.timings["queue_wait_s"] >= 0


def test_streaming_progress_then_the_image(generator):
    req = _request(generator, 21, 4, 1)

    async def main():
        return [e async for e in generator.generate_stream(req)]

    events = asyncio.run(main())
    assert [e for e in events if isinstance(e, Progress)] == [Progress(k, 4) for k in (1, 2, 3)]
    assert isinstance(events[-1], ImageResult) and _close(events[-1].image, _solo(generator, req))


def test_a_cancelled_request_frees_its_slot_and_the_others_finish_exactly(generator):
    victim = _request(generator, 31, 28, 0)
    other = _request(generator, 32, 8, 1)

    async def main():
        stepper = generator.stepper
        before = stepper.dropped["cancelled"]
        victim_task = None

        def on_progress(step: int, steps: int) -> None:
            if step == 2:
                victim_task.cancel()  # the client went away mid-generation

        victim_task = asyncio.ensure_future(stepper.submit(victim, on_progress))
        other_task = asyncio.ensure_future(stepper.submit(other))
        result = await other_task
        with pytest.raises(asyncio.CancelledError):
            await victim_task
        return result, stepper.dropped["cancelled"] - before, result.step_log

    result, dropped, log = asyncio.run(main())
    assert dropped == 1 and isinstance(result, ImageResult) and _close(result.image, _solo(generator, other))
    assert len(log) == 8 and log[3][0] == 1  # after the cancellation (at step 2), the other ran alone
    assert len(generator.stepper.scheduler) == 0


def test_a_disconnected_stream_cancels_its_request(generator):
    req = _request(generator, 41, 28, 0)

    async def main():
        stream = generator.generate_stream(req)
        first = await stream.__anext__()
        await stream.aclose()  # the streaming client went away
        for _ in range(100):
            if len(generator.stepper.scheduler) == 0:
                break
            await asyncio.sleep(0.01)
        return first, len(generator.stepper.scheduler)

    first, left = asyncio.run(main())
    assert first == Progress(1, 28) and left == 0


def test_expired_requests_never_reach_the_model_and_bad_ones_fail_alone(generator, monkeypatch):
    engine = generator.stepper.engine
    started = []
    real_start = engine.start
    monkeypatch.setattr(engine, "start", lambda batch: started.append(batch.requests[0].seed) or real_start(batch))
    late = _request(generator, 51, 4, deadline=time.time() - 1)
    poisoned = ImageRequest("a \ud800 surrogate", 52, generator.pipe.default_settings(steps=4))
    fine = [_request(generator, 53, 4, 1), _request(generator, 54, 2, None)]

    async def main():
        return await asyncio.gather(*(generator.stepper.submit(r) for r in [late, poisoned, *fine]))

    results = asyncio.run(main())
    assert isinstance(results[0], RequestError) and results[0].status == 503 and results[0].reason == "expired"
    assert 51 not in started
    assert isinstance(results[1], RequestError) and results[1].status == 400 and results[1].field == "prompt"
    for req, res in zip(fine, results[2:]):
        assert isinstance(res, ImageResult) and _close(res.image, _solo(generator, req))


def test_a_member_whose_forward_raises_fails_alone(generator, monkeypatch):
    engine = generator.stepper.engine
    real_step = engine.step
    calls = []

    def step(states):
        calls.append(len(states))
        if any(s.request.seed == 666 for s in states) and states[0].step >= 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_step(states)

    monkeypatch.setattr(engine, "step", step)
    victim = _request(generator, 666, 4, 2)
    others = [_request(generator, 60 + i, 4, i % 4) for i in range(5)]

    async def main():
        return await asyncio.gather(*(generator.stepper.submit(r) for r in [*others[:2], victim, *others[2:]]))

    results = asyncio.run(main())
    bad = results[2]
    assert isinstance(bad, RequestError) and bad.status == 503 and "out of memory" in bad.message
    assert calls[:2] == [6, 6] and 1 in calls  # whole step first, then halves down to the victim alone
    monkeypatch.setattr(engine, "step", real_step)
    for req, res in zip([*others[:2], *others[2:]], results[:2] + results[3:]):
        assert isinstance(res, ImageResult) and _close(res.image, _solo(generator, req)), req.seed
