"""World v2's metric probe: content classifiers as in v1, and a regression head per continuous style factor.

From it, for an image and a target style (the user's taste for that prompt, `Taste.target`):

- alignment per factor: exp(-d^2 / (2 TOLERANCE^2)) with d the distance between the factor the
  probe reads and the target's (circular factors the short way round), in [0, 1]; an image at the
  user's taste scores about 0.85 per factor (its own scatter), another user's style near 0;
- preference alignment: the mean over the seven factors;
- text consistency and the feature distance: as in v1 (probe.py).

Trained on renders drawn on the fly: half population tastes (with the images' scatter), half styles
uniform over the factor cube, so the probe reads the `outside` test users too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from premier.world.base_train import pixels_to_tensor
from premier.world.probe import ProbeConfig, ProbeFile, _mean_level_probability, fit_probe, probe_body
from premier.world.spec import CONTENT_FACTORS, Content, labels
from premier.world.v2 import CIRCULAR, FACTORS, PopulationV2, Style2, factor_distance, render_batch

TOLERANCE = 0.1
"""The factor distance at which a factor's alignment is exp(-1/2): a tenth of the factor's range."""


_LINEAR_COLUMNS = torch.tensor([f not in CIRCULAR for f in FACTORS for _ in range(2 if f in CIRCULAR else 1)])


class WorldProbeV2(ProbeFile):
    FORMAT = "premier-world-probe-v2"

    def __init__(self, config: ProbeConfig = ProbeConfig()):
        super().__init__()
        self.config = config
        self.body = probe_body(config)
        self.heads = nn.ModuleDict({n: nn.Linear(config.features, len(v)) for n, v in CONTENT_FACTORS.items()})
        self.style_head = nn.Linear(config.features, sum(2 if f in CIRCULAR else 1 for f in FACTORS))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        f = self.body(x)
        return f, {n: h(f) for n, h in self.heads.items()}, self.style_head(f)

    @staticmethod
    def decode(raw: torch.Tensor) -> torch.Tensor:
        """Style-head outputs -> factor values (B, 7) in [0, 1]: (cos, sin) pairs for the circular factors."""
        out, i = [], 0
        for f in FACTORS:
            if f in CIRCULAR:
                out.append((torch.atan2(raw[:, i + 1], raw[:, i]) / (2 * math.pi)) % 1.0)
                i += 2
            else:
                out.append(raw[:, i].sigmoid())
                i += 1
        return torch.stack(out, dim=1)

    @staticmethod
    def encode(values: torch.Tensor) -> torch.Tensor:
        """Factor values (B, 7) -> what the style head is trained to output (the inverse of `decode`'s read)."""
        out = []
        for j, f in enumerate(FACTORS):
            if f in CIRCULAR:
                angle = 2 * math.pi * values[:, j]
                out += [angle.cos(), angle.sin()]
            else:
                out.append(values[:, j])
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def read(self, images: np.ndarray, batch: int = 512) -> tuple[torch.Tensor, dict[str, Any]]:
        """(B, H, W, 3) uint8 -> (unit features (B, F), {content factor: probabilities, "style": values (B, 7)})."""
        self.eval()
        feats, probs, styles = [], {k: [] for k in CONTENT_FACTORS}, []
        for i in range(0, len(images), batch):
            f, logits, raw = self(pixels_to_tensor(images[i : i + batch]))
            feats.append(F.normalize(f, dim=-1))
            for k, v in logits.items():
                probs[k].append(v.softmax(-1))
            styles.append(self.decode(raw))
        return torch.cat(feats), {**{k: torch.cat(v) for k, v in probs.items()}, "style": torch.cat(styles)}

    def styles(self, images: np.ndarray) -> np.ndarray:
        """The factor values the probe reads, (B, 7)."""
        return self.read(images)[1]["style"].numpy()

    def factor_alignment(self, images: np.ndarray, targets: list[Style2]) -> dict[str, torch.Tensor]:
        d = factor_distance(self.styles(images), np.stack([t.vector() for t in targets]))
        scores = torch.from_numpy(np.exp(-0.5 * (d / TOLERANCE) ** 2)).float()
        return {f: scores[:, j] for j, f in enumerate(FACTORS)}

    def preference_alignment(self, images: np.ndarray, targets: list[Style2]) -> torch.Tensor:
        return torch.stack(list(self.factor_alignment(images, targets).values()), dim=1).mean(1)

    def text_consistency(self, images: np.ndarray, contents: list[Content]) -> torch.Tensor:
        _, probs = self.read(images)
        return _mean_level_probability(probs, contents)


def train_probe_v2(
    population: PopulationV2, config: ProbeConfig = ProbeConfig(), progress: bool = True
) -> tuple[WorldProbeV2, dict[str, Any]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = WorldProbeV2(config)
    rng = np.random.default_rng([config.seed, 17])

    def loss_of(x: torch.Tensor, items: list[tuple[Content, Style2, int]]) -> torch.Tensor:
        _, logits, raw = probe(x)
        loss = sum(
            F.cross_entropy(logits[n], torch.tensor([labels(c)[n] for c, _, _ in items])) for n in CONTENT_FACTORS
        )
        target = probe.encode(torch.tensor(np.stack([s.vector() for _, s, _ in items]), dtype=torch.float32))
        pred = torch.where(_LINEAR_COLUMNS, raw.sigmoid(), raw)  # circular factors: (cos, sin) regressed as is
        return loss + 10.0 * F.mse_loss(pred, target)

    info = fit_probe(
        probe, lambda: population.random_items(rng, config.batch_size, uniform=0.5), loss_of, render_batch, progress
    )
    return probe, info


def validate_probe_v2(
    probe: WorldProbeV2, population: PopulationV2, pairs: int = 400, seed: int = 1234
) -> dict[str, float]:
    """v1's pair criteria on fresh renders of population tastes (own style beats another user's, own prompt
    beats another prompt), plus each factor's mean absolute reading error."""
    rng = np.random.default_rng([seed, 19])
    own, other, wrong_prompt = population.random_items(rng, pairs), population.random_items(rng, pairs), []
    for (c, s, k), (c2, _, _) in zip(own, other):
        while c2 == c:
            c2 = population.random_items(rng, 1)[0][0]
        wrong_prompt.append((c2, s, k + 2))
    own_a = render_batch(own)
    other_a = render_batch([(c, s2, k + 1) for (c, _, k), (_, s2, _) in zip(own, other)])
    targets = [s for _, s, _ in own]
    contents = [c for c, _, _ in own]
    align_own, align_other = probe.preference_alignment(own_a, targets), probe.preference_alignment(other_a, targets)
    text_own = probe.text_consistency(own_a, contents)
    text_other = probe.text_consistency(render_batch(wrong_prompt), contents)
    err = factor_distance(probe.styles(own_a), np.stack([t.vector() for t in targets])).mean(0)
    return {
        "own_style_wins": float((align_own > align_other).float().mean()),
        "own_prompt_wins": float((text_own > text_other).float().mean()),
        "alignment_own": float(align_own.mean()),
        "alignment_other": float(align_other.mean()),
        "text_own": float(text_own.mean()),
        "text_other": float(text_other.mean()),
        **{f"error_{f}": round(float(e), 4) for f, e in zip(FACTORS, err)},
    }


__all__ = ["TOLERANCE", "WorldProbeV2", "train_probe_v2", "validate_probe_v2"]
