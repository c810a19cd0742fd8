"""`premier world ...` (build the synthetic world's models, show it, check its probe) and `premier eval`.

Imports nothing heavy at import time (the `premier` command's rule for command modules).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from premier.errors import InvalidRequestError

DEFAULT_WORK = "world-work"


def _default_assets() -> str:
    return str(Path(__file__).resolve().parent.parent / "assets" / "world")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} must list positive integers")
    return values


def cmd_build(args: argparse.Namespace) -> int:
    import torch

    from premier.world.build import STEPS, BuildConfig, build

    torch.set_num_threads(args.threads)
    only = tuple(s for s in args.only.split(",") if s) if args.only else STEPS
    if args.world == "v2":
        config = BuildConfig.quick_v2() if args.quick else BuildConfig.v2()
    else:
        config = BuildConfig.quick() if args.quick else BuildConfig()
    record = build(args.out, args.work, config, only=only, progress=not args.quiet)
    total = sum(s["seconds"] for k, s in record["steps"].items() if k in only)
    print(f"world build: {', '.join(only)} in {total / 60:.1f} min; files in {Path(args.out).resolve()}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """A contact sheet of the world: rows are users (demo users, then training users), columns prompts."""
    import numpy as np
    from PIL import Image

    from premier.world.spec import ALL_CONTENTS
    from premier.world.worlds import world_config, world_of

    world = world_of(world_config({"seed": args.seed}, args.world))
    users = world.demo_users() + world.training_users()[: args.users]
    contents = [
        ALL_CONTENTS[i] for i in np.random.default_rng(args.seed).permutation(len(ALL_CONTENTS))[: args.prompts]
    ]
    # v1: the user's one style; v2: the user's taste for each prompt (its history images scatter around it)
    style = (lambda u, c: u.style) if world.version == "v1" else (lambda u, c: u.taste.target(c))
    rows = [
        np.concatenate([world.render(c, style(u, c), seed=j) for j, c in enumerate(contents)], axis=1) for u in users
    ]
    sheet = np.concatenate(rows, axis=0)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).resize((sheet.shape[1] * args.scale, sheet.shape[0] * args.scale), Image.NEAREST).save(out)
    for u in users:
        print(f"{u.user_id:8s} {u.style.describe()}")
    print("prompts: " + "; ".join(c.prompt for c in contents))
    print(f"wrote {out}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from premier.world.build import PROBE_DIR, read_world
    from premier.world.worlds import load_probe, world_config, world_of

    world = world_of(world_config(read_world(args.world)["config"]["world"]))
    checks = world.validate_probe(load_probe(Path(args.world) / PROBE_DIR), pairs=args.pairs, seed=args.seed)
    print(json.dumps({k: round(v, 4) for k, v in checks.items()}, indent=1))
    ok = checks["own_style_wins"] >= 0.95 and checks["own_prompt_wins"] >= 0.95
    print("probe validation: " + ("PASS" if ok else "FAIL") + " (both pair criteria must be >= 0.95)")
    return 0 if ok else 1


def cmd_eval(args: argparse.Namespace) -> int:
    import time

    import torch

    from premier.world.evaluate import EvalConfig, run_eval

    torch.set_num_threads(args.threads)
    config = EvalConfig.quick() if args.quick else EvalConfig()
    overrides = {
        k: getattr(args, k)
        for k in (
            "test_users",
            "history",
            "sweep",
            "sweep_users",
            "denoise_steps",
            "distinct_users",
            "distinct_prompts",
            "stage1_seed",
            "fit_seed",
        )
        if getattr(args, k) is not None
    }
    if args.variants:
        from premier.world.stages import canonical_variant

        overrides["variants"] = tuple(canonical_variant(v) for v in args.variants.split(",") if v)
    if args.baseline:
        overrides["baselines"] = tuple(args.baseline)
    if args.lora_ranks:
        overrides["lora_ranks"] = tuple(args.lora_ranks)
    from dataclasses import replace

    config = replace(config, **overrides)
    started = time.perf_counter()
    command = (
        "premier " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["eval"] else "premier eval"
    )
    results = run_eval(args.world, args.work, args.docs, config, command, progress=not args.quiet)
    print(f"premier eval: {time.perf_counter() - started:.0f}s; wrote " + ", ".join(results["written"]))
    return 0


def cmd_eval_seeds(args: argparse.Namespace) -> int:
    from premier.world.seeds import combine, write_seeds_report

    runs = []
    for name in args.runs:
        path = Path(name)
        if not path.is_file() or path.stat().st_size > 64 * 2**20:
            raise InvalidRequestError("runs", f"{name} is not an eval.json of at most 64 MiB")
        try:
            runs.append(json.loads(path.read_text()))
            runs[-1]["config"]["test_users"]  # noqa: B018 - the shape `premier eval` writes
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise InvalidRequestError("runs", f"{name} is not an eval.json written by premier eval ({e})") from None
    written = write_seeds_report(combine(runs), args.docs, list(args.runs))
    print("premier eval-seeds: wrote " + ", ".join(str(p) for p in written))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    assets = _default_assets()
    world = subparsers.add_parser(
        "world",
        help="the synthetic preference world: build its models, show it, check its probe",
        description="The synthetic preference world (docs/world.md): procedural prompts and user styles with ground truth.",
    )
    sub = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND")
    sub.required = True

    p = sub.add_parser(
        "build",
        help="regenerate the shipped world models from scratch",
        description="Write the world's data, pretrain the base model, run stage 1, fit the demo users "
        "and train the metric probe (each step's time is recorded in OUT/world.json).",
    )
    p.add_argument("--out", default=assets, help=f"where the shipped files go (default: {assets})")
    p.add_argument("--work", default=DEFAULT_WORK, help=f"scratch folder for data and runs (default: {DEFAULT_WORK})")
    p.add_argument(
        "--only", help="comma-separated subset of steps: data,base,stage1,users,probe (default: all, in order)"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes that run in seconds (a smoke test, not a useful model)"
    )
    p.add_argument(
        "--world",
        choices=["v1", "v2"],
        default="v1",
        help="v1 (default, shipped): discrete styles; v2: tastes as distributions over continuous factors "
        "(docs/world.md)",
    )
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser(
        "show", help="render a contact sheet of users' styles", description="Render users x prompts as one PNG."
    )
    p.add_argument("-o", "--output", default="world.png", help="output PNG (default world.png)")
    p.add_argument(
        "--users", type=_positive_int, default=4, help="training users shown after the demo users (default 4)"
    )
    p.add_argument("--prompts", type=_positive_int, default=6, help="prompts per row (default 6)")
    p.add_argument("--scale", type=_positive_int, default=4, help="pixel scale factor (default 4)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--world", choices=["v1", "v2"], default="v1", help="which world (default v1)")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser(
        "validate-probe",
        help="check the metric probe's pair criteria on fresh renders",
        description="Own style beats another style, own prompt beats another prompt, in >= 95%% of pairs.",
    )
    p.add_argument("--world", default=assets, help=f"built world folder (default: {assets})")
    p.add_argument("--pairs", type=_positive_int, default=400, help="pairs per criterion (default 400)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the fresh renders (default 1234)")
    p.set_defaults(func=cmd_validate)

    p = subparsers.add_parser(
        "eval",
        help="the paper's Table 1/2 and Fig. 6 questions on the world's held-out test users",
        description="Fit held-out test users, generate their test prompts with the base model, Premier and its "
        "ablations, score every image with the probe, and write docs/eval.md and PNG plots.",
    )
    p.add_argument("--world", default=assets, help=f"built world folder (default: {assets})")
    p.add_argument(
        "--work",
        default=DEFAULT_WORK,
        help=f"scratch folder; ablation runs are trained here once (default: {DEFAULT_WORK})",
    )
    p.add_argument("--docs", default="docs", help="where eval.md, eval.json and the plots go (default docs)")
    p.add_argument(
        "--variants",
        help="comma-separated: premier,no_dispersion,no_shared,no_distinct,no_ppm (default: all); a variant may "
        "carry other dispersion settings, each its own stage-1 run: premier:diag, premier:dim:lambda=0.01, "
        "premier:tau=0.5 (forms dim, diag, mean, none)",
    )
    p.add_argument("--test-users", type=_positive_int, help="held-out users to evaluate (default 12, all of them)")
    p.add_argument("--history", type=_positive_int, help="history images per test user (default 8)")
    p.add_argument("--sweep", type=_int_list, help="history sizes for the fitting sweep (default 1,2,4,8,16,32)")
    p.add_argument("--sweep-users", type=_positive_int, help="test users in the sweep (default 4)")
    p.add_argument(
        "--distinct-users",
        type=_positive_int,
        help="Fig. 8 (user distinguishability): the first N test users, at least 2 (default 16, at most --test-users)",
    )
    p.add_argument("--distinct-prompts", type=_positive_int, help="Fig. 8: prompts per user (default 5)")
    p.add_argument(
        "--stage1-seed",
        type=int,
        help="stage 1's seed (default: the world's, whose Premier is the shipped checkpoint; another seed trains "
        "Premier too, into WORK, once)",
    )
    p.add_argument("--fit-seed", type=int, help="stage 2's seed for fitting the test users (default: the world's)")
    p.add_argument(
        "--baseline",
        action="append",
        choices=["lora"],
        help="add a baseline's rows to the sweep: 'lora', a per-user LoRA on the attention projections fitted with "
        "stage 2's loop and budget (repeatable)",
    )
    p.add_argument("--lora-ranks", type=_int_list, help="LoRA ranks of the lora baseline (default 4,16)")
    p.add_argument("--denoise-steps", type=_positive_int, help="denoising steps per image (default 8)")
    p.add_argument("--quick", action="store_true", help="one user, tiny sweep, 2 steps (a smoke test)")
    p.add_argument("--threads", type=_positive_int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = subparsers.add_parser(
        "eval-seeds",
        help="read several `premier eval` runs that differ in their seeds as one result",
        description="Combine eval.json files of runs with different --stage1-seed / --fit-seed: each of the paper's "
        "claims with an interval that resamples stage-1 seeds and test users, labelled reproduced, not reproduced "
        "or within noise (docs/eval_seeds.md).",
    )
    p.add_argument("runs", nargs="+", help="eval.json files of the runs")
    p.add_argument("--docs", default="docs", help="where eval_seeds.md and eval_seeds.json go (default docs)")
    p.set_defaults(func=cmd_eval_seeds)
