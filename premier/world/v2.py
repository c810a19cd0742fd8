"""World v2: tastes that are distributions over continuous style factors, hard enough to test the paper's claims.

World v1 (spec.py, users.py) has 128 discrete styles that every image shows whole; most test users have
an exact twin among the training users, so one image identifies a user and flow matching alone separates
users. Here, deterministically from a seed:

- **continuous factors** (`Style2`: background hue, lightness and contrast, stripe angle and period,
  shape saturation and line width), each in [0, 1] (hue and angle circular). A user's taste is drawn
  from a low-dimensional population latent: `u = W z + e` with z ~ N(0, I_latent_dim) and a small
  idiosyncratic e, each factor the normal CDF of its u_j (so every factor is uniform over the
  population). No test user equals a training user, and `outside` test users have a large e: off the
  latent plane the training users span;
- **tastes are distributions**: each history image samples its style around the user's taste
  (`spread`), and an `off_taste` share of them are in another user's style altogether;
- **prompt-dependent taste**: a user's hue and stripe angle shift with the prompt's shape
  (`prompt_shift`), so the target style depends on (prompt, user);
- **a spurious prompt-user link**: each user's history comes from its own `prompt_subset` prompts;
  test prompts lie outside it (the "adapter overfits to text tokens" failure dispersion targets);
- **weak per-image signal**: 5-15 history images per training user; 32 held-out test users.

Prompts (content) are v1's: 60 of them, a coloured shape at a position. The probe is probe_v2.py.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

from premier.errors import InvalidRequestError
from premier.world.render import shape_mask
from premier.world.spec import ALL_CONTENTS, COLOURS, IMAGE_SIZE, POSITIONS, SHAPES, Content

_TRAIN, _TEST, _DEMO, _NEW, _POP, _PROBE = 1, 2, 3, 4, 5, 6  # independent random streams
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5
_GREY = np.array([128.0, 128.0, 128.0])


@dataclass(frozen=True)
class Style2:
    """One image's style: seven continuous factors in [0, 1]."""

    hue: float  # background hue (circular)
    lightness: float  # background lightness: dark .. light
    contrast: float  # between the two background tones
    angle: float  # stripe angle / pi (circular): 0 horizontal, 0.5 vertical
    period: float  # stripe period: 4 .. 14 px
    saturation: float  # of the shape's colour: mostly grey .. vivid
    line: float  # the shape's line width: a thin outline .. filled

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, f) for f in FACTORS])

    @classmethod
    def of(cls, values: Any) -> Style2:
        v = [float(x) for x in values]
        return cls(*(x % 1.0 if f in CIRCULAR else min(1.0, max(0.0, x)) for f, x in zip(FACTORS, v)))

    def describe(self) -> str:
        return " ".join(f"{f}={getattr(self, f):.2f}" for f in FACTORS)


FACTORS: tuple[str, ...] = tuple(f.name for f in fields(Style2))
CIRCULAR = frozenset({"hue", "angle"})
SHIFTED = ("hue", "angle")  # the factors a user's taste shifts by the prompt's shape


def factor_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| per factor (..., 7), the circular ones the short way round (at most 0.5)."""
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    circ = np.array([f in CIRCULAR for f in FACTORS])
    return np.where(circ, np.minimum(d, 1.0 - d), d)


@dataclass(frozen=True)
class WorldV2Config:
    seed: int = 0
    train_users: int = 600
    min_images: int = 5
    max_images: int = 15
    test_users: int = 32
    test_history: int = 32
    test_prompts: int = 20
    demo_images: int = 16
    latent_dim: int = 3  # dimensions of the population latent (at most the 7 factors)
    idiosyncrasy: float = 0.2  # std of a user's own factor noise e (the latent part has variance 1 - this^2)
    outside_idiosyncrasy: float = 0.9  # the same for the `outside` test users: off the latent plane
    outside_share: float = 0.25  # of the test users
    spread: float = 0.06  # std of an image's style around its user's taste, per factor
    off_taste: float = 0.15  # share of history images in another user's style
    prompt_shift: float = 0.12  # std of a user's per-shape shift of hue and stripe angle
    prompt_subset: int = 12  # prompts each user's history comes from (of the world's 60)
    version: str = "v2"

    def check(self) -> None:
        ints = ("train_users", "min_images", "max_images", "test_users", "test_history", "test_prompts")
        for name in (*ints, "demo_images", "latent_dim", "prompt_subset"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidRequestError(name, f"must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InvalidRequestError("seed", f"must be a non-negative integer, got {self.seed!r}")
        if self.min_images > self.max_images:
            raise InvalidRequestError(
                "min_images", f"({self.min_images}) must not exceed max_images ({self.max_images})"
            )
        if self.latent_dim > len(FACTORS):
            raise InvalidRequestError(
                "latent_dim", f"({self.latent_dim}) must not exceed the number of style factors ({len(FACTORS)})"
            )
        if self.prompt_subset > len(ALL_CONTENTS) - self.test_prompts:
            raise InvalidRequestError(
                "prompt_subset",
                f"({self.prompt_subset}) leaves fewer than test_prompts ({self.test_prompts}) of the world's "
                f"{len(ALL_CONTENTS)} prompts outside a user's history prompts",
            )
        for name in ("idiosyncrasy", "outside_idiosyncrasy"):
            if not 0 <= getattr(self, name) < 1:
                raise InvalidRequestError(name, f"must be in [0, 1), got {getattr(self, name)!r}")
        for name in ("outside_share", "off_taste"):
            if not 0 <= getattr(self, name) <= 1:
                raise InvalidRequestError(name, f"must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("spread", "prompt_shift"):
            if not 0 <= getattr(self, name) <= 0.5:
                raise InvalidRequestError(name, f"must be in [0, 0.5], got {getattr(self, name)!r}")
        if self.version != "v2":
            raise InvalidRequestError("version", f"a WorldV2Config is version 'v2', got {self.version!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Taste:
    """A user's preference: a style per shape (the prompt-dependent part) and how images scatter around it."""

    base: Style2
    shifts: tuple[tuple[float, float], ...]  # per shape in SHAPES order: (hue, angle) shift

    def target(self, content: Content) -> Style2:
        """The style this user wants for this prompt (what the metrics compare against)."""
        dh, da = self.shifts[SHAPES.index(content.shape)]
        return Style2.of([*(self.base.vector() + np.array([dh, 0, 0, da, 0, 0, 0]))])

    def describe(self) -> str:
        return self.base.describe()


