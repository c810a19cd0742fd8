"""Stage-2 fitting speed: steps per second, peak memory, and how a step grows with images and basis size.

For the embedded model and a mid-size FLUX-architecture configuration (the one
modulation_overhead.py uses), on random latents and text states of the right shapes:
  - a stage-2 step (batch 2, coefficients and direct mode) against the same transformer's
    plain forward at batch 2 without gradients, measured in the same run (the ratio is what a
    fit step costs in forwards);
  - peak resident memory of a fit above what the process held before it (CPU: VmHWM);
  - time per step with 1..64 images (held-out evaluation every 10 steps included) and with
    4..1000 basis users.
Run: `python benchmarks/fit_speed.py` (`--quick` for a smoke run). Writes JSON.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import time_fn, write_result  # noqa: E402
from benchmarks.modulation_overhead import MID, QUICK, build  # noqa: E402
from premier.checkpoint import PremierModel  # noqa: E402
from premier.config import PremierConfig  # noqa: E402
from premier.training.config import OptimConfig, Stage2Config  # noqa: E402
from premier.training.prepared import Batch  # noqa: E402
from premier.training.stage2 import fit_user  # noqa: E402

CKPT = "0" * 64  # fitting needs an id to record; these models are never saved


def _status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM: peak resident, VmRSS: current), in MiB."""
    try:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024  # type: ignore[union-attr]
    except (OSError, AttributeError):
        return None


