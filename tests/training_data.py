"""Small datasets the training tests generate: users whose images differ by colour.

The embedded model's codec is lossless (pixel-unshuffle), so its latents keep the colour; at 64 px
they are 32x32 (256 tokens), slow for learning tests. `PixelEncoder` keeps the same prepare code
path with the codec's latent layout at a quarter of the resolution (a 4x4 average pool of the
pixels, then the codec's unshuffle): 8x8 latents. The text side (T5, CLIP) is the real embedded encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.nn.functional as F
from PIL import Image

from premier.training.dataset import write_user_folder
from premier.training.prepared import DataEncoder

COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (235, 235, 235))
PROMPTS = ("a cat", "a house", "a tree")


def user_images(colour: tuple[int, int, int], n: int, seed: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)[None, None, :]
    return [
        Image.fromarray(np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)) for _ in range(n)
    ]


def make_raw_dataset(root: Path, per_user: int = 6, colours=COLOURS, names: list[str] | None = None) -> Path:
    names = names or [f"user{k}" for k in range(len(colours))]
    for k, (name, colour) in enumerate(zip(names, colours)):
        images = user_images(colour, per_user, seed=k)
        write_user_folder(root / name, [(f"{i:03d}.png", im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(images)])
    return root


class PixelEncoder(DataEncoder):
    """DataEncoder whose image latents are the codec's layout of 4x4-average-pooled pixels, scaled to unit range."""

    def encode_images(self, images):
        pixels = self.pipe.image_processor.preprocess(
            [im.convert("RGB") for im in images], height=self.resolution, width=self.resolution, resize_mode="crop"
        )
        pooled = F.avg_pool2d(pixels, 4)
        return (F.pixel_unshuffle(pooled, self.pipe.vae_scale_factor) * 1.5).to(self.storage_dtype)