@dataclass(frozen=True)
class WorldUser2:
    """A v2 user. `history`: (content, jitter seed, that image's style) per preferred image."""

    user_id: str
    taste: Taste
    history: tuple[tuple[Content, int, Style2], ...]
    prompts: tuple[str, ...]  # the prompts its history comes from
    test_prompts: tuple[str, ...] = ()
    outside: bool = False  # drawn off the training users' latent plane (test users only)

    @property
    def style(self) -> Taste:
        return self.taste

    def target(self, prompt: str) -> Style2:
        from premier.world.spec import content_of

        return self.taste.target(content_of(prompt))

    def history_images(self, n: int | None = None) -> list[Image.Image]:
        return [render_image(c, s, seed) for c, seed, s in self.history[:n]]

    def history_items(self, n: int | None = None) -> list[tuple[str, Image.Image, str]]:
        """(file name, image, prompt) triples, the raw dataset format's."""
        return [(f"{i:03d}.png", render_image(c, s, seed), c.prompt) for i, (c, seed, s) in enumerate(self.history[:n])]


# ----------------------------------------------------------------------------- rendering
def _tone(hue: float, lightness: float) -> np.ndarray:
    """A low-saturation background tone: never read as one of the shapes' colours."""
    return 255.0 * np.array(colorsys.hls_to_rgb(hue, min(0.95, max(0.05, lightness)), 0.3))


