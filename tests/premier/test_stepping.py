"""The step engine: requests of any steps, guidance and users share forwards and still get their solo images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from premier.pipeline import PremierPipeline
from premier.requests import GenerationRequest
from premier.step_profile import StepProfile, image_tokens, measure_step_profile
from premier.stepping import StepEngine


@pytest.fixture(scope="module")
def pipe() -> PremierPipeline:
    return PremierPipeline.load()


def _solo(pipe: PremierPipeline, req: GenerationRequest, steps: int, guidance: float = 3.5) -> np.ndarray:
    settings = pipe.default_settings(steps=steps, guidance=guidance)
    return pipe([req], settings, output_type="np")[0].image


def _start(engine: StepEngine, req: GenerationRequest, steps: int, guidance: float = 3.5):
    pipe = engine.pipe
    return engine.start(pipe.prepare([req], pipe.default_settings(steps=steps, guidance=guidance)))[0]


def test_the_pipeline_equals_stepping_its_batch_by_hand(pipe):
    users = pipe.user_ids
    reqs = [GenerationRequest("a red circle in the center", users[0], 1), GenerationRequest("a blue square", None, 2)]
    settings = pipe.default_settings(steps=3)
    expected = [r.image for r in pipe(reqs, settings, output_type="np")]
    engine = StepEngine(pipe)
    states = engine.start(pipe.prepare(reqs, settings))
    for _ in range(3):
        engine.step(states)
    assert all(s.done for s in states)
    got = engine.finish(states)
    for g, e in zip(got, expected):
        assert np.array_equal(g, e)


@pytest.mark.parametrize("pad_sizes", [None, (1, 2, 4, 8)])
def test_staggered_mixed_requests_get_their_solo_images(pipe, pad_sizes):
    """Arrivals at different steps, 2/4/8/28 steps, two guidance values, different users and none."""
    users = pipe.user_ids
    plan = [  # (arrives before step, steps, guidance, user, seed)
        (0, 8, 3.5, users[0], 11),
        (0, 2, 1.0, users[1], 12),
        (1, 28, 3.5, None, 13),
        (2, 4, 5.0, users[2], 14),
        (3, 2, 3.5, users[0], 15),
        (5, 8, 2.0, users[3], 16),
    ]
    engine = StepEngine(pipe, pad_sizes=pad_sizes, always_deltas=pad_sizes is not None)
    running, done = [], {}
    step = 0
    occupancy = []
    while len(done) < len(plan):
        for arrive, steps, guidance, user, seed in plan:
            if arrive == step:
                req = GenerationRequest(f"a shape {seed}", user, seed)
                running.append((seed, _start(engine, req, steps, guidance)))
        engine.step([s for _, s in running])
        occupancy.append(len(running))
        for seed, s in [x for x in running if x[1].done]:
            done[seed] = engine.finish([s])[0]
        running = [x for x in running if not x[1].done]
        step += 1
    assert max(occupancy) >= 4 and step == 28 + 1  # they really overlapped; the 28-step one ran alone at the end
    for arrive, steps, guidance, user, seed in plan:
        solo = _solo(pipe, GenerationRequest(f"a shape {seed}", user, seed), steps, guidance)
        diff = np.abs(done[seed].astype(int) - solo.astype(int)).max()
        assert diff <= 1, (seed, diff)  # within 1/255


def test_padding_rows_never_leak_into_results(pipe):
    engine = StepEngine(pipe, pad_sizes=(4,))
    assert engine.padded_size(3) == 4 and engine.padded_size(5) == 5
    states = [_start(engine, GenerationRequest("a red circle", None, s), 2) for s in (1, 2, 3)]
    engine.step(states)
    engine.step(states)
    got = engine.finish(states)
    for s, img in zip((1, 2, 3), got):
        assert (
            np.abs(img.astype(int) - _solo(pipe, GenerationRequest("a red circle", None, s), 2).astype(int)).max() <= 1
        )


def test_a_failing_forward_moves_no_state_and_mixed_resolutions_are_refused(pipe):
    engine = StepEngine(pipe)
    s = _start(engine, GenerationRequest("a red circle", None, 1), 2)
    before = s.latents.clone()
    real = pipe.transformer

    class Boom(torch.nn.Module):
        def forward(self, **kwargs):
            raise torch.OutOfMemoryError("injected")

    pipe.transformer = Boom()
    try:
        with pytest.raises(torch.OutOfMemoryError):
            engine.step([s])
    finally:
        pipe.transformer = real
    assert s.step == 0 and torch.equal(s.latents, before)
    big = engine.start(pipe.prepare([GenerationRequest("x", None, 1)], pipe.default_settings(height=64, width=64)))[0]
    with pytest.raises(ValueError, match="one resolution"):
        engine.step([s, big])
    engine.step([s])
    engine.step([s])
    with pytest.raises(ValueError, match="finished"):
        engine.step([s])


def test_measured_profile_gives_caps_per_resolution(pipe):
    engine = StepEngine(pipe)
    profile = measure_step_profile(engine, sizes=(1, 2), max_batch_size=4, repeats=1, resolutions=(16, 32))
    assert set(profile.tables) == {image_tokens(pipe, 16, 16), image_tokens(pipe, 32, 32)} == {16, 64}
    assert all(set(t) == {1, 2} and all(v > 0 for v in t.values()) for t in profile.tables.values())
    assert all(1 <= profile.cap_for(t) <= 4 for t in (16, 64, 144))
    assert StepProfile.from_json(profile.to_json()) == profile


def test_profile_saturation_and_caps():
    # Throughput grows until 4 (1/1, 2/1.2, 4/1.6) then flattens (8/3.1 is < 1.1 x 4/1.6).
    p = StepProfile.single(64, {1: 1.0, 2: 1.2, 4: 1.6, 8: 3.1}, max_batch_size=8)
    assert p.saturation_batch() == 4
    assert p.cap_for(64) == 4 and p.cap_for(16) == 8 and p.cap_for(256) == 1 and p.cap_for(128) == 2
    assert StepProfile.single(64, {1: 1.0, 2: 1.2, 4: 1.6, 8: 3.1}, max_batch_size=2).saturation_batch() == 2
    assert p.step_seconds(64, 3) == 1.6 and p.step_seconds(256, 4) == pytest.approx(3.1 * 16 / 8)
    # A second measured resolution answers for itself and for sizes nearer to it than to the first.
    two = StepProfile({64: {1: 1.0, 2: 1.2, 4: 1.6, 8: 3.1}, 256: {1: 1.0, 2: 1.9}}, max_batch_size=8)
    assert two.cap_for(256) == 1 and two.cap_for(200) == 1 and two.cap_for(64) == 4 and two.nearest(100) == 64
    for bad in ('{"tables": {}}', '{"tables": {"64": {"1": -1}}, "max_batch_size": 8}', "[]", '{"tokens": 64}'):
        with pytest.raises(ValueError):
            StepProfile.from_json(bad)


def test_changing_membership_never_recompiles_once_the_padded_sizes_are_warm():
    """Padded to 1/2/4/8 and always given deltas, the compiled transformer sees four shapes, whoever is in."""
    import torch._dynamo

    from premier.compile import compile_transformer, compiled_graphs, no_recompiles

    torch._dynamo.reset()
    pipe = PremierPipeline.load()
    pipe.transformer = compile_transformer(pipe.transformer, "regional", backend="eager")
    engine = StepEngine(pipe, pad_sizes=(1, 2, 4, 8), always_deltas=True)
    users = pipe.user_ids

    def start(seed: int, steps: int, user):
        return _start(engine, GenerationRequest(f"prompt {seed}", user, seed), steps)

    for n in (1, 2, 4, 8):  # warm-up: one step per padded size
        engine.step([start(100 + i, 4, users[i % 2]) for i in range(n)])
    graphs = compiled_graphs()
    running, seed = [], 0
    with no_recompiles():
        for step in range(20):  # arrivals of 0-3 requests per step, with and without users, of 2-8 steps
            for _ in range(step % 4):
                if len(running) < 8:
                    seed += 1
                    running.append(start(seed, 2 + seed % 7, None if seed % 3 == 0 else users[seed % 4]))
            if running:
                engine.step(running)
            running = [s for s in running if not s.done]
    assert compiled_graphs() == graphs and seed >= 20
    torch._dynamo.reset()


def test_the_packaged_embedded_profile_is_valid():
    from premier.step_profile import EMBEDDED_PROFILE

    p = StepProfile.load(EMBEDDED_PROFILE)
    assert 64 in p.tables and all({1, 2, 4, 8} <= set(t) for t in p.tables.values())
    assert all(1 <= p.cap_for(t) <= p.max_batch_size for t in p.tables)
