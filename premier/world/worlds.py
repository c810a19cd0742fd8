"""The two synthetic worlds behind one interface: what the build, the probe and `premier world show` ask of a world.

v1 (spec.py, users.py, render.py, probe.py): discrete styles, one per user, shown whole in every image; the
shipped default. v2 (v2.py, probe_v2.py): tastes as distributions over continuous factors from a population
latent, prompt-dependent, with off-taste history images and per-user prompt subsets. A world's configuration
dict says which it is (`version`, absent in v1's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from premier.errors import InvalidRequestError

WORLDS = ("v1", "v2")
WorldSpec = Any  # WorldConfig | WorldV2Config


@dataclass(frozen=True)
class World:
    """A world's users, renders and probe, from its configuration."""

    version: str
    config: WorldSpec
    training_users: Callable[[], list]
    held_out_users: Callable[[], list]
    demo_users: Callable[[], list]
    random_items: Callable[[np.random.Generator, int], list]  # (content, style, jitter seed) draws
    render_batch: Callable[[list], np.ndarray]
    render: Callable[..., np.ndarray]  # (content, style, seed=0, jitter=True) -> (H, W, 3) uint8
    train_probe: Callable[..., tuple[Any, dict[str, Any]]]  # (ProbeConfig, progress) -> (probe, info)
    validate_probe: Callable[..., dict[str, float]]  # (probe, pairs, seed) -> criteria

    def write_training_data(self, root: str | Path) -> Path:
        """The training users' histories in the raw dataset format (`premier data prepare` reads it)."""
        from premier.world.users import write_histories

        return write_histories(self.training_users(), root)


def world_of(config: WorldSpec) -> World:
    """The world a configuration describes (checked)."""
    config.check()
    if getattr(config, "version", "v1") == "v2":
        from premier.world import v2
        from premier.world.probe_v2 import train_probe_v2, validate_probe_v2

        pop = v2.PopulationV2(config)
        return World(
            "v2",
            config,
            pop.training_users,
            pop.held_out_users,
            pop.demo_users,
            pop.random_items,
            v2.render_batch,
            v2.render,
            lambda probe_config, progress=True: train_probe_v2(pop, probe_config, progress),
            lambda probe, pairs=400, seed=1234: validate_probe_v2(probe, pop, pairs, seed),
        )
    from premier.world import probe, render, spec, users

    def random_items(rng: np.random.Generator, n: int) -> list:
        return [(spec.random_content(rng), spec.random_style(rng), int(rng.integers(2**31))) for _ in range(n)]

    return World(
        "v1",
        config,
        lambda: users.training_users(config),
        lambda: users.held_out_users(config),
        lambda: users.demo_users(config),
        random_items,
        render.render_batch,
        render.render,
        probe.train_probe,
        probe.validate_probe,
    )


def load_probe(folder: str | Path) -> Any:
    """The probe in `folder`, of whichever world it was trained for."""
    from premier.world.probe import WorldProbe, read_probe
    from premier.world.probe_v2 import WorldProbeV2

    _, meta = read_probe(folder)
    for cls in (WorldProbe, WorldProbeV2):
        if meta.get("format") == cls.FORMAT:
            return cls.load(folder)
    raise InvalidRequestError(
        "probe", f"{Path(folder) / 'probe.safetensors'} is not a world probe ({meta.get('format')!r})"
    )


def world_config(d: dict[str, Any] | None, version: str | None = None) -> WorldSpec:
    """A world configuration from its dict (world.json's `config.world`), or the version's defaults."""
    from premier.world.users import WorldConfig
    from premier.world.v2 import WorldV2Config

    version = version or (d or {}).get("version", "v1")
    if version not in WORLDS:
        raise InvalidRequestError("world", f"must be one of {', '.join(WORLDS)}, got {version!r}")
    cls = WorldV2Config if version == "v2" else WorldConfig
    values = dict(d or {})
    if version == "v1":
        values.pop("version", None)
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise InvalidRequestError("world", f"unknown {version} world setting(s): {', '.join(unknown)}")
    return cls(**values)


__all__ = ["WORLDS", "World", "load_probe", "world_config", "world_of"]
