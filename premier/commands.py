"""The core commands of `premier`: generate, demo, info.

Heavy layers (torch, diffusers, the pipeline) are imported inside each command so `premier --help`
stays fast. Their errors become exit codes through `premier.errors.exit_code`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from premier.quantize import QUANTIZE_MODES


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="PATH", help="local diffusers FLUX folder (default: the embedded tiny model)")
    g.add_argument(
        "--checkpoint", metavar="DIR", help="Premier checkpoint folder (default: the embedded demo checkpoint)"
    )
    g.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    g.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on GPU, float32 on CPU"
    )
    g.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        choices=["regional", "full"],
        help="torch.compile the transformer: 'regional' (default; per repeated block, short start-up) or 'full'",
    )
    g.add_argument(
        "--quantize", choices=QUANTIZE_MODES, help="torchao weight-only quantization of the FLUX block weights"
    )


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults depend on the model)")
    g.add_argument("--steps", type=int, help="denoising steps")
    g.add_argument(
        "--height", type=int, help="image height in pixels (a multiple of 16 for FLUX, of 4 for the embedded model)"
    )
    g.add_argument(
        "--width", type=int, help="image width in pixels (a multiple of 16 for FLUX, of 4 for the embedded model)"
    )
    g.add_argument("--guidance", type=float, help="FLUX distilled guidance scale")


def _load_pipeline(args: argparse.Namespace):
    import torch

    from premier.pipeline import PremierPipeline

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return PremierPipeline.load(
        model=args.model,
        checkpoint=args.checkpoint,
        device=args.device,
        dtype=dtype,
        compile=getattr(args, "compile", None),
        quantize=getattr(args, "quantize", None),
    )


def _settings(pipe, args: argparse.Namespace):
    return pipe.default_settings(height=args.height, width=args.width, steps=args.steps, guidance=args.guidance)


# ----------------------------------------------------------------------------- commands
def cmd_generate(args: argparse.Namespace) -> int:
    from premier.requests import GenerationRequest

    pipe = _load_pipeline(args)
    user = None if args.user in (None, "", "none") else args.user
    result = pipe(
        [GenerationRequest(args.prompt, _demo_users(args).get(user, user), args.seed)], _settings(pipe, args)
    )[0]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    t = result.timings
    print(
        f"wrote {out} ({result.image.width}x{result.image.height}, user={user or 'none'}, seed={args.seed}, "
        f"{t['total_s']:.2f}s)"
    )
    return 0


def _demo_users(args: argparse.Namespace) -> dict:
    """The embedded model's fitted demo users (id -> embedding) when it runs with its own checkpoint.

    They are stage-2 records over the checkpoint's training users, not rows of its table, so they
    are materialised here, as the user store does when serving them.
    """
    if args.model is not None or args.checkpoint is not None:
        return {}
    from premier.models.embedded import build_embedded_premier, embedded_demo_records

    basis = build_embedded_premier()
    ckpt = basis.checkpoint_id()
    return {r.user_id: r.materialise(basis.users, ckpt) for r in embedded_demo_records() if r.checkpoint_id == ckpt}


def cmd_demo(args: argparse.Namespace) -> int:
    from PIL import Image

    from premier.models.embedded import DEMO_PROMPTS
    from premier.requests import GenerationRequest

    pipe = _load_pipeline(args)
    named = _demo_users(args)
    users = args.users.split(",") if args.users else (list(named) or pipe.user_ids)
    users = [None if u == "none" else u for u in users] + ([None] if args.with_plain else [])
    prompts = args.prompts or list(DEMO_PROMPTS)
    requests = [GenerationRequest(p, named.get(u, u), args.seed) for p in prompts for u in users]
    settings = _settings(pipe, args)
    results = pipe(requests, settings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sheet = Image.new("RGB", (settings.width * len(users), settings.height * len(prompts)))
    written = []
    for k, res in enumerate(results):
        i, j = divmod(k, len(users))
        path = out / f"prompt{i}_{users[j] or 'none'}.png"
        res.image.save(path)
        written.append(path)
        sheet.paste(res.image, (j * settings.width, i * settings.height))
    sheet_path = out / "contact_sheet.png"
    sheet.save(sheet_path)
    t = results[0].timings
    print(
        f"generated {len(results)} images ({len(prompts)} prompts x {len(users)} users) in one batch "
        f"of {len(results)}: {t['total_s']:.2f}s ({settings.steps} steps, {settings.width}x{settings.height})"
    )
    print("users: " + ", ".join(u or "none (plain FLUX)" for u in users))
    for i, p in enumerate(prompts):
        print(f"prompt{i}: {p}")
    print(f"images in {out.resolve()}/ (rows: prompts, columns: users): {sheet_path.resolve()}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from premier.info import model_info, reference_info

    info = reference_info() if args.reference else model_info(_load_pipeline(args))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key:32s} {value:,}" if isinstance(value, int) else f"{key:32s} {value}")
    return 0


# ----------------------------------------------------------------------------- parser
def register(sub: argparse._SubParsersAction) -> None:
    """Add generate, demo and info to the top-level `premier` parser."""
    p = sub.add_parser("generate", help="generate one image for a user", description="Generate one image for a user.")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--user", help="user id in the checkpoint or an embedded demo user ('none' or omitted: plain FLUX)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("-o", "--output", default="out.png", help="output PNG path (default out.png)")
    _add_settings_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "demo",
        help="generate several prompts for several users in one batch",
        description="Generate every prompt for every user in one batched call and write the images and a contact sheet.",
    )
    p.add_argument("--out", default="premier-demo", help="output folder (default premier-demo)")
    p.add_argument(
        "--users",
        help="comma-separated user ids (default: the embedded model's demo users, or every user in the checkpoint)",
    )
    p.add_argument(
        "--prompt", dest="prompts", action="append", help="a prompt (repeatable; default: three demo prompts)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed for every image (default 0)")
    p.add_argument("--no-plain", dest="with_plain", action="store_false", help="leave out the plain-FLUX column")
    _add_settings_args(p)
    _add_model_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "info",
        help="parameter counts, adapter bytes and bytes per user",
        description="Print parameter counts, adapter bytes and bytes per user of a model and checkpoint.",
    )
    p.add_argument(
        "--reference", action="store_true", help="sizes of the reference FLUX.1-dev configuration (no weights)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_model_args(p)
    p.set_defaults(func=cmd_info)
