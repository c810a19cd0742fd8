"""The renderer: (content, style, jitter seed) -> a 32x32 RGB image, deterministically.

The jitter (a shape offset of up to 2 px and a size between 6 and 8 px, a pattern phase) keeps
a user's history images from being copies; `jitter=False` gives the canonical render that the
ground-truth distance compares against.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from premier.world.spec import COLOURS, IMAGE_SIZE, PALETTES, POSITIONS, Content, Style

_GREY = np.array([128.0, 128.0, 128.0])
_PERIOD = {"low": 12, "high": 6}
_YY, _XX = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float64) + 0.5


def _pattern_mask(style: Style, phase: int) -> np.ndarray:
    half = _PERIOD[style.frequency] // 2
    y, x = np.floor(_YY).astype(int) + phase, np.floor(_XX).astype(int) + phase
    if style.pattern == "horizontal stripes":
        return (y // half) % 2 == 0
    if style.pattern == "vertical stripes":
        return (x // half) % 2 == 0
    if style.pattern == "checker":
        return ((y // half) + (x // half)) % 2 == 0
    return ((x + y) // half) % 2 == 0  # diagonal stripes


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
    # Upward triangle: apex at cy - r, base at cy + 0.8 r with half-width r.
    inside_y = (dy >= -r) & (dy <= 0.8 * r)
    return inside_y & (np.abs(dx) <= r * (dy + r) / (1.8 * r))


def render(content: Content, style: Style, seed: int | None = 0, jitter: bool = True) -> np.ndarray:
    """(H, W, 3) uint8."""
    rng = np.random.default_rng(seed)
    if jitter:
        ox, oy = rng.integers(-2, 3, size=2)
        r = float(rng.uniform(6.0, 8.0))
        phase = int(rng.integers(0, _PERIOD[style.frequency]))
    else:
        ox = oy = phase = 0
        r = 7.0
    first, second = (np.array(c, dtype=np.float64) for c in PALETTES[style.palette])
    img = np.where(_pattern_mask(style, phase)[..., None], first, second)
    colour = np.array(COLOURS[content.colour], dtype=np.float64)
    if style.saturation == "muted":
        colour = 0.45 * colour + 0.55 * _GREY
    cx, cy = POSITIONS[content.position]
    mask = shape_mask(content.shape, cx + ox, cy + oy, r)
    if style.fill == "outline":
        mask &= ~shape_mask(content.shape, cx + ox, cy + oy, r - 2.4)
    img = np.where(mask[..., None], colour, img)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def render_image(content: Content, style: Style, seed: int | None = 0, jitter: bool = True) -> Image.Image:
    return Image.fromarray(render(content, style, seed, jitter))


def render_batch(items: list[tuple[Content, Style, int]], jitter: bool = True) -> np.ndarray:
    """(B, H, W, 3) uint8 for (content, style, seed) triples."""
    return np.stack([render(c, s, seed, jitter) for c, s, seed in items])
