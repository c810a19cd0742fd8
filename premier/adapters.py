"""Preference adapters: fuse a prompt's T5 token states with a user's embedding tokens.

Each adapter projects text and user tokens to a common width, runs `depth` perceiver-style
cross-attention blocks in which the *text tokens are the queries* and the *user tokens are
the keys and values*, then a Linear + LayerNorm to per-token modulation offsets of width D.
The block-shared adapter emits one offset per text token; the block-distinct adapter's last
layer is `n_blocks` times wider and yields one offset per modulated DiT block.

Initialisation: every Linear weight and the output LayerNorm's gain are N(0, init_std) and
all biases are zero, so the deltas start near zero. The pre-norm LayerNorms inside the blocks
keep the identity (gain 1): a near-zero gain there would also silence the user tokens' keys and
values and starve the user embeddings of gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention

from premier.config import PremierConfig


class PreferenceCrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention (text queries, user keys/values) then a pre-norm MLP, both residual."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_text = nn.LayerNorm(width)
        self.norm_user = nn.LayerNorm(width)
        self.attn = Attention(
            query_dim=width, cross_attention_dim=width, heads=heads, dim_head=width // heads, bias=True, out_bias=True
        )
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mult=mlp_ratio, activation_fn="gelu")

    def forward(self, text: torch.Tensor, user: torch.Tensor) -> torch.Tensor:
        text = text + self.attn(self.norm_text(text), encoder_hidden_states=self.norm_user(user))
        return text + self.mlp(self.norm_mlp(text))


class PreferenceAdapter(nn.Module):
    """(text states (B, T, text_dim), user tokens (B, N, user_dim)) -> offsets (B, num_outputs, T, D)."""

    def __init__(self, config: PremierConfig, num_outputs: int):
        super().__init__()
        self.num_outputs = num_outputs
        self.out_dim = config.inner_dim
        w = config.adapter_width
        self.text_in = nn.Linear(config.text_dim, w)
        self.user_in = nn.Linear(config.user_dim, w)
        self.blocks = nn.ModuleList(
            PreferenceCrossAttentionBlock(w, config.adapter_heads, config.adapter_mlp_ratio)
            for _ in range(config.adapter_depth)
        )
        self.proj_out = nn.Linear(w, num_outputs * config.inner_dim)
        # One LayerNorm per output block (normalised over D, its own gain and bias).
        self.norm_out_weight = nn.Parameter(torch.ones(num_outputs, config.inner_dim))
        self.norm_out_bias = nn.Parameter(torch.zeros(num_outputs, config.inner_dim))
        self.reset_parameters(config.init_std)

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()
        self.norm_out_weight.normal_(0.0, std)
        self.norm_out_bias.zero_()

    def forward(self, text_states: torch.Tensor, user_tokens: torch.Tensor) -> torch.Tensor:
        x = self.text_in(text_states)
        u = self.user_in(user_tokens)
        for block in self.blocks:
            x = block(x, u)
        b, t, _ = x.shape
        out = self.proj_out(x).view(b, t, self.num_outputs, self.out_dim).transpose(1, 2)
        out = F.layer_norm(out, (self.out_dim,), eps=1e-5)
        return out * self.norm_out_weight[:, None, :] + self.norm_out_bias[:, None, :]


@dataclass
class AdapterOutput:
    shared: torch.Tensor
    """(B, T, D): the same offset for every modulated block."""
    distinct: torch.Tensor
    """(B, n_blocks, T, D): one offset per modulated block, in config order (double, then single)."""

    def combined(self) -> torch.Tensor:
        """(B, n_blocks, T, D): the offset each block adds to `temb` before SiLU and its AdaLN linear."""
        return self.shared.unsqueeze(1) + self.distinct


class PremierAdapters(nn.Module):
    """The block-shared and block-distinct preference adapters."""

    def __init__(self, config: PremierConfig):
        super().__init__()
        self.config = config
        self.shared = PreferenceAdapter(config, 1)
        self.distinct = PreferenceAdapter(config, config.num_modulated_blocks)

    def forward(self, text_states: torch.Tensor, user_tokens: torch.Tensor) -> AdapterOutput:
        if text_states.shape[0] != user_tokens.shape[0]:
            raise ValueError(f"batch mismatch: {text_states.shape[0]} prompts, {user_tokens.shape[0]} users")
        return AdapterOutput(
            shared=self.shared(text_states, user_tokens)[:, 0], distinct=self.distinct(text_states, user_tokens)
        )

    def text_deltas(
        self, text_states: torch.Tensor, user_tokens: torch.Tensor, active: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-block per-token offsets (B, n_blocks, T, D); rows where `active` is False are exactly zero.

        Depends only on (prompt, user), never on the timestep: compute once per request.
        """
        deltas = self(text_states, user_tokens).combined()
        if active is not None:
            deltas = deltas * active.to(deltas.dtype).view(-1, 1, 1, 1)
        return deltas
