"""Premier vs per-user LoRA, serving: concurrent requests from different users on one pipeline.

Eight requests arrive at once from the users resident on the pipeline (1, 4, 8 or 32 of them;
request i is user i mod N), all at the model's default settings, with distinct prompts and seeds.
How each way serves them, in this process, interleaved round-robin so that machine noise hits all
alike; each way on a pipeline of its own (the same model), so that peft's wrapped layers never
slow Premier's forward or another rank's:

  premier          one batched forward per step for all eight (users are input tokens);
  base             the same batch without users (the floor);
  lora-mixed       peft's mixed-adapter batch: one forward, each sample through its own user's LoRA
                   (`adapter_names`, how multi-tenant LoRA servers batch), every user's LoRA resident;
  lora-serial      one request at a time, the user's resident adapter activated (`set_adapters`);
  lora-hotswap     one request at a time through one adapter slot whose weights are replaced in place
                   (diffusers' hotswap; with `--compile`, the transformer's blocks compiled first, the path
                   that avoids recompiling for each user); the users' LoRAs wait in memory;
  premier-compiled with `--compile`: Premier's batch on a regionally compiled pipeline, the fair baseline
                   for the compiled hot-swap (`images_per_s_over_premier_compiled`).

Per mode: images/s (8 over the batch's wall time), p50/p99 latency (a serialized request waits
for those before it), and the bytes of user state resident (Premier: the user tokens; LoRA: the
adapters). LoRAs are random (rank `--ranks`, on the attention projections, `premier.lora`), which
costs what a fitted one costs. Models: the embedded one and the mid-size FLUX-architecture model
of benchmarks/continuous.py (random weights). Also the per-user size at FLUX.1-dev, by computation.

Run: `python benchmarks/lora_serving.py` (~30 min on 2 cores with `--compile`), `--quick`, `--models embedded`,
`--compile`. Writes JSON (`--out`, default benchmarks/results/<machine>/lora_serving.json) and a plot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import write_result  # noqa: E402

FULL = dict(models=["embedded", "mid"], resident=[1, 4, 8, 32], ranks=[4, 16], requests=8, repeats=5)
QUICK = dict(models=["embedded"], resident=[1, 8], ranks=[4], requests=8, repeats=1)
PROMPTS = ("a cat on a sofa", "a lighthouse at dusk", "a bowl of fruit", "a red bicycle")


def percentile(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * len(v) + 0.5) - 1))]


def flux_dev_sizes() -> dict[str, Any]:
    """Per-user parameters and bf16 bytes at FLUX.1-dev size (a meta-device model: no memory, no weights)."""
    from benchmarks.continuous import model_spec
    from premier.config import PremierConfig
    from premier.lora import lora_parameters
    from premier.models.embedded import build_embedded_transformer

    spec = model_spec("flux-dev")
    with torch.device("meta"):
        flux = build_embedded_transformer(spec)
    n, u = PremierConfig().user_shape
    out: dict[str, Any] = {
        "premier_direct": {"parameters": n * u, "bytes_bf16": 2 * n * u, "note": f"{n} user tokens x {u}"},
        "premier_coefficients": {
            "parameters_per_basis_user": 1,
            "note": "one coefficient per stage-1 user (K of them); materialised to the direct size to serve",
        },
    }
    for r in (4, 16):
        p = lora_parameters(flux, r)
        out[f"lora_r{r}"] = {"parameters": p, "bytes_bf16": 2 * p, "times_premier_direct": round(p / (n * u), 1)}
    return out


def run_model(model: str, cfg: dict[str, Any], compile_blocks: bool, log: Callable[[str], None]) -> dict[str, Any]:
    from benchmarks.continuous import build_pipe
    from premier.lora import LoraBank, LoraSlot, random_lora_state
    from premier.requests import GenerationRequest

    pipe, _ = build_pipe(model)
    settings = pipe.default_settings()
    flux = pipe.flux_pipe.transformer
    # With --compile, Premier and the hot-swap slots are compiled once per model (lazily, in the warm-up), so that
    # compiled LoRA is compared with compiled Premier in one run.
    compiled = build_pipe(model)[0].optimize(compile="regional") if compile_blocks else None
    # Each rank's adapters on a pipeline of their own: peft's wrapped layers (and an adapter left active by the
    # one-at-a-time runs) must not slow, or change, Premier's forward or another rank's.
    lora_pipes = {rank: build_pipe(model)[0] for rank in cfg["ranks"]}
    slots: dict[int, tuple[Any, Any]] = {}
    out: dict[str, Any] = {
        "model": model,
        "settings": vars(settings),
        "transformer_parameters": sum(p.numel() for p in flux.parameters()),
        "levels": [],
    }
    for resident in cfg["resident"]:
        g = torch.Generator("cpu").manual_seed(resident)
        tokens = [torch.randn(pipe.premier.config.user_shape, generator=g) for _ in range(resident)]
        who = [i % resident for i in range(cfg["requests"])]
        reqs = [GenerationRequest(PROMPTS[i % len(PROMPTS)] + f" {i}", None, i) for i in range(cfg["requests"])]
        with_users = [GenerationRequest(r.prompt, tokens[who[i]], r.seed) for i, r in enumerate(reqs)]
        modes = {"premier": batched(pipe, with_users, settings), "base": batched(pipe, reqs, settings)}
        memory = {"premier": sum(t.numel() * t.element_size() for t in tokens), "base": 0}
        if compiled is not None:
            modes["premier-compiled"] = batched(compiled, with_users, settings)
            memory["premier-compiled"] = memory["premier"]
        level: dict[str, Any] = {"resident_users": resident, "distinct_users_in_batch": len(set(who))}
        loras = {r: [random_lora_state(flux, r, seed=1000 * r + k) for k in range(resident)] for r in cfg["ranks"]}
        for rank, states in loras.items():
            lora_pipe = lora_pipes[rank]
            bank = LoraBank(lora_pipe.flux_pipe, rank)
            users = [f"r{rank}-user{k}" for k in range(resident)]
            for user, state in zip(users, states):
                bank.load(user, state)
            order = [users[k] for k in who]
            modes[f"lora-mixed-r{rank}"] = mixed(lora_pipe, bank, order, reqs, settings)
            modes[f"lora-serial-r{rank}"] = serial(lora_pipe, bank, order, reqs, settings)
            memory[f"lora-mixed-r{rank}"] = memory[f"lora-serial-r{rank}"] = bank.resident_bytes()
            level[f"lora_parameters_per_user_r{rank}"] = sum(v.numel() for v in states[0].values())
        level["results"] = measure(modes, cfg["repeats"])
        for rank, states in loras.items():
            lora_pipes[rank].flux_pipe.transformer.unload_lora()  # the next level loads its own users
            if rank not in slots:  # one slot per rank, on its own pipeline: later users and levels only swap weights
                swap_pipe = build_pipe(model)[0]
                slots[rank] = (swap_pipe, LoraSlot(swap_pipe.flux_pipe, rank, states[0]))
                if compile_blocks:
                    swap_pipe.optimize(compile="regional")
            swap_pipe, slot = slots[rank]
            level["results"][f"lora-hotswap-r{rank}"] = measure(
                {"x": hotswap(swap_pipe, slot, [states[k] for k in who], reqs, settings)}, cfg["repeats"]
            )["x"]
            memory[f"lora-hotswap-r{rank}"] = sum(v.numel() * v.element_size() for st in states for v in st.values())
        base = level["results"]["premier"]["images_per_s"]
        for mode, r in level["results"].items():
            r["user_state_bytes"] = memory[mode]
            r["images_per_s_over_premier"] = round(r["images_per_s"] / base, 3)
            if compiled is not None:
                r["images_per_s_over_premier_compiled"] = round(
                    r["images_per_s"] / level["results"]["premier-compiled"]["images_per_s"], 3
                )
        out["levels"].append(level)
        log(
            f"{model} resident {resident}: "
            + ", ".join(f"{m} {r['images_per_s']:.1f} img/s" for m, r in level["results"].items())
        )
    return out


Run = Callable[[], list[float]]


def batched(pipe, requests, settings) -> Run:
    """All requests in one pipeline call: every one finishes with the batch."""

    def run() -> list[float]:
        start = time.perf_counter()
        pipe(requests, settings, output_type="np")
        return [time.perf_counter() - start] * len(requests)

    return run


def mixed(pipe, bank, users: list[str], requests, settings) -> Run:
    def run() -> list[float]:
        start = time.perf_counter()
        with bank.mixed(users):
            pipe(requests, settings, output_type="np")
        return [time.perf_counter() - start] * len(requests)

    return run


def serial(pipe, bank, users: list[str], requests, settings) -> Run:
    return one_at_a_time(pipe, [lambda u=u: bank.activate(u) for u in users], requests, settings)


def hotswap(pipe, slot, states: list[dict[str, torch.Tensor]], requests, settings) -> Run:
    return one_at_a_time(pipe, [lambda st=st: slot.swap(st) for st in states], requests, settings)


def one_at_a_time(pipe, switch: list[Callable[[], None]], requests, settings) -> Run:
    """Request i after switching to its user (`switch[i]`); each finishes when its own forward does."""

    def run() -> list[float]:
        start, done = time.perf_counter(), []
        for before, req in zip(switch, requests):
            before()
            pipe([req], settings, output_type="np")
            done.append(time.perf_counter() - start)
        return done

    return run


def measure(modes: dict[str, Run], repeats: int) -> dict[str, Any]:
    """Round-robin repeats (one warm-up each): images/s from the median batch wall time, latency percentiles over
    every request of every repeat."""
    for fn in modes.values():
        fn()
    latencies: dict[str, list[list[float]]] = {m: [] for m in modes}
    for _ in range(repeats):
        for m, fn in modes.items():
            latencies[m].append(fn())
    out = {}
    for m, runs in latencies.items():
        wall = statistics.median(max(r) for r in runs)
        flat = [x for r in runs for x in r]
        out[m] = {
            "images_per_s": round(len(runs[0]) / wall, 3),
            "batch_wall_s": round(wall, 5),
            "latency_p50_ms": round(1000 * percentile(flat, 50), 2),
            "latency_p99_ms": round(1000 * percentile(flat, 99), 2),
            "repeats": repeats,
        }
    return out


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        xs = [lv["resident_users"] for lv in res["levels"]]
        for mode in res["levels"][0]["results"]:
            ax.plot(xs, [lv["results"][mode]["images_per_s"] for lv in res["levels"]], marker="o", label=mode)
        ax.set(xscale="log", xlabel="users resident", ylabel="images/s (8 concurrent requests)", title=res["model"])
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run: the embedded model, 1 and 8 users, rank 4")
    ap.add_argument("--models", help="comma-separated: embedded, mid (default both)")
    ap.add_argument("--ranks", help="comma-separated LoRA ranks (default 4,16)")
    ap.add_argument("--repeats", type=int, help="timed repeats per mode (default 5)")
    ap.add_argument("--compile", action="store_true", help="compile the blocks before the hot-swap runs")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/<machine>/lora_serving.json)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.models:
        cfg["models"] = args.models.split(",")
    if args.ranks:
        cfg["ranks"] = [int(r) for r in args.ranks.split(",")]
    if args.repeats:
        cfg["repeats"] = args.repeats
    results = [run_model(m, cfg, args.compile, lambda s: print(s, flush=True)) for m in cfg["models"]]
    payload = {
        "config": {**cfg, "compile": args.compile, "threads": torch.get_num_threads()},
        "per_user_size_flux_dev": flux_dev_sizes(),
        "results": results,
    }
    path = write_result("lora_serving" + ("_quick" if args.quick else ""), payload, args.out)
    payload["plot"] = str(plot(results, path.with_suffix(".png")))
    print(f"wrote {path} and {payload['plot']}")
    return payload


if __name__ == "__main__":
    main()
