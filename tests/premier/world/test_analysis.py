"""The eval's extra readings (premier/world/analysis.py) on a probe whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from premier.world.analysis import distinct_seeds, distinguishability, factor_means


class User:
    def __init__(self, index: int):
        self.index = index

    def target(self, prompt: str) -> int:
        return self.index + (10 if prompt == "shifted" else 0)  # prompt-dependent taste, as in world v2


class ExactProbe:
    """Images are one number: the taste they show. Alignment 1 for the exact taste, else 0."""

    def preference_alignment(self, images: np.ndarray, targets: list[int]) -> torch.Tensor:
        return torch.tensor((images[:, 0] == np.asarray(targets)).astype(np.float32))

    def factor_alignment(self, images: np.ndarray, targets: list[int]) -> dict[str, torch.Tensor]:
        hit = self.preference_alignment(images, targets)
        return {"hue": hit, "angle": 1 - hit}

    def distance(self, images: np.ndarray, references: np.ndarray) -> torch.Tensor:
        return torch.tensor(np.abs(images[:, 0] - references[:, 0]).astype(np.float32))


USERS = [User(i) for i in range(4)]
PROMPTS = ["plain", "shifted"]


def images_for(taste) -> np.ndarray:
    """One image per (user, prompt), user-major, as the eval orders them."""
    return np.array([[taste(u, p)] for u in USERS for p in PROMPTS], dtype=np.float64)


def test_images_that_show_their_users_taste_are_told_apart():
    got = distinguishability(ExactProbe(), images_for(lambda u, p: u.target(p)), USERS, PROMPTS)
    assert got["accuracy"] == 1.0 and got["chance"] == 0.25 and got["per_user"] == [1.0] * 4
    assert got["users"] == 4 and got["prompts"] == 2 and got["diversity"] > 0


def test_identical_images_score_exactly_chance_and_no_diversity():
    """The base model (no user) gives every user the same image: every taste ties, the credit is split."""
    got = distinguishability(ExactProbe(), images_for(lambda u, p: 0.0), USERS, PROMPTS)
    assert got["accuracy"] == pytest.approx(0.25) and got["diversity"] == 0.0


def test_a_model_that_ignores_the_prompt_dependent_part_is_credited_only_where_it_matches():
    """Users' images show their 'plain' taste for both prompts: right for one prompt, a tie-free miss for the
    other (no user's shifted taste matches), so every taste ties there and each image gets a quarter."""
    got = distinguishability(ExactProbe(), images_for(lambda u, p: u.target("plain")), USERS, PROMPTS)
    assert got["accuracy"] == pytest.approx((1.0 + 0.25) / 2)
    shifted = np.array([[(u.index + 1) % 4] for u in USERS], dtype=np.float64)
    swapped = distinguishability(ExactProbe(), shifted, USERS, ["plain"])
    assert swapped["accuracy"] == 0.0  # each image shows another user's taste


def test_bad_shapes_and_the_other_readings():
    with pytest.raises(ValueError, match="7 images for 4 users x 2 prompts"):
        distinguishability(ExactProbe(), np.zeros((7, 1)), USERS, PROMPTS)
    imgs = images_for(lambda u, p: u.target(p))
    targets = [u.target(p) for u in USERS for p in PROMPTS]
    assert factor_means(ExactProbe(), imgs, targets) == {"hue": 1.0, "angle": 0.0}
    assert distinct_seeds(3, 3) == [50_003, 50_004, 50_005]  # one per prompt, shared by the users
