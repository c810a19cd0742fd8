"""Small datasets the training tests generate: users whose images differ by colour.

The embedded model's VAE has random weights and maps every colour to nearly the same latents
(user means differ by ~0.01 against unit noise), so no model could tell these users apart
through it. `PixelEncoder` stands in for the VAE in learning tests: the same prepare code
path, with latents that keep the colour (an 8x8 average pool of the pixels). The text side
(T5, CLIP) is the real embedded encoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from premier.training.dataset import write_user_folder
from premier.training.prepared import DataEncoder

COLOURS = ((220, 40, 40), (40, 200, 60), (40, 60, 220), (235, 235, 235))
PROMPTS = ("a cat", "a house", "a tree")


def user_images(colour: tuple[int, int, int], n: int, seed: int, size: int = 64) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    base = np.array(colour, dtype=np.float64)[None, None, :]
    return [Image.fromarray(np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)) for _ in range(n)]


def make_raw_dataset(root: Path, per_user: int = 6, colours=COLOURS, names: list[str] | None = None) -> Path:
    names = names or [f"user{k}" for k in range(len(colours))]
    for k, (name, colour) in enumerate(zip(names, colours)):
        images = user_images(colour, per_user, seed=k)
        write_user_folder(root / name, [(f"{i:03d}.png", im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(images)])
    return root


class PixelEncoder(DataEncoder):
    """DataEncoder whose image latents are average-pooled pixels (RGB + luma), scaled to unit range."""

    def encode_images(self, images):
        pixels = self.pipe.image_processor.preprocess(
            [im.convert("RGB") for im in images], height=self.resolution, width=self.resolution, resize_mode="crop"
        )
        pooled = F.avg_pool2d(pixels, self.pipe.vae_scale_factor)
        return (torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 1.5).to(self.storage_dtype)
