"""What per-token modulation costs per denoising step, and what computing the adapters once saves.

Times one transformer step of a mid-size FLUX-architecture model for
  plain     stock diffusers FluxTransformer2DModel, no users;
  premier   PremierTransformer with deltas precomputed once per request (this project);
  reference the reference release's way: both adapters re-run inside every step, then premier;
at batch 1 and 8 (a different user per sample) and two text lengths, and writes the ratios
to plain in JSON. It also counts FLOPs per step of the FLUX.1-dev-sized configuration on the
meta device (no weights, no memory), which says what the measured ratios become at full scale. Run: `python benchmarks/modulation_overhead.py` (add `--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import interleaved, write_result  # noqa: E402
from premier.adapters import PremierAdapters  # noqa: E402
from premier.config import PremierConfig  # noqa: E402
from premier.transformer import PremierTransformer  # noqa: E402

MID = dict(
    inner_heads=8,
    head_dim=64,
    num_layers=4,
    num_single_layers=8,
    text_dim=1024,
    image_grid=16,
    user_tokens=30,
    user_dim=256,
    adapter_width=512,
    adapter_heads=8,
)
QUICK = dict(
    inner_heads=2,
    head_dim=32,
    num_layers=1,
    num_single_layers=2,
    text_dim=64,
    image_grid=4,
    user_tokens=4,
    user_dim=16,
    adapter_width=32,
    adapter_heads=2,
)


def build(size: dict):
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=size["num_layers"],
        num_single_layers=size["num_single_layers"],
        attention_head_dim=size["head_dim"],
        num_attention_heads=size["inner_heads"],
        joint_attention_dim=size["text_dim"],
        pooled_projection_dim=768,
        guidance_embeds=True,
        axes_dims_rope=(size["head_dim"] // 4, 3 * size["head_dim"] // 8, 3 * size["head_dim"] // 8),
    ).eval()
    config = PremierConfig.for_transformer(
        flux.config,
        num_user_tokens=size["user_tokens"],
        user_dim=size["user_dim"],
        adapter_width=size["adapter_width"],
        adapter_heads=size["adapter_heads"],
    )
    return flux, PremierTransformer(flux, config), PremierAdapters(config).eval(), config


def inputs_for(flux, config: PremierConfig, size: dict, batch: int, text_len: int):
    g = torch.Generator().manual_seed(1)
    grid = size["image_grid"]
    ids = torch.stack(
        torch.meshgrid(torch.zeros(1), torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij"), -1
    ).reshape(-1, 3)
    step = dict(
        hidden_states=torch.randn(batch, grid * grid, 64, generator=g),
        encoder_hidden_states=torch.randn(batch, text_len, config.text_dim, generator=g),
        pooled_projections=torch.randn(batch, 768, generator=g),
        timestep=torch.full((batch,), 0.5),
        img_ids=ids,
        txt_ids=torch.zeros(text_len, 3),
        guidance=torch.full((batch,), 3.5),
    )
    users = torch.rand(batch, config.num_user_tokens, config.user_dim, generator=g) * 0.2 - 0.1
    return step, users


def run(size: dict, batches: list[int], text_lens: list[int], repeats: int) -> list[dict]:
    flux, premier, adapters, config = build(size)
    rows = []
    for text_len in text_lens:
        for batch in batches:
            step, users = inputs_for(flux, config, size, batch, text_len)
            with torch.inference_mode():
                deltas = adapters.text_deltas(step["encoder_hidden_states"], users)

                def plain():
                    return flux(**step, return_dict=False)[0]

                def ours():
                    return premier(**step, text_deltas=deltas)

                def reference():
                    return premier(**step, text_deltas=adapters.text_deltas(step["encoder_hidden_states"], users))

                def adapters_only():
                    return adapters.text_deltas(step["encoder_hidden_states"], users)

                t = interleaved(
                    {"plain": plain, "premier": ours, "reference": reference, "adapters": adapters_only},
                    repeats=repeats,
                )
            base = t["plain"]["median_s"]
            rows.append(
                {
                    "batch": batch,
                    "text_tokens": text_len,
                    "image_tokens": size["image_grid"] ** 2,
                    "plain_s": base,
                    "premier_s": t["premier"]["median_s"],
                    "reference_s": t["reference"]["median_s"],
                    "adapters_once_s": t["adapters"]["median_s"],
                    "premier_over_plain": t["premier"]["median_s"] / base,
                    "reference_over_plain": t["reference"]["median_s"] / base,
                    "reference_over_premier": t["reference"]["median_s"] / t["premier"]["median_s"],
                    "timings": t,
                }
            )
            print(
                f"T={text_len:4d} B={batch}: plain {base * 1e3:8.1f} ms | premier x{rows[-1]['premier_over_plain']:.3f} "
                f"| reference (adapters every step) x{rows[-1]['reference_over_plain']:.3f}"
            )
    return rows


def count_flops(flux_kwargs: dict, premier: PremierConfig | None, text_len: int, image_tokens: int) -> dict:
    """FLOPs of one step (batch 1) for plain, premier and the adapters, counted on the meta device."""

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    with torch.device("meta"), torch.inference_mode():
        flux = FluxTransformer2DModel(**flux_kwargs)
        config = premier or PremierConfig.for_transformer(flux.config)
        model, adapters = PremierTransformer(flux, config), PremierAdapters(config)
        c = flux.config
        step = dict(
            hidden_states=torch.empty(1, image_tokens, c.in_channels),
            encoder_hidden_states=torch.empty(1, text_len, c.joint_attention_dim),
            pooled_projections=torch.empty(1, c.pooled_projection_dim),
            timestep=torch.empty(1),
            img_ids=torch.empty(image_tokens, 3),
            txt_ids=torch.empty(text_len, 3),
            guidance=torch.empty(1) if c.guidance_embeds else None,
        )
        users = torch.empty(1, config.num_user_tokens, config.user_dim)
        deltas = torch.empty(1, config.num_modulated_blocks, text_len, config.inner_dim)
        plain = flops(lambda: flux(**step, return_dict=False))
        ours = flops(lambda: model(**step, text_deltas=deltas))
        adapter = flops(lambda: adapters.text_deltas(step["encoder_hidden_states"], users))
    return {
        "text_tokens": text_len,
        "image_tokens": image_tokens,
        "plain_tflop": plain / 1e12,
        "premier_tflop": ours / 1e12,
        "adapters_tflop": adapter / 1e12,
        "premier_over_plain": ours / plain,
        "reference_over_plain": (ours + adapter) / plain,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/modulation_overhead.json)")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else MID
    rows = run(
        size,
        [1, 8] if not args.quick else [1, 2],
        [64, 256] if not args.quick else [8],
        1 if args.quick else args.repeats,
    )
    if args.quick:
        flop_rows = [
            count_flops(
                dict(
                    num_layers=1,
                    num_single_layers=1,
                    attention_head_dim=16,
                    num_attention_heads=2,
                    joint_attention_dim=32,
                    pooled_projection_dim=16,
                    guidance_embeds=True,
                    axes_dims_rope=(4, 6, 6),
                ),
                PremierConfig(
                    inner_dim=32,
                    text_dim=32,
                    num_user_tokens=2,
                    user_dim=8,
                    adapter_width=16,
                    adapter_heads=2,
                    double_blocks=(0,),
                ),
                8,
                16,
            )
        ]
    else:  # FLUX.1-dev with the reference Premier config, 1024x1024 and 512x512, 512 text tokens
        flop_rows = [count_flops(dict(guidance_embeds=True), PremierConfig(), 512, n) for n in (4096, 1024)]
    for r in flop_rows:
        print(
            f"FLOPs/step at {r['image_tokens']} image tokens: plain {r['plain_tflop']:.2f} T | premier "
            f"x{r['premier_over_plain']:.4f} | reference x{r['reference_over_plain']:.4f}"
        )
    payload = {"config": {"size": size, "quick": args.quick}, "results": rows, "flops_flux_dev_sized": flop_rows}
    path = write_result("modulation_overhead" + ("_quick" if args.quick else ""), payload, args.out)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
