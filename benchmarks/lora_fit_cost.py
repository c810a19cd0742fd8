"""Premier vs per-user LoRA, fitting: steps and wall time to the same held-out loss, from the same images.

For held-out users of the synthetic world, each method fits the user's first `--images` history
images with stage 2's loop (`premier.training.fit_loop`) and the world's stage-2 configuration,
except that one image (the same for all, from the seed) is held out and its flow-matching loss at
fixed draws is evaluated every `--eval-every` steps for `--steps` steps, without stopping early:

  premier-lc       linear combination of the training users (Premier's default);
  premier-direct   the user embedding itself, from the mean training user;
  lora-r4/-r16     a LoRA on the attention projections (`premier.lora.fit_lora`), from the base model.

Per user the target is the lowest held-out loss that every method reaches (the worst method's best);
reported per method: the steps to first reach it and their share of the fit's wall time (evaluations
included), the best held-out loss, and the user's size (parameters; LoRA: bytes of its file). Medians over users are in `summary`.

Run: `python benchmarks/lora_fit_cost.py` (~10 min on 2 cores), `--quick`. Writes JSON (`--out`,
default benchmarks/results/<machine>/lora_fit_cost.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result  # noqa: E402

FULL = dict(users=4, images=8, steps=300, eval_every=10, ranks=[4, 16])
QUICK = dict(users=1, images=4, steps=20, eval_every=5, ranks=[4])


def curves(history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    return [(h["step"], h["held_out"]) for h in history if "held_out" in h]


def first_reaching(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((step for step, loss in curve if loss <= target), None)


def run(cfg: dict[str, Any], world: str | None, log=print) -> dict[str, Any]:
    from premier.lora import fit_lora, save_lora
    from premier.training.stage2 import fit_user
    from premier.world.evaluate import EvalConfig, Evaluator
    from premier.world.stages import encode_user

    with tempfile.TemporaryDirectory(prefix="premier-fitcost-") as tmp:
        from premier.models.embedded import ASSETS

        ev = Evaluator(world or ASSETS, tmp, EvalConfig(test_users=cfg["users"], sweep_users=1), log=log)
        premier, ckpt = ev.checkpoint("premier")
        config = replace(
            ev.stage2,
            steps=cfg["steps"],
            eval_every=cfg["eval_every"],
            early_stop=True,
            holdout_min_images=2,
            patience=10**9,
        )
        users = []
        for user in ev.users:
            samples = encode_user(ev.encoder, user, cfg["images"])
            fits: dict[str, Any] = {}
            for mode, name in (("coefficients", "premier-lc"), ("direct", "premier-direct")):
                r = fit_user(
                    ev.flux_pipe.transformer,
                    premier,
                    ckpt,
                    samples,
                    user.user_id,
                    replace(config, mode=mode),
                    progress=False,
                )
                size = r.record.vector.numel()
                fits[name] = {"curve": curves(r.history), "seconds": r.record.fit["seconds"], "parameters": size}
            for rank in cfg["ranks"]:
                r = fit_lora(ev.flux_pipe.transformer, samples, user.user_id, rank, config)
                path = save_lora(Path(tmp) / f"{user.user_id}-r{rank}", r)
                fits[f"lora-r{rank}"] = {
                    "curve": curves(r.history),
                    "seconds": r.fit["seconds"],
                    "parameters": r.parameters,
                    "file_bytes": path.stat().st_size,
                }
            target = max(min(loss for _, loss in f["curve"]) for f in fits.values())
            for f in fits.values():
                step = first_reaching(f["curve"], target)
                f["best_held_out"] = min(loss for _, loss in f["curve"])
                f["steps_to_target"] = step
                f["seconds_to_target"] = None if step is None else round(f["seconds"] * step / cfg["steps"], 3)
            users.append({"user_id": user.user_id, "target_held_out": target, "fits": fits})
            log(
                f"{user.user_id}: target {target:.4f}; "
                + ", ".join(f"{m} {f['steps_to_target']} steps" for m, f in fits.items())
            )
    methods = list(users[0]["fits"])
    summary = {
        m: {
            "median_steps_to_target": statistics.median(u["fits"][m]["steps_to_target"] for u in users),
            "median_seconds_to_target": statistics.median(u["fits"][m]["seconds_to_target"] for u in users),
            "median_seconds_per_step": statistics.median(u["fits"][m]["seconds"] / cfg["steps"] for u in users),
            "median_best_held_out": statistics.median(u["fits"][m]["best_held_out"] for u in users),
            "parameters_per_user": users[0]["fits"][m]["parameters"],
        }
        for m in methods
    }
    return {"users": users, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one user, 4 images, 20 steps, rank 4")
    ap.add_argument("--world", help="a built world folder (default: the shipped one)")
    ap.add_argument("--users", type=int, help="held-out users (default 4)")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/lora_fit_cost.json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.users:
        cfg["users"] = args.users
    result = run(cfg, args.world)
    path = write_result("lora_fit_cost" + ("_quick" if args.quick else ""), {"config": cfg, **result}, args.out)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
