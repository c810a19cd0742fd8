"""Premier configuration: the shapes of user embeddings and preference adapters.

The defaults are the reference release's for FLUX.1-dev (D = 3072, T5 width 4096,
30 x 1024 user tokens, adapter width 3072, the 19 double-stream blocks modulated).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from premier.errors import CheckpointError

CONFIG_NAME = "premier_config.json"


@dataclass(frozen=True)
class PremierConfig:
    # Base model dimensions the adapters are built for.
    inner_dim: int = 3072
    """D: the DiT's hidden size, i.e. the width of `temb` and of every delta."""
    text_dim: int = 4096
    """Width of the T5 token states the adapters read (FLUX's `joint_attention_dim`)."""
    # User embeddings.
    num_user_tokens: int = 30
    user_dim: int = 1024
    user_init_range: float = 0.1
    """Training-user embeddings start uniform(-r, r)."""
    # Preference adapters (both share this architecture).
    adapter_width: int = 3072
    adapter_depth: int = 3
    adapter_heads: int = 24
    adapter_mlp_ratio: float = 4.0
    init_std: float = 0.01
    """All adapter weights start N(0, init_std), biases 0, so the deltas start near zero."""
    # Which DiT blocks get per-token text modulation.
    double_blocks: tuple[int, ...] = tuple(range(19))
    single_blocks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "double_blocks", tuple(int(i) for i in self.double_blocks))
        object.__setattr__(self, "single_blocks", tuple(int(i) for i in self.single_blocks))
        for name in (
            "inner_dim",
            "text_dim",
            "num_user_tokens",
            "user_dim",
            "adapter_width",
            "adapter_depth",
            "adapter_heads",
        ):
            if int(getattr(self, name)) <= 0:
                raise CheckpointError(f"PremierConfig.{name} must be positive, got {getattr(self, name)}")
        if self.adapter_width % self.adapter_heads:
            raise CheckpointError(
                f"PremierConfig.adapter_width ({self.adapter_width}) must be divisible by adapter_heads ({self.adapter_heads})"
            )
        for name in ("double_blocks", "single_blocks"):
            blocks = getattr(self, name)
            if len(set(blocks)) != len(blocks) or any(i < 0 for i in blocks):
                raise CheckpointError(f"PremierConfig.{name} must be distinct non-negative indices, got {list(blocks)}")
        if not self.double_blocks and not self.single_blocks:
            raise CheckpointError("PremierConfig must modulate at least one block")

    @property
    def num_modulated_blocks(self) -> int:
        return len(self.double_blocks) + len(self.single_blocks)

    @property
    def user_shape(self) -> tuple[int, int]:
        return (self.num_user_tokens, self.user_dim)

    @classmethod
    def for_transformer(cls, transformer_config: Any, **overrides: Any) -> PremierConfig:
        """A config sized for a diffusers `FluxTransformer2DModel` config (all double blocks modulated)."""
        inner = transformer_config.num_attention_heads * transformer_config.attention_head_dim
        values: dict[str, Any] = dict(
            inner_dim=inner,
            text_dim=transformer_config.joint_attention_dim,
            double_blocks=tuple(range(transformer_config.num_layers)),
        )
        values.update(overrides)
        return cls(**values)

    def check_fits(self, transformer_config: Any) -> None:
        """Raise CheckpointError naming every dimension that disagrees with the base transformer."""
        inner = transformer_config.num_attention_heads * transformer_config.attention_head_dim
        problems = []
        if self.inner_dim != inner:
            problems.append(f"inner_dim {self.inner_dim} != transformer inner dim {inner}")
        if self.text_dim != transformer_config.joint_attention_dim:
            problems.append(
                f"text_dim {self.text_dim} != transformer joint_attention_dim {transformer_config.joint_attention_dim}"
            )
        bad = [i for i in self.double_blocks if i >= transformer_config.num_layers]
        if bad:
            problems.append(f"double_blocks {bad} out of range (the transformer has {transformer_config.num_layers})")
        bad = [i for i in self.single_blocks if i >= transformer_config.num_single_layers]
        if bad:
            problems.append(
                f"single_blocks {bad} out of range (the transformer has {transformer_config.num_single_layers})"
            )
        if problems:
            raise CheckpointError("Premier checkpoint does not fit the base model: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["double_blocks"] = list(self.double_blocks)
        d["single_blocks"] = list(self.single_blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PremierConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"unknown PremierConfig fields: {unknown}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CONFIG_NAME
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, folder: str | Path) -> PremierConfig:
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: not a Premier checkpoint folder")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        try:
            return cls.from_dict(data)
        except TypeError as e:
            raise CheckpointError(f"{path}: {e}") from e
