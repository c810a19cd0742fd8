"""The embedded default model: a tiny FLUX-architecture pipeline built deterministically from a seed.

Same classes as FLUX.1-dev (diffusers `FluxTransformer2DModel`, `AutoencoderKL`,
`FlowMatchEulerDiscreteScheduler`; transformers `CLIPTextModel`, `T5EncoderModel`), only
smaller, so every code path the real model takes runs here on a CPU in seconds. Nothing is
downloaded: weights come from the seed, tokenizers from `premier.models.tokenizers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from premier.checkpoint import PremierModel
from premier.config import PremierConfig
from premier.models.tokenizers import SPECIAL_TOKENS, build_clip_tokenizer, build_t5_tokenizer, vocab_size

EMBEDDED_SEED = 0
DEMO_USERS = ("alice", "bob", "carol", "dave")

# FLUX.1-dev's scheduler settings (dynamic shift by image sequence length).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@dataclass(frozen=True)
class EmbeddedSpec:
    """Sizes of the embedded model. The defaults run a 128x128 image in well under a second per step on a CPU."""

    num_layers: int = 2
    num_single_layers: int = 4
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text_dim: int = 64
    pooled_dim: int = 64
    max_sequence_length: int = 64
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (8, 16, 16, 16)
    num_user_tokens: int = 8
    user_dim: int = 32
    adapter_width: int = 64
    adapter_heads: int = 2

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


def build_embedded_flux(seed: int = EMBEDDED_SEED, spec: EmbeddedSpec = EmbeddedSpec()) -> FluxPipeline:
    """Build the tiny FLUX pipeline; the same seed always gives bit-identical weights."""
    special = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=spec.latent_channels * 4,
            num_layers=spec.num_layers,
            num_single_layers=spec.num_single_layers,
            attention_head_dim=spec.attention_head_dim,
            num_attention_heads=spec.num_attention_heads,
            joint_attention_dim=spec.text_dim,
            pooled_projection_dim=spec.pooled_dim,
            guidance_embeds=True,
            axes_dims_rope=spec.axes_dims_rope,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels,
            layers_per_block=1,
            latent_channels=spec.latent_channels,
            norm_num_groups=4,
            sample_size=128,
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=vocab_size(),
                hidden_size=spec.pooled_dim,
                intermediate_size=spec.pooled_dim * 2,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
                pad_token_id=special["<pad>"],
                bos_token_id=special["<s>"],
                eos_token_id=special["</s>"],
            )
        )
        text_encoder_2 = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size(),
                d_model=spec.text_dim,
                d_kv=spec.text_dim // 4,
                d_ff=spec.text_dim * 2,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",
                pad_token_id=special["<pad>"],
                eos_token_id=special["</s>"],
                decoder_start_token_id=special["<pad>"],
            )
        )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_t5_tokenizer(spec.max_sequence_length),
        transformer=transformer,
    )
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return pipe


def embedded_premier_config(spec: EmbeddedSpec = EmbeddedSpec()) -> PremierConfig:
    return PremierConfig(
        inner_dim=spec.inner_dim,
        text_dim=spec.text_dim,
        num_user_tokens=spec.num_user_tokens,
        user_dim=spec.user_dim,
        adapter_width=spec.adapter_width,
        adapter_heads=spec.adapter_heads,
        double_blocks=tuple(range(spec.num_layers)),
    )


def build_embedded_premier(
    seed: int = EMBEDDED_SEED, spec: EmbeddedSpec = EmbeddedSpec(), user_ids: tuple[str, ...] = DEMO_USERS
) -> PremierModel:
    """Adapters and a table of demo users for the embedded model, initialised as stage 1 starts."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = PremierModel(embedded_premier_config(spec), list(user_ids))
    return model.eval().requires_grad_(False)


def embedded_demo_records() -> list["UserRecord"]:
    """The embedded model's demo users as store records (what `premier serve` seeds a new store with).

    Direct-mode records of the demo rows of the embedded checkpoint's user table.
    """
    from premier.user_record import UserRecord

    premier = build_embedded_premier()
    ckpt = premier.checkpoint_id()
    return [UserRecord(user_id=u, mode="direct", vector=premier.users.get(u).detach().float().cpu().clone(),
                       checkpoint_id=ckpt, fit={"source": "embedded demo user"}) for u in DEMO_USERS]