def render(content: Content, style: Style2, seed: int | None = 0, jitter: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 of a prompt in a style; `jitter=False`: the canonical render the metrics compare to."""
    rng = np.random.default_rng(seed)
    period = 4.0 + 10.0 * style.period
    if jitter:
        ox, oy = rng.integers(-2, 3, size=2)
        r = float(rng.uniform(6.0, 8.0))
        phase = float(rng.uniform(0, period))
    else:
        ox = oy = 0
        r, phase = 7.0, 0.0
    mid, delta = 0.15 + 0.7 * style.lightness, 0.03 + 0.22 * style.contrast
    first, second = _tone(style.hue, mid + delta), _tone(style.hue, mid - delta)
    theta = math.pi * style.angle
    along = _XX * math.sin(theta) + _YY * math.cos(theta) + phase  # angle 0: horizontal stripes
    img = np.where((np.floor(along / (period / 2)) % 2 == 0)[..., None], first, second)
    colour = np.array(COLOURS[content.colour], dtype=np.float64)
    colour = (0.35 + 0.65 * style.saturation) * colour + (0.65 - 0.65 * style.saturation) * _GREY
    cx, cy = POSITIONS[content.position]
    mask = shape_mask(content.shape, cx + ox, cy + oy, r)
    width = 1.2 + (r - 1.2) * style.line
    if width < r - 0.5:
        mask &= ~shape_mask(content.shape, cx + ox, cy + oy, r - width)
    img = np.where(mask[..., None], colour, img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_image(content: Content, style: Style2, seed: int | None = 0, jitter: bool = True) -> Image.Image:
    return Image.fromarray(render(content, style, seed, jitter))


def render_batch(items: list[tuple[Content, Style2, int]], jitter: bool = True) -> np.ndarray:
    return np.stack([render(c, s, seed, jitter) for c, s, seed in items])


# ----------------------------------------------------------------------------- the population
class PopulationV2:
    """The users of a v2 world; every draw is a pure function of (config, kind, index)."""

    def __init__(self, config: WorldV2Config = WorldV2Config()):
        config.check()
        self.config = config
        w = np.random.default_rng([config.seed, _POP]).standard_normal((len(FACTORS), config.latent_dim))
        self.loadings = w / np.linalg.norm(w, axis=1, keepdims=True)  # each factor's latent part: unit variance

    def taste(self, rng: np.random.Generator, outside: bool = False) -> Taste:
        c = self.config
        z = rng.standard_normal(c.latent_dim)
        own = c.outside_idiosyncrasy if outside else c.idiosyncrasy
        u = math.sqrt(1 - own**2) * (self.loadings @ z) + own * rng.standard_normal(len(FACTORS))  # u_j ~ N(0, 1)
        base = Style2.of([0.5 * (1 + math.erf(x / math.sqrt(2))) for x in u])
        shifts = tuple((float(a), float(b)) for a, b in c.prompt_shift * rng.standard_normal((len(SHAPES), 2)))
        return Taste(base, shifts)

    def _history(self, rng: np.random.Generator, taste: Taste, prompts: tuple[str, ...], n: int):
        from premier.world.spec import content_of

        out = []
        for _ in range(n):
            content = content_of(prompts[rng.integers(len(prompts))])
            seed = int(rng.integers(2**31))
            if rng.random() < self.config.off_taste:
                style = self.taste(rng).target(content)  # someone else's taste: the history's noise
            else:
                want = taste.target(content).vector()
                style = Style2.of(want + self.config.spread * rng.standard_normal(len(FACTORS)))
            out.append((content, seed, style))
        return tuple(out)

    def _prompts(self, rng: np.random.Generator) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the user's history prompts, the rest, in a random order)."""
        order = rng.permutation(len(ALL_CONTENTS))
        own = tuple(ALL_CONTENTS[j].prompt for j in order[: self.config.prompt_subset])
        return own, tuple(ALL_CONTENTS[j].prompt for j in order[self.config.prompt_subset :])

    def training_users(self) -> list[WorldUser2]:
        c, users = self.config, []
        for i in range(c.train_users):
            rng = np.random.default_rng([c.seed, _TRAIN, i])
            taste = self.taste(rng)
            own, _ = self._prompts(rng)
            n = int(rng.integers(c.min_images, c.max_images + 1))
            users.append(WorldUser2(f"u{i:04d}", taste, self._history(rng, taste, own, n), own))
        return users

    def held_out_users(self) -> list[WorldUser2]:
        c, users = self.config, []
        outside = round(c.outside_share * c.test_users)
        for i in range(c.test_users):
            rng = np.random.default_rng([c.seed, _TEST, i])
            off = i >= c.test_users - outside
            taste = self.taste(rng, outside=off)
            own, rest = self._prompts(rng)
            history = self._history(rng, taste, own, c.test_history)
            users.append(WorldUser2(f"test{i:03d}", taste, history, own, rest[: c.test_prompts], outside=off))
        return users

    def new_users(self, count: int, images: int, seed: int = 0) -> list[WorldUser2]:
        users = []
        for i in range(count):
            rng = np.random.default_rng([self.config.seed, _NEW, seed, i])
            taste = self.taste(rng)
            own, _ = self._prompts(rng)
            users.append(WorldUser2(f"new{seed}-{i:03d}", taste, self._history(rng, taste, own, images), own))
        return users

    def demo_users(self) -> list[WorldUser2]:
        users = []
        for i, (uid, values) in enumerate(DEMO_TASTES.items()):
            rng = np.random.default_rng([self.config.seed, _DEMO, i])
            taste = Taste(Style2.of(values), tuple((0.0, 0.0) for _ in SHAPES))
            prompts = tuple(c.prompt for c in ALL_CONTENTS)
            users.append(WorldUser2(uid, taste, self._history(rng, taste, prompts, self.config.demo_images), prompts))
        return users

    def random_items(self, rng: np.random.Generator, n: int, uniform: float = 0.0) -> list[tuple[Content, Style2, int]]:
        """n (content, style, jitter seed) draws: a population user's taste plus an image's spread, or with
        probability `uniform` a style uniform over the factor cube (the probe must read outside users too)."""
        items = []
        for _ in range(n):
            content = ALL_CONTENTS[rng.integers(len(ALL_CONTENTS))]
            if rng.random() < uniform:
                style = Style2.of(rng.random(len(FACTORS)))
            else:
                want = self.taste(rng).target(content).vector()
                style = Style2.of(want + self.config.spread * rng.standard_normal(len(FACTORS)))
            items.append((content, style, int(rng.integers(2**31))))
        return items


DEMO_TASTES: dict[str, tuple[float, ...]] = {  # far apart in every factor, so the demo shows them apart
    # hue, lightness, contrast, angle, period, saturation, line
    "alice": (0.62, 0.15, 0.85, 0.25, 0.1, 0.95, 1.0),
    "bob": (0.08, 0.85, 0.3, 0.0, 0.8, 0.1, 0.0),
    "carol": (0.3, 0.5, 0.9, 0.5, 0.3, 0.9, 0.05),
    "dave": (0.85, 0.3, 0.2, 0.75, 0.9, 0.2, 0.9),
}
