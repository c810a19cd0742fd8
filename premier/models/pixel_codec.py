"""A lossless pixel codec standing in for FLUX's VAE in the embedded model.

A trained VAE cannot be downloaded here, and a random one maps every colour to nearly the same
latents. Pixel-unshuffle is exact and costs nothing: a (3, H, W) image in [-1, 1] becomes
(3 * f * f, H / f, W / f) latents and back. The class answers what FLUX's pipeline and the
project's encoders ask of `AutoencoderKL` (`config.block_out_channels` for the scale factor,
`config.latent_channels`, `config.scaling_factor`, `config.shift_factor`,
`encode(x).latent_dist.mode()/.sample()`, `decode(z, return_dict=False)[0]`), so the pipeline,
the data encoder and stage 2 run unchanged; `save_pretrained` / `from_pretrained` round-trip it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin


class PixelCodec(ModelMixin, ConfigMixin):
    """Pixel-unshuffle by `factor`; `block_out_channels` has log2(factor) + 1 entries so that
    FluxPipeline's `vae_scale_factor = 2 ** (len(block_out_channels) - 1)` equals `factor`."""

    @register_to_config
    def __init__(
        self,
        factor: int = 2,
        in_channels: int = 3,
        scaling_factor: float = 1.0,
        shift_factor: float = 0.0,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (1, 1),
        latent_channels: int = 12,
    ):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two, got {factor}")
        if 2 ** (len(block_out_channels) - 1) != factor or latent_channels != in_channels * factor * factor:
            raise ValueError("block_out_channels and latent_channels must agree with factor (see the class docstring)")
        # One tensor, so the codec has a dtype and device like any other component, and a weights file.
        self.register_buffer("unit", torch.ones(1))

    @classmethod
    def for_factor(cls, factor: int, in_channels: int = 3, sample_size: int = 32) -> PixelCodec:
        levels = factor.bit_length()  # log2(factor) + 1 for a power of two
        return cls(
            factor=factor,
            in_channels=in_channels,
            sample_size=sample_size,
            block_out_channels=tuple([1] * levels),
            latent_channels=in_channels * factor * factor,
        )

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        mean = F.pixel_unshuffle(x, self.config.factor) * self.unit.to(x.dtype)
        dist = DiagonalGaussianDistribution(torch.cat([mean, torch.zeros_like(mean)], dim=1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=dist) if return_dict else (dist,)

    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        image = F.pixel_shuffle(z, self.config.factor)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)


__all__ = ["PixelCodec"]
