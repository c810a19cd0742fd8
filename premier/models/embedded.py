"""The embedded default model: a tiny FLUX-architecture pipeline trained in the synthetic world.

Same classes as FLUX.1-dev (diffusers `FluxTransformer2DModel`, `FlowMatchEulerDiscreteScheduler`;
transformers `CLIPTextModel`, `T5EncoderModel`), only smaller, so every code path the real model
takes runs here on a CPU in seconds; a lossless pixel codec stands in for the VAE. Nothing is
downloaded: the text encoders come from the seed (frozen, never trained), tokenizers from
`premier.models.tokenizers`, and the transformer, the stage-1 Premier checkpoint and the fitted
demo users from the files `premier world build` writes to `premier/assets/world/` (see
docs/world.md). Without those files the transformer and checkpoint are random, from the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from premier.checkpoint import PremierModel
from premier.config import PremierConfig
from premier.models.pixel_codec import PixelCodec
from premier.models.tokenizers import SPECIAL_TOKENS, build_clip_tokenizer, build_t5_tokenizer, vocab_size

EMBEDDED_SEED = 0
DEMO_USERS = ("alice", "bob", "carol", "dave")
# The prompts `premier demo` and `premier serve --demo` generate for every user.
DEMO_PROMPTS = ("a red circle in the center", "a blue square at the top left", "a yellow triangle at the bottom right")
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "world"
"""Shipped weights: transformer/ (diffusers), premier/ (stage-1 checkpoint), users/<id>.safetensors."""
TRANSFORMER_DIR, PREMIER_DIR, USERS_DIR = "transformer", "premier", "users"

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

if TYPE_CHECKING:
    from premier.user_record import UserRecord


@dataclass(frozen=True)
class EmbeddedSpec:
    """Sizes of the embedded model: ~2M transformer parameters on 32x32 images (64 image tokens)."""

    num_layers: int = 2
    num_single_layers: int = 2
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    axes_dims_rope: tuple[int, int, int] = (8, 12, 12)
    text_dim: int = 64
    pooled_dim: int = 64
    max_sequence_length: int = 16
    codec_factor: int = 2
    image_size: int = 32
    num_user_tokens: int = 8
    user_dim: int = 32
    adapter_width: int = 64
    adapter_heads: int = 2

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return 3 * self.codec_factor**2


def build_embedded_transformer(spec: EmbeddedSpec = None) -> FluxTransformer2DModel:  # type: ignore[assignment]
    """A randomly initialised transformer of the embedded sizes (seed it from the caller's RNG).

    No guidance embedding: the world's model is trained at one guidance value, so the input would be
    meaningless; the pipeline skips it for such models, as for FLUX.1-schnell.
    """
    spec = spec or EmbeddedSpec()
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=spec.latent_channels * 4,
        num_layers=spec.num_layers,
        num_single_layers=spec.num_single_layers,
        attention_head_dim=spec.attention_head_dim,
        num_attention_heads=spec.num_attention_heads,
        joint_attention_dim=spec.text_dim,
        pooled_projection_dim=spec.pooled_dim,
        guidance_embeds=False,
        axes_dims_rope=spec.axes_dims_rope,
    )


def build_embedded_flux(
    seed: int = EMBEDDED_SEED, spec: EmbeddedSpec = EmbeddedSpec(), weights: str | Path | None = ASSETS
) -> FluxPipeline:
    """Build the tiny FLUX pipeline; the same seed (and weights) always gives bit-identical weights.

    `weights`: a folder holding `transformer/` (what `premier world base` writes); ignored when it
    has none, or for a non-default spec, which gives a random transformer from the seed.
    """
    special = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    trained = Path(weights) / TRANSFORMER_DIR if weights is not None and spec == EmbeddedSpec() else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = build_embedded_transformer(spec)
        if trained is not None and (trained / "config.json").is_file():
            transformer = load_embedded_transformer(trained)
        vae = PixelCodec.for_factor(spec.codec_factor, sample_size=spec.image_size)
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
        # The single blocks too: without them stage 1 learned users about half as well (docs/world.md).
        single_blocks=tuple(range(spec.num_single_layers)),
    )


def load_embedded_transformer(folder: str | Path) -> FluxTransformer2DModel:
    """The trained transformer from a diffusers folder (safetensors only, local only)."""
    flux = FluxTransformer2DModel.from_pretrained(
        str(folder), local_files_only=True, use_safetensors=True, torch_dtype=torch.float32
    )
    return flux.eval().requires_grad_(False)


def build_embedded_premier(
    seed: int = EMBEDDED_SEED,
    spec: EmbeddedSpec = EmbeddedSpec(),
    user_ids: tuple[str, ...] | None = None,
    weights: str | Path | None = ASSETS,
) -> PremierModel:
    """The shipped stage-1 checkpoint (adapters and the world's training users), if `weights` holds one.

    Otherwise (or for another seed, spec or user list): adapters and a table of `user_ids`
    (default: the demo user names) initialised as stage 1 starts, from the seed.
    """
    folder = Path(weights) / PREMIER_DIR if weights is not None else None
    if (seed, spec, user_ids) == (EMBEDDED_SEED, EmbeddedSpec(), None) and folder is not None and folder.is_dir():
        return PremierModel.load(folder)[0].eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = PremierModel(embedded_premier_config(spec), list(user_ids or DEMO_USERS))
    return model.eval().requires_grad_(False)


def embedded_demo_records(weights: str | Path | None = ASSETS) -> list[UserRecord]:
    """The embedded model's demo users as store records (what `premier serve` seeds a new store with).

    The shipped fitted users: coefficient records over the shipped stage-1 checkpoint's training
    users, fitted by stage 2 on a few renders of each demo user's style. Without shipped files:
    direct-mode records of the demo rows of the random checkpoint's table.
    """
    from premier.user_record import UserRecord

    folder = Path(weights) / USERS_DIR if weights is not None else None
    if folder is not None and all((folder / f"{u}.safetensors").is_file() for u in DEMO_USERS):
        return [UserRecord.load(folder / f"{u}.safetensors") for u in DEMO_USERS]
    premier = build_embedded_premier(user_ids=DEMO_USERS, weights=None)
    ckpt = premier.checkpoint_id()
    return [
        UserRecord(
            user_id=u,
            mode="direct",
            vector=premier.users.get(u).detach().float().cpu().clone(),
            checkpoint_id=ckpt,
            fit={"source": "embedded demo user"},
        )
        for u in DEMO_USERS
    ]
