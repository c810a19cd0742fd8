"""The shipped world model as the embedded default: it follows prompts, and its demo users differ."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from premier.models.embedded import ASSETS, DEMO_USERS, build_embedded_premier, embedded_demo_records
from premier.requests import GenerationRequest as R
from premier.world.spec import ALL_CONTENTS, content_of

pytestmark = pytest.mark.skipif(not (ASSETS / "premier").is_dir(), reason="the world's shipped files are not built")

PROMPTS = [ALL_CONTENTS[i].prompt for i in (0, 13, 26, 39, 47, 58)]


def test_demo_records_are_fitted_users_of_the_shipped_checkpoint():
    premier = build_embedded_premier()
    records = embedded_demo_records()
    assert [r.user_id for r in records] == list(DEMO_USERS)
    for r in records:
        assert r.mode == "coefficients" and r.checkpoint_id == premier.checkpoint_id()
        assert r.vector.shape == (len(premier.users),)
        assert r.fit["images"] == 16 and "style" in r.fit
    # Distinct users get distinct embeddings.
    embs = torch.stack([r.materialise(premier.users, premier.checkpoint_id()) for r in records])
    assert torch.cdist(embs.flatten(1), embs.flatten(1)).fill_diagonal_(1e9).min() > 0


@pytest.fixture(scope="module")
def generated(embedded_pipeline):
    """Every demo user and the base model (no user) on the same prompts and seeds, as `premier demo` makes them."""
    premier = embedded_pipeline.premier
    tokens = {r.user_id: r.materialise(premier.users, embedded_pipeline.checkpoint_id) for r in embedded_demo_records()}
    users = [*DEMO_USERS, None]
    requests = [R(p, tokens[u] if u else None, 100 + i) for u in users for i, p in enumerate(PROMPTS)]
    out = embedded_pipeline(requests, embedded_pipeline.default_settings(), output_type="np")
    images = np.stack([o.image for o in out]).reshape(len(users), len(PROMPTS), 32, 32, 3)
    return dict(zip([u or "base" for u in users], images))


@pytest.fixture(scope="module")
def probe():
    from premier.world.probe import WorldProbe

    return WorldProbe.load(ASSETS / "probe")


def test_the_shipped_model_follows_prompts(generated, probe):
    """Well above chance without a user; above chance with each demo user (users cost prompt
    following in the shipped model: docs/eval.md)."""
    contents = [content_of(p) for p in PROMPTS]
    chance = np.mean([1 / 3, 1 / 4, 1 / 5])
    for name, images in generated.items():
        margin = 0.2 if name == "base" else 0.05
        assert float(probe.text_consistency(images, contents).mean()) > chance + margin, name


def test_demo_users_change_the_images(generated):
    """Each demo user's images differ from the others' and from the base model's on the same prompts and seeds.

    Not asserted: that each demo user's images are closer to that user's style than the base
    model's. The shipped model does not do that yet (docs/eval.md measures it), and a test must
    only assert what is robustly true.
    """
    names = list(generated)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            diff = np.abs(generated[a].astype(int) - generated[b].astype(int)).mean()
            assert diff > 1.0, (a, b, diff)
