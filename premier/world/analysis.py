"""Two readings of an eval's images beyond mean alignment.

- **Alignment per style factor**: which parts of a user's taste a model gets right (hue, stripe
  angle, line width...), so a gain can be attributed (the mean hides a palette-only model).
- **User distinguishability** (the paper's Fig. 8): for the same prompt and seed, can a probe tell
  which user an image was made for? Each image is scored against every user's taste for that prompt
  and credited to the best-aligned user (ties split, so identical images score exactly chance).
  Accuracy over users, with chance 1/users; the mean probe-feature distance between different
  users' images is the diversity the paper's figure shows. Dispersion is meant to raise both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

DISTINCT_SEED = 50_000
"""Added to the eval's seed for the distinguishability images: one seed per prompt, the same for every user."""


class Probe(Protocol):
    def preference_alignment(self, images: np.ndarray, targets: list) -> torch.Tensor: ...
    def factor_alignment(self, images: np.ndarray, targets: list) -> dict[str, torch.Tensor]: ...
    def distance(self, images: np.ndarray, references: np.ndarray) -> torch.Tensor: ...


def factor_means(probe: Probe, images: np.ndarray, targets: list) -> dict[str, float]:
    """Mean alignment of each style factor over the images (each against its own target)."""
    return {name: round(float(v.mean()), 5) for name, v in probe.factor_alignment(images, targets).items()}


def distinct_seeds(seed: int, prompts: int) -> list[int]:
    return [seed + DISTINCT_SEED + i for i in range(prompts)]


def distinguishability(probe: Probe, images: np.ndarray, users: list[Any], prompts: list[str]) -> dict[str, Any]:
    """`images`: one per (user, prompt), user-major, prompt `i` generated with `distinct_seeds(...)[i]` for
    every user. Returns accuracy (ties split), its chance level, per-user accuracy and the diversity."""
    n_users, n_prompts = len(users), len(prompts)
    if images.shape[0] != n_users * n_prompts:
        raise ValueError(f"{images.shape[0]} images for {n_users} users x {n_prompts} prompts")
    credit = np.zeros((n_users, n_prompts))
    spread = []
    for p, prompt in enumerate(prompts):
        same_prompt = images[[u * n_prompts + p for u in range(n_users)]]
        scores = np.stack(  # scores[i, j]: image made for user i against user j's taste for this prompt
            [probe.preference_alignment(same_prompt, [user.target(prompt)] * n_users).numpy() for user in users],
            axis=1,
        )
        best = np.isclose(scores, scores.max(1, keepdims=True), rtol=0, atol=1e-6)
        credit[:, p] = best[np.arange(n_users), np.arange(n_users)] / best.sum(1)
        for i in range(n_users - 1):
            others = same_prompt[i + 1 :]
            spread += probe.distance(np.repeat(same_prompt[i : i + 1], len(others), 0), others).tolist()
    per_user = credit.mean(1)
    return {
        "accuracy": round(float(per_user.mean()), 5),
        "chance": round(1.0 / n_users, 5),
        "diversity": round(float(np.mean(spread)), 5) if spread else 0.0,
        "users": n_users,
        "prompts": n_prompts,
        "per_user": [round(float(a), 5) for a in per_user],
    }


def distinct_row(ev: Any, key: str, model: Callable[[], tuple[Any, str]] | None) -> dict[str, Any] | None:
    """Fig. 8's reading for one row of an `Evaluator` run: "ground_truth" (each taste rendered), "base" (no user:
    every user gets the same image, so exactly chance) or a variant (`model` loads it; its users are fitted as for
    the table, and those fits are reused). None with fewer than 2 test users."""
    from premier.world.spec import content_of

    cfg = ev.config
    users = ev.users[: min(cfg.distinct_users, len(ev.users))]
    if len(users) < 2:
        return None
    prompts = list(users[0].test_prompts[: cfg.distinct_prompts])
    if key == "ground_truth":
        images = np.stack(
            [ev.world_ops.render(content_of(p), u.target(p), jitter=False) for u in users for p in prompts]
        )
    else:

        def compute() -> tuple[dict[str, float], np.ndarray]:
            premier = ckpt = tokens = None
            if model is not None:
                premier, ckpt = model()
                fitted = ev.fit_users(premier, ckpt, users, cfg.history, "coefficients", keep=key)
                tokens = dict(zip([u.user_id for u in users], fitted))
            seeds = distinct_seeds(cfg.seed, len(prompts))
            return {}, ev.generate(premier, ckpt, tokens, users, prompts, seeds)

        _, images = ev.cached(f"distinct-{key}-u{len(users)}p{len(prompts)}", compute)
    return distinguishability(ev.probe, images, users, prompts)


__all__ = ["DISTINCT_SEED", "distinct_row", "distinct_seeds", "distinguishability", "factor_means"]
