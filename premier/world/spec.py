"""What the synthetic world is made of: prompt content factors and user style factors.

Chosen for what a ~2M-parameter FLUX learns on a CPU in minutes: coarse content (colour,
position and a large shape) and coarse, image-wide style (background pattern, its frequency,
its palette, the shape's saturation and whether it is filled or outlined). Every factor is
discrete, so the probe that scores images is a set of small classifiers with ground truth.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import numpy as np

IMAGE_SIZE = 32

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 210, 40)}
POSITIONS = {
    "top left": (9, 9),
    "top right": (23, 9),
    "bottom left": (9, 23),
    "bottom right": (23, 23),
    "center": (16, 16),
}

PATTERNS = ("horizontal stripes", "vertical stripes", "checker", "diagonal stripes")
FREQUENCIES = ("low", "high")
PALETTES = {  # (first, second) background colour; low saturation so they never read as a shape colour
    "dark": ((18, 18, 24), (70, 70, 80)),
    "light": ((236, 236, 230), (188, 188, 182)),
    "sepia": ((120, 96, 72), (168, 140, 110)),
    "slate": ((40, 64, 80), (96, 124, 140)),
}
SATURATIONS = ("vivid", "muted")
FILLS = ("filled", "outline")


@dataclass(frozen=True)
class Content:
    """What a prompt asks for."""

    shape: str
    colour: str
    position: str

    @property
    def prompt(self) -> str:
        where = "in the center" if self.position == "center" else f"at the {self.position}"
        return f"a {self.colour} {self.shape} {where}"


@dataclass(frozen=True)
class Style:
    """A user's latent preference: five independent image-wide factors."""

    pattern: str
    frequency: str
    palette: str
    saturation: str
    fill: str

    def describe(self) -> str:
        return f"{self.palette} {self.frequency}-frequency {self.pattern}, {self.saturation} {self.fill} shapes"


CONTENT_FACTORS: dict[str, tuple[str, ...]] = {"shape": SHAPES, "colour": tuple(COLOURS), "position": tuple(POSITIONS)}
STYLE_FACTORS: dict[str, tuple[str, ...]] = {
    "pattern": PATTERNS,
    "frequency": FREQUENCIES,
    "palette": tuple(PALETTES),
    "saturation": SATURATIONS,
    "fill": FILLS,
}
ALL_FACTORS: dict[str, tuple[str, ...]] = {**CONTENT_FACTORS, **STYLE_FACTORS}

ALL_CONTENTS: tuple[Content, ...] = tuple(Content(*c) for c in itertools.product(*CONTENT_FACTORS.values()))
ALL_STYLES: tuple[Style, ...] = tuple(Style(*s) for s in itertools.product(*STYLE_FACTORS.values()))
PROMPTS: tuple[str, ...] = tuple(c.prompt for c in ALL_CONTENTS)
_BY_PROMPT = {c.prompt: c for c in ALL_CONTENTS}


def content_of(prompt: str) -> Content:
    """The world content a prompt names; KeyError for a prompt outside the world."""
    return _BY_PROMPT[prompt]


def labels(item: Content | Style) -> dict[str, int]:
    """Factor name -> level index (what the probe predicts)."""
    return {f.name: ALL_FACTORS[f.name].index(getattr(item, f.name)) for f in fields(item)}


def random_style(rng: np.random.Generator) -> Style:
    return Style(*(levels[rng.integers(len(levels))] for levels in STYLE_FACTORS.values()))


def random_content(rng: np.random.Generator) -> Content:
    return ALL_CONTENTS[rng.integers(len(ALL_CONTENTS))]
