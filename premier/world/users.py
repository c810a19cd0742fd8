"""The world's users, deterministic from a seed: training users, held-out test users, demo users.

Training users (hundreds, 40 to 80 history images each) train stage 1. Test users are
disjoint (their own ids and draws): each has `test_history` history renders (the first k are
used when fitting from k images; the paper's setting is 8) and `test_prompts` test prompts.
Demo users have hand-picked styles that differ in every factor, so the demo shows them apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from premier.errors import InvalidRequestError
from premier.world.render import render_image
from premier.world.spec import ALL_CONTENTS, PROMPTS, Content, Style, random_content, random_style

_TRAIN, _TEST, _DEMO, _NEW = 1, 2, 3, 4  # independent random streams per kind of user


@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    train_users: int = 200
    min_images: int = 40
    max_images: int = 80
    test_users: int = 12
    test_history: int = 32
    test_prompts: int = 20
    demo_images: int = 16

    def check(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or (value < 0 if f.name == "seed" else value <= 0):
                raise InvalidRequestError(
                    f.name, f"must be a {'non-negative' if f.name == 'seed' else 'positive'} integer, got {value!r}"
                )
        if self.min_images > self.max_images:
            raise InvalidRequestError(
                "min_images", f"({self.min_images}) must not exceed max_images ({self.max_images})"
            )
        if self.test_prompts > len(PROMPTS):
            raise InvalidRequestError("test_prompts", f"the world has only {len(PROMPTS)} prompts")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorldUser:
    user_id: str
    style: Style
    history: tuple[tuple[Content, int], ...]  # (content, jitter seed) of each preferred image
    test_prompts: tuple[str, ...] = ()

    def target(self, prompt: str) -> Style:
        """The style this user wants for `prompt`: in v1 always its one style (v2's tastes depend on the prompt)."""
        return self.style

    def history_images(self, n: int | None = None) -> list:
        return [render_image(c, self.style, seed) for c, seed in self.history[:n]]

    def history_items(self, n: int | None = None) -> list[tuple[str, Any, str]]:
        """(file name, image, prompt) triples, the raw dataset format's."""
        return [
            (f"{i:03d}.png", render_image(c, self.style, seed), c.prompt)
            for i, (c, seed) in enumerate(self.history[:n])
        ]


DEMO_STYLES: dict[str, Style] = {
    "alice": Style("checker", "high", "dark", "vivid", "filled"),
    "bob": Style("horizontal stripes", "low", "light", "muted", "outline"),
    "carol": Style("vertical stripes", "high", "sepia", "vivid", "outline"),
    "dave": Style("diagonal stripes", "low", "slate", "muted", "filled"),
}


def _history(rng: np.random.Generator, n: int) -> tuple[tuple[Content, int], ...]:
    return tuple((random_content(rng), int(rng.integers(2**31))) for _ in range(n))


def training_users(cfg: WorldConfig) -> list[WorldUser]:
    users = []
    for i in range(cfg.train_users):
        rng = np.random.default_rng([cfg.seed, _TRAIN, i])
        style = random_style(rng)
        n = int(rng.integers(cfg.min_images, cfg.max_images + 1))
        users.append(WorldUser(f"u{i:04d}", style, _history(rng, n)))
    return users


def held_out_users(cfg: WorldConfig) -> list[WorldUser]:
    users = []
    for i in range(cfg.test_users):
        rng = np.random.default_rng([cfg.seed, _TEST, i])
        style = random_style(rng)
        history = _history(rng, cfg.test_history)
        prompts = tuple(ALL_CONTENTS[j].prompt for j in rng.permutation(len(ALL_CONTENTS))[: cfg.test_prompts])
        users.append(WorldUser(f"test{i:03d}", style, history, prompts))
    return users


def new_users(cfg: WorldConfig, count: int, images: int, seed: int = 0) -> list[WorldUser]:
    """Users the world never showed anyone (not training, test or demo users): what a benchmark uploads as sign-ups."""
    users = []
    for i in range(count):
        rng = np.random.default_rng([cfg.seed, _NEW, seed, i])
        users.append(WorldUser(f"new{seed}-{i:03d}", random_style(rng), _history(rng, images)))
    return users


def demo_users(cfg: WorldConfig) -> list[WorldUser]:
    users = []
    for i, (uid, style) in enumerate(DEMO_STYLES.items()):
        rng = np.random.default_rng([cfg.seed, _DEMO, i])
        users.append(WorldUser(uid, style, _history(rng, cfg.demo_images)))
    return users


def write_training_data(cfg: WorldConfig, root: str | Path) -> Path:
    """The training users' histories in the raw dataset format (`premier data prepare` reads it)."""
    return write_histories(training_users(cfg), root)


def write_histories(users: list, root: str | Path) -> Path:
    """Users' histories (v1 or v2 users) in the raw dataset format: ROOT/<user id>/ images + captions.jsonl."""
    from premier.training.dataset import write_user_folder

    root = Path(root)
    for user in users:
        write_user_folder(root / user.user_id, user.history_items())
    return root
