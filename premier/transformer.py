"""FLUX with per-token text modulation (Premier's prompt preference modulation, PPM).

`PremierTransformer` wraps an unmodified diffusers `FluxTransformer2DModel` (its weights load
from the standard checkpoint) and runs its blocks. In a modulated block the text stream's
AdaLN-Zero is computed per token,

    emb[b, t] = Linear_i(SiLU(temb[b] + delta[b, i, t]))

where `delta` is the sum of the block-shared and block-distinct adapter outputs. Everything
else (attention and its processors, feed-forwards, the image stream, embeddings, norms) is
diffusers' own module with its own weights; only the two block forwards below differ from
diffusers, and `tests/test_transformer.py` proves that with zero deltas they equal it. Their
AdaLN and gated-residual arithmetic goes through `kernels` (fused Triton on a GPU, the PyTorch
reference on a CPU), which is also what `torch.compile` sees as single custom operators.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)

from kernels import adaln_modulate, adaln_modulate_cat, gated_residual
from premier.config import PremierConfig


def _clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-65504, 65504) if x.dtype == torch.float16 else x


def modulated_double_block_forward(
    block: FluxTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    text_delta: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`FluxTransformerBlock.forward` with the text stream's `norm1_context` per token.

    text_delta: (B, T, D), added to `temb` before SiLU and the block's AdaLN linear.
    """
    norm_hidden_states, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(hidden_states, emb=temb)

    ctx = block.norm1_context
    c_emb = ctx.linear(ctx.silu(temb.unsqueeze(1) + text_delta))  # (B, T, 6D)
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_emb.chunk(6, dim=-1)
    norm_encoder_hidden_states = adaln_modulate(encoder_hidden_states, c_scale_msa, c_shift_msa, eps=ctx.norm.eps)

    attention_outputs = block.attn(
        hidden_states=norm_hidden_states,
        encoder_hidden_states=norm_encoder_hidden_states,
        image_rotary_emb=image_rotary_emb,
        **(joint_attention_kwargs or {}),
    )
    attn_output, context_attn_output = attention_outputs[0], attention_outputs[1]

    # Image stream: per-sample modulation, exactly as diffusers.
    hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
    norm_hidden_states = adaln_modulate(hidden_states, scale_mlp, shift_mlp, eps=block.norm2.eps)
    hidden_states = gated_residual(hidden_states, gate_mlp, block.ff(norm_hidden_states))
    if len(attention_outputs) == 3:
        hidden_states = hidden_states + attention_outputs[2]

    # Text stream: per-token modulation.
    encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa, context_attn_output)
    norm_encoder_hidden_states = adaln_modulate(
        encoder_hidden_states, c_scale_mlp, c_shift_mlp, eps=block.norm2_context.eps
    )
    encoder_hidden_states = gated_residual(
        encoder_hidden_states, c_gate_mlp, block.ff_context(norm_encoder_hidden_states)
    )
    return _clip_fp16(encoder_hidden_states), hidden_states


