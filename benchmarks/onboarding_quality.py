"""Does the fast fit (warm start, convergence stop, batched) keep the full fit's quality? `premier eval`'s row.

On the synthetic world's held-out test users, at 1, 4 and 8 history images: each user is fitted by
the reference loop with the server's default options (`Stage2Config()`: 5,000 steps, Prodigy,
held-out early stopping; what a Ray fit job runs) and by the onboarding path
(`MultiUserFitter` with `Stage2Config.fast()`, all users of a size in the same passes); every
test prompt is generated for each fit and scored by the world's probe (`premier.world.evaluate`).
Reported per size: both alignments with their 95 % intervals over (user, prompt) pairs, the paired
difference (fast - full) with its interval, and the steps and seconds of each fit; under `by_user`
the same with percentile intervals from a bootstrap over test users (the prompts of one user share
its fit, so pairs are not independent: this is the interval the "within" verdict should rest on).

    python -m benchmarks.onboarding_quality --users 4 --sizes 1,4,8
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.common import environment
from premier.files import atomic_save_safetensors, read_safetensors
from premier.training.config import Stage2Config
from premier.training.multifit import MultiUserFitter
from premier.training.stage2 import fit_user
from premier.world.evaluate import EvalConfig, Evaluator
from premier.world.report import per_user, user_bootstrap
from premier.world.stages import encode_user

WORLD = Path(__file__).resolve().parent.parent / "premier" / "assets" / "world"


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95 % interval."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, n - 1))
    return mean, 1.96 * sd / math.sqrt(n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--sizes", default="1,4,8")
    p.add_argument("--full-steps", type=int, default=5000)
    p.add_argument("--out", default="benchmarks/results/cpu-2core/onboarding_quality.json")
    p.add_argument("--work", default="/tmp/premier-onboarding-quality")
    p.add_argument("--fast", default="{}", help="JSON overrides of Stage2Config.fast() (tuning)")
    args = p.parse_args(argv)
    sizes = [int(x) for x in args.sizes.split(",")]
    torch.set_num_threads(1)
    ev = Evaluator(
        WORLD, args.work, EvalConfig(test_users=args.users, history=max(sizes), sweep=tuple(sizes), sweep_users=1)
    )
    premier, ckpt = ev.checkpoint("premier")
    flux = ev.flux_pipe.transformer
    rows = []
    for k in sizes:
        samples = {u.user_id: encode_user(ev.encoder, u, k) for u in ev.users}
        started = time.perf_counter()
        full, full_meta = {}, []
        for u in ev.users:
            cached = Path(args.work) / f"full-{u.user_id}-{k}-{args.full_steps}.safetensors"
            if cached.is_file():  # the reference fits are deterministic: a rerun that tunes the fast path reuses them
                tensors, meta = read_safetensors(cached, RuntimeError)
                full[u.user_id], steps = tensors["tokens"], int(meta["steps"])
                full_meta.append(steps)
                continue
            r = fit_user(
                flux, premier, ckpt, samples[u.user_id], u.user_id, Stage2Config(steps=args.full_steps), progress=False
            )
            full[u.user_id] = r.record.materialise(premier.users, ckpt)
            full_meta.append(r.record.fit["steps"])
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_safetensors({"tokens": full[u.user_id]}, cached, metadata={"steps": str(full_meta[-1])})
        full_s = time.perf_counter() - started
        started = time.perf_counter()
        fitter = MultiUserFitter(flux, premier, ckpt, Stage2Config.fast(**json.loads(args.fast)))
        for u in ev.users:
            fitter.add(u.user_id, samples[u.user_id])
        results = fitter.run()
        fast_s = time.perf_counter() - started
        fast = {uid: r.record.materialise(premier.users, ckpt) for uid, r in results.items()}  # type: ignore[union-attr]
        styles = [u.target(p) for u in ev.users for p in u.test_prompts]
        a_full = ev._pairs(ev.generate(premier, ckpt, full, ev.users), styles)
        a_fast = ev._pairs(ev.generate(premier, ckpt, fast, ev.users), styles)
        (mf, hf), (mq, hq) = interval(a_full), interval(a_fast)
        md, hd = interval([b - a for a, b in zip(a_full, a_fast)])
        counts = [len(u.test_prompts) for u in ev.users]
        uf, uq = per_user(a_full, counts), per_user(a_fast, counts)
        bf, bq = user_bootstrap(uf), user_bootstrap(uq)
        bd = user_bootstrap([b - a for a, b in zip(uf, uq)])
        row = {
            "images": k,
            "users": args.users,
            "pairs": len(a_full),
            "full": {"alignment": mf, "ci95": hf, "steps": full_meta, "seconds_all_users": full_s},
            "fast": {
                "alignment": mq,
                "ci95": hq,
                "steps": [r.record.fit["steps"] for r in results.values()],  # type: ignore[union-attr]
                "seconds_all_users_batched": fast_s,
            },
            "fast_minus_full": {"alignment": md, "ci95": hd},
            "fast_within_full_interval": abs(mq - mf) <= hf,
            "by_user": {  # the interval the claim rests on: bootstrap over test users, not over image pairs
                "full": {"alignment": bf[0], "ci95": [bf[1], bf[2]], "per_user": uf},
                "fast": {"alignment": bq[0], "ci95": [bq[1], bq[2]], "per_user": uq},
                "fast_minus_full": {"alignment": bd[0], "ci95": [bd[1], bd[2]]},
                "fast_within_full_interval": bf[1] <= bq[0] <= bf[2],
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"benchmark": "onboarding_quality", "environment": environment(), "config": vars(args), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
