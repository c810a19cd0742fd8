"""Image-only metrics: a small probe network trained on ground-truth renders.

The probe reads a 32x32 image and predicts every world factor (content and style). From it:

- preference alignment (the ViPer score's analogue): the mean probability the probe gives the
  user's level of each style factor, in [0, 1];
- text consistency (CLIP T2I's analogue): the same over the prompt's content factors;
- distance to the ground truth (LPIPS's analogue): the L2 distance between the probe's
  unit-normalised features of an image and of the canonical render of the same prompt in the
  user's style, in [0, 2];
- win rate against the base model (the ViPer rate's analogue) compares alignments per image.

It trains in about a minute on renders drawn on the fly, with a little pixel noise so that
the slightly imperfect images a model generates are read like renders. `validate_probe`
checks the pair criteria of issue 6 on fresh renders.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from premier.errors import InvalidRequestError
from premier.files import atomic_save_safetensors, read_safetensors
from premier.world.base_train import pixels_to_tensor
from premier.world.render import render, render_batch
from premier.world.spec import (
    ALL_FACTORS,
    CONTENT_FACTORS,
    STYLE_FACTORS,
    Content,
    Style,
    labels,
    random_content,
    random_style,
)

PROBE_FILE = "probe.safetensors"


@dataclass(frozen=True)
class ProbeConfig:
    width: int = 32
    features: int = 128
    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    noise: float = 0.06  # pixel noise in [-1, 1] units during training
    seed: int = 0


def probe_body(config: ProbeConfig) -> nn.Sequential:
    """32x32 RGB -> `features` (the probes of both worlds share it)."""
    w = config.width
    return nn.Sequential(
        nn.Conv2d(3, w, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(w, w, 3, stride=2, padding=1),
        nn.GELU(),  # 16
        nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
        nn.GELU(),  # 8
        nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1),
        nn.GELU(),  # 4
        nn.Flatten(),
        nn.Linear(2 * w * 16, config.features),
        nn.GELU(),
    )


class ProbeFile(nn.Module):
    """What the probes of both worlds share: the feature distance and the file (safetensors, tagged by world)."""

    FORMAT = ""
    config: ProbeConfig
    read: Callable[..., tuple[torch.Tensor, Any]]  # (images) -> (unit features, readings): each world's probe

    def distance(self, images: np.ndarray, references: np.ndarray) -> torch.Tensor:
        a, _ = self.read(images)
        b, _ = self.read(references)
        return (a - b).norm(dim=-1)

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / PROBE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()},
            path,
            metadata={"format": self.FORMAT, "config": json.dumps(asdict(self.config))},
        )
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Any:
        tensors, meta = read_probe(folder)
        if meta.get("format") != cls.FORMAT:
            raise InvalidRequestError(
                "probe", f"{Path(folder) / PROBE_FILE} is a {meta.get('format')!r}, not a {cls.FORMAT!r}"
            )
        probe = cls(ProbeConfig(**json.loads(meta["config"])))
        probe.load_state_dict(tensors)
        return probe.eval().requires_grad_(False)


def read_probe(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(folder) / PROBE_FILE
    if not path.is_file():
        raise InvalidRequestError("probe", f"{path} does not exist; run `premier world probe --out {folder}`")
    return read_safetensors(path, error=lambda m: InvalidRequestError("probe", m))


class WorldProbe(ProbeFile):
    """World v1's probe: a classifier per (discrete) factor."""

    FORMAT = "premier-world-probe"

    def __init__(self, config: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.config = config
        self.body = probe_body(config)
        self.heads = nn.ModuleDict(
            {name: nn.Linear(config.features, len(levels)) for name, levels in ALL_FACTORS.items()}
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.body(x)
        return f, {name: head(f) for name, head in self.heads.items()}

    # ------------------------------------------------------------------ scores
    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 512) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(B, H, W, 3) uint8 -> (unit features (B, F), factor -> probabilities (B, levels))."""
        self.eval()
        feats, probs = [], {k: [] for k in ALL_FACTORS}
        for i in range(0, len(images), batch):
            f, logits = self(pixels_to_tensor(images[i : i + batch]))
            feats.append(F.normalize(f, dim=-1))
            for k, v in logits.items():
                probs[k].append(v.softmax(-1))
        return torch.cat(feats), {k: torch.cat(v) for k, v in probs.items()}

    def factor_scores(self, images: np.ndarray, targets: list[Content] | list[Style]) -> torch.Tensor:
        """Mean probability of each target's levels, (B,)."""
        _, probs = self.read(images)
        return _mean_level_probability(probs, targets)

    def preference_alignment(self, images: np.ndarray, styles: list[Style]) -> torch.Tensor:
        return self.factor_scores(images, styles)

    def factor_alignment(self, images: np.ndarray, styles: list[Style]) -> dict[str, torch.Tensor]:
        """Per style factor, the probability of the user's level, (B,) each: what the user's taste got right."""
        _, probs = self.read(images)
        return {name: _mean_level_probability({name: probs[name]}, styles, [name]) for name in STYLE_FACTORS}

    def text_consistency(self, images: np.ndarray, contents: list[Content]) -> torch.Tensor:
        return self.factor_scores(images, contents)


def _mean_level_probability(
    probs: dict[str, torch.Tensor], targets: list[Content] | list[Style], names: list[str] | None = None
) -> torch.Tensor:
    total = torch.zeros(len(targets))
    names = names or list(labels(targets[0]))
    for name in names:
        idx = torch.tensor([labels(t)[name] for t in targets])
        total += probs[name].gather(1, idx[:, None])[:, 0]
    return total / len(names)


def fit_probe(
    probe: ProbeFile,
    draw: Callable[[], list[tuple[Any, Any, int]]],
    loss_of: Callable[[torch.Tensor, list[tuple[Any, Any, int]]], torch.Tensor],
    render_items: Callable[[list], np.ndarray],
    progress: bool = True,
) -> dict[str, Any]:
    """A probe's training loop (both worlds'): each step renders `draw()`'s (content, style, seed) items, adds
    pixel noise, and minimises `loss_of(pixels, items)` with AdamW on a one-cycle schedule."""
    from tqdm.auto import tqdm

    config = probe.config
    g = torch.Generator("cpu").manual_seed(config.seed)
    opt = torch.optim.AdamW(probe.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.1)
    started = time.perf_counter()
    probe.train()
    loss_value = float("nan")
    for _ in tqdm(range(config.steps), disable=not progress, desc="probe", unit="step"):
        items = draw()
        x = pixels_to_tensor(render_items(items))
        loss = loss_of(x + config.noise * torch.randn(x.shape, generator=g), items)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_value = float(loss.detach())
    probe.eval().requires_grad_(False)
    return {"steps": config.steps, "seconds": time.perf_counter() - started, "final_loss": loss_value}


def train_probe(config: ProbeConfig = ProbeConfig(), progress: bool = True) -> tuple[WorldProbe, dict[str, Any]]:
    """Train on renders drawn on the fly (random content, random style, random jitter)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = WorldProbe(config)
    rng = np.random.default_rng([config.seed, 11])

    def draw() -> list[tuple[Any, Any, int]]:
        return [(random_content(rng), random_style(rng), int(rng.integers(2**31))) for _ in range(config.batch_size)]

    def loss_of(x: torch.Tensor, items: list[tuple[Any, Any, int]]) -> torch.Tensor:
        _, logits = probe(x)
        targets = [{**labels(c), **labels(s)} for c, s, _ in items]
        return sum(F.cross_entropy(logits[n], torch.tensor([t[n] for t in targets])) for n in ALL_FACTORS)

    return probe, fit_probe(probe, draw, loss_of, render_batch, progress)


def validate_probe(probe: WorldProbe, pairs: int = 400, seed: int = 1234) -> dict[str, float]:
    """The issue's criteria on fresh renders, plus per-factor accuracy.

    own_style_wins: a render in the user's style scores higher alignment (to that user) than the
    same prompt rendered in another user's (different) style; own_prompt_wins: a render of the
    prompt scores higher text consistency (to that prompt) than a render of another prompt in the
    same style. Both must be at least 0.95.
    """
    rng = np.random.default_rng([seed, 13])
    own, other_style, contents, styles, other_content = [], [], [], [], []
    for _ in range(pairs):
        c, s = random_content(rng), random_style(rng)
        s2 = random_style(rng)
        while s2 == s:
            s2 = random_style(rng)
        c2 = random_content(rng)
        while c2 == c:
            c2 = random_content(rng)
        k = int(rng.integers(2**31))
        own.append(render(c, s, k))
        other_style.append(render(c, s2, k + 1))
        other_content.append(render(c2, s, k + 2))
        contents.append(c)
        styles.append(s)
    own_a, other_s, other_c = np.stack(own), np.stack(other_style), np.stack(other_content)
    align_own, align_other = probe.preference_alignment(own_a, styles), probe.preference_alignment(other_s, styles)
    text_own, text_other = probe.text_consistency(own_a, contents), probe.text_consistency(other_c, contents)
    _, probs = probe.read(own_a)
    acc = {
        f"accuracy_{k}": float(
            (probs[k].argmax(-1) == torch.tensor([{**labels(c), **labels(s)}[k] for c, s in zip(contents, styles)]))
            .float()
            .mean()
        )
        for k in ALL_FACTORS
    }
    return {
        "own_style_wins": float((align_own > align_other).float().mean()),
        "own_prompt_wins": float((text_own > text_other).float().mean()),
        "alignment_own": float(align_own.mean()),
        "alignment_other": float(align_other.mean()),
        "text_own": float(text_own.mean()),
        "text_other": float(text_other.mean()),
        **acc,
    }


__all__ = ["WorldProbe", "ProbeConfig", "train_probe", "validate_probe", "CONTENT_FACTORS", "STYLE_FACTORS"]