def modulated_single_block_forward(
    block: FluxSingleTransformerBlock,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    temb: torch.Tensor,
    text_delta: torch.Tensor,
    image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    joint_attention_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`FluxSingleTransformerBlock.forward` with the text rows modulated per token, image rows per sample."""
    text_len = encoder_hidden_states.shape[1]
    norm = block.norm
    img_shift, img_scale, img_gate = norm.linear(norm.silu(temb)).chunk(3, dim=-1)  # (B, D) each
    txt_shift, txt_scale, txt_gate = norm.linear(norm.silu(temb.unsqueeze(1) + text_delta)).chunk(3, dim=-1)

    # One launch writes the concatenated [text; image] rows (text per token, image per sample).
    norm_hidden_states = adaln_modulate_cat(
        encoder_hidden_states, hidden_states, txt_scale, txt_shift, img_scale, img_shift, eps=norm.norm.eps
    )

    mlp_hidden_states = block.act_mlp(block.proj_mlp(norm_hidden_states))
    attn_output = block.attn(
        hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb, **(joint_attention_kwargs or {})
    )
    out = block.proj_out(torch.cat([attn_output, mlp_hidden_states], dim=2))

    encoder_hidden_states = _clip_fp16(gated_residual(encoder_hidden_states, txt_gate, out[:, :text_len]))
    hidden_states = _clip_fp16(gated_residual(hidden_states, img_gate, out[:, text_len:]))
    return encoder_hidden_states, hidden_states


class PremierTransformer(nn.Module):
    """A diffusers FLUX transformer whose configured blocks take per-sample, per-token text deltas.

    Users are data, not weights: the deltas are an input tensor, so a batch may mix users
    (and samples without one, whose delta rows are zero) in one forward.
    """

    def __init__(self, flux: FluxTransformer2DModel, config: PremierConfig | None):
        super().__init__()
        self.flux = flux.requires_grad_(False)  # Premier never trains FLUX
        self.premier_config = config
        # Map a block index to its row in the (B, n_blocks, T, D) delta tensor.
        self._double_slot: dict[int, int] = {}
        self._single_slot: dict[int, int] = {}
        if config is not None:
            config.check_fits(flux.config)
            self._double_slot = {b: i for i, b in enumerate(config.double_blocks)}
            n_double = len(config.double_blocks)
            self._single_slot = {b: n_double + i for i, b in enumerate(config.single_blocks)}
        # The functions that run modulated blocks; `premier.compile` swaps in compiled versions
        # (regional compilation: one graph per block kind, shared by all blocks of that kind).
        self.double_block_forward = modulated_double_block_forward
        self.single_block_forward = modulated_single_block_forward

    @property
    def dtype(self) -> torch.dtype:
        return self.flux.dtype

    @property
    def device(self) -> torch.device:
        return self.flux.device

    def _run(self, fn, *args):
        if torch.is_grad_enabled() and self.flux.gradient_checkpointing:
            return self.flux._gradient_checkpointing_func(fn, *args)
        return fn(*args)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        text_deltas: torch.Tensor | None = None,
        joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Velocity prediction (B, L, C), same arguments as `FluxTransformer2DModel.forward` plus

        text_deltas: (B, n_blocks, T, D) from `PremierAdapters.text_deltas`, or None for plain FLUX.
        """
        flux = self.flux
        if text_deltas is not None:
            if self.premier_config is None:
                raise ValueError("text_deltas given, but this transformer has no Premier config")
            b, t = encoder_hidden_states.shape[:2]
            expected = (b, self.premier_config.num_modulated_blocks, t, self.premier_config.inner_dim)
            if tuple(text_deltas.shape) != expected:
                raise ValueError(f"text_deltas has shape {tuple(text_deltas.shape)}; expected {expected}")
            text_deltas = text_deltas.to(hidden_states.dtype)

        hidden_states = flux.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = flux.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = flux.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = flux.context_embedder(encoder_hidden_states)
        image_rotary_emb = flux.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        stages = (
            (flux.transformer_blocks, self._double_slot, self.double_block_forward),
            (flux.single_transformer_blocks, self._single_slot, self.single_block_forward),
        )
        for blocks, slots, modulated_forward in stages:
            for index, block in enumerate(blocks):
                slot = slots.get(index) if text_deltas is not None else None
                if slot is None:  # stock diffusers block
                    encoder_hidden_states, hidden_states = self._run(
                        block, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs
                    )
                else:
                    encoder_hidden_states, hidden_states = self._run(
                        modulated_forward,
                        block,
                        hidden_states,
                        encoder_hidden_states,
                        temb,
                        text_deltas[:, slot],
                        image_rotary_emb,
                        joint_attention_kwargs,
                    )

        hidden_states = flux.norm_out(hidden_states, temb)
        return flux.proj_out(hidden_states)