def _reset_peak() -> bool:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def models(name: str) -> dict[str, Any]:
    """(flux, premier config, latent shape (C, h, w), text length, pooled width) of a named configuration."""
    if name == "embedded":
        from premier.models.embedded import build_embedded_flux, embedded_premier_config

        flux = build_embedded_flux().transformer
        c = flux.config
        return dict(
            flux=flux,
            config=embedded_premier_config(),
            latent=(c.in_channels // 4, 16, 16),
            text_len=64,
            pooled=c.pooled_projection_dim,
            image_px=128,
        )
    size = MID if name == "mid" else QUICK
    flux, _, _, config = build(size)
    grid = size["image_grid"]
    return dict(
        flux=flux,
        config=config,
        latent=(16, 2 * grid, 2 * grid),
        text_len=256 if name == "mid" else 8,
        pooled=768,
        image_px=16 * grid,
    )


def samples(m: dict[str, Any], n: int, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cfg: PremierConfig = m["config"]
    return Batch(
        torch.randn(n, *m["latent"], generator=g),
        torch.randn(n, m["text_len"], cfg.text_dim, generator=g),
        torch.randn(n, m["pooled"], generator=g),
        torch.zeros(n, dtype=torch.long),
    )


def premier_model(cfg: PremierConfig, k: int) -> PremierModel:
    torch.manual_seed(0)
    return PremierModel(cfg, [f"u{i}" for i in range(k)]).eval()


FIT_REPEATS = 3  # fits for the main measurements (median reported; the machines are noisy); sweeps fit once


def fit_seconds_per_step(
    m: dict[str, Any], premier: PremierModel, data: Batch, steps: int, fits: int = 1, **cfg: Any
) -> dict[str, float]:
    config = Stage2Config(steps=steps, batch_size=2, optim=OptimConfig("prodigy", lr=1.0, weight_decay=0.0), **cfg)
    per_step, peaks, above = [], [], []
    for _ in range(fits):
        before = _status_mib("VmRSS")
        _reset_peak()
        result = fit_user(m["flux"], premier, CKPT, data, "bench", config, progress=False)
        peak = (torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else _status_mib("VmHWM")
        per_step.append(result.record.fit["seconds"] / result.record.fit["steps"])
        peaks.append(peak or 0.0)
        above.append((peak - before) if (peak and before and not torch.cuda.is_available()) else 0.0)
    s = statistics.median(per_step)
    return {
        "steps": result.record.fit["steps"],
        "s_per_step": s,
        "s_per_step_min": min(per_step),
        "s_per_step_max": max(per_step),
        "steps_per_s": 1 / s,
        "fits": fits,
        "peak_mem_mib": max(peaks),
        "peak_above_start_mib": max(above),
    }


def run_config(name: str, steps: int, repeats: int, image_counts: list[int], basis_sizes: list[int]) -> dict[str, Any]:
    m = models(name)
    flux, cfg = m["flux"], m["config"]
    k_default = 64
    premier = premier_model(cfg, k_default)
    data = samples(m, 8)
    no_holdout = dict(early_stop=False)

    # Baseline: the same transformer's plain forward at batch 2, no gradients, same run.
    from diffusers import FluxPipeline

    b = data.latents[:2]
    c, h, w = m["latent"]
    fwd = dict(
        hidden_states=FluxPipeline._pack_latents(b, 2, c, h, w),
        encoder_hidden_states=data.text[:2],
        pooled_projections=data.pooled[:2],
        timestep=torch.full((2,), 0.5),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32),
        txt_ids=torch.zeros(m["text_len"], 3),
        guidance=torch.full((2,), 1.0) if flux.config.guidance_embeds else None,
    )
    with torch.inference_mode():
        plain = time_fn(lambda: flux(**fwd, return_dict=False), repeats=repeats)

    fit_speed = fit_seconds_per_step(m, premier, data, steps, fits=FIT_REPEATS, **no_holdout)
    direct = fit_seconds_per_step(m, premier, data, steps, fits=FIT_REPEATS, mode="direct", **no_holdout)
    by_images = [
        dict(
            images=n,
            **fit_seconds_per_step(
                m, premier, samples(m, n), steps, eval_every=10, early_stop=True, holdout_min_images=4
            ),
        )
        for n in image_counts
    ]
    by_basis = [
        dict(basis_users=k, **fit_seconds_per_step(m, premier_model(cfg, k), data, steps, **no_holdout))
        for k in basis_sizes
    ]
    row = {
        "config": name,
        "image_px": m["image_px"],
        "text_tokens": m["text_len"],
        "user_shape": list(cfg.user_shape),
        "basis_users": k_default,
        "plain_forward_batch2_s": plain["median_s"],
        "coefficients": fit_speed,
        "direct": direct,
        "step_over_plain_forward": fit_speed["s_per_step"] / plain["median_s"],
        "by_images": by_images,
        "by_basis_users": by_basis,
    }
    print(
        f"{name}: {fit_speed['steps_per_s']:.2f} steps/s (x{row['step_over_plain_forward']:.2f} a plain forward), "
        f"direct {direct['steps_per_s']:.2f} steps/s, peak +{fit_speed['peak_above_start_mib'] or 0:.0f} MiB"
    )
    for r in by_images:
        print(f"  images {r['images']:>4}: {r['s_per_step'] * 1000:.1f} ms/step")
    for r in by_basis:
        print(f"  basis  {r['basis_users']:>4}: {r['s_per_step'] * 1000:.1f} ms/step")
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, few steps (a smoke test)")
    ap.add_argument("--steps", type=int, default=20, help="fitting steps per measurement (default 20)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--configs", default="embedded,mid", help="comma-separated: embedded, mid")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/fit_speed.json)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    global FIT_REPEATS
    if args.quick:
        FIT_REPEATS = 1
        rows = [run_config("quick", 4, 1, [1, 4], [4, 16])]
    else:
        rows = [
            run_config(n, args.steps, args.repeats, [1, 4, 16, 64], [4, 64, 256, 1000]) for n in args.configs.split(",")
        ]
    payload = {
        "config": {
            "quick": args.quick,
            "steps": 4 if args.quick else args.steps,
            "batch_size": 2,
            "optimizer": "prodigy",
        },
        "results": rows,
    }
    path = write_result("fit_speed" + ("_quick" if args.quick else ""), payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
