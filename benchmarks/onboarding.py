"""Onboarding: upload -> fit job SUCCEEDED -> first generated image, end to end through the running server.

One local Ray + Serve (`serving.server.ServerSession`, as `premier serve` starts it, with its
dashboard for the Jobs API) on the embedded model. The application is deployed twice in the same
run: the new path (`fitting: {runner: workers}`: resident fit workers, batched multi-user fits,
warm start, convergence stop) and the old path (`runner: jobs`: a Ray job per fit with the
reference loop). For each path and each image count: one user alone (`--repeats` times; p50) and
`--burst` users submitted at once. The uploads are new users of the embedded model's world
(`premier.world.users.new_users`: a taste no training or test user has, its images and prompts;
`--uploads noise` for noise around a colour with generic captions), (when the last is servable; fits per minute at saturation =
burst / that time). The old path's burst is measured only where `--old-burst` asks (it takes
`burst / max_running_jobs` fits of about a minute and a half each on 2 cores); otherwise its value
is estimated from its measured single fit and marked so.

    python -m benchmarks.onboarding                     # writes benchmarks/results/<machine>/onboarding.json + .png
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_result

WORLD = Path(__file__).resolve().parent.parent / "premier" / "assets" / "world"
CAPTIONS = ("a cat", "a house", "a tree", "a boat", "a flower", "a car", "a bird", "a cup")
WORKERS = {"runner": "workers", "workers": 1, "worker_threads": 1, "worker_max_users": 16}
JOBS = {"runner": "jobs"}


def world_upload(n: int, seed: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """A sign-up of the embedded model's world: a user no one has seen, n of its preferred images and their prompts."""
    import json

    from premier.world.users import WorldConfig, new_users

    cfg = WorldConfig(**json.loads((WORLD / "world.json").read_text())["config"]["world"])
    (user,) = new_users(cfg, 1, n, seed=seed)
    out, captions = [], []
    for name, image, prompt in user.history_items(n):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out.append((name, buf.getvalue()))
        captions.append(prompt)
    return out, captions


def noise_upload(n: int, seed: int) -> tuple[list[tuple[str, bytes]], list[str]]:
    """Noise around one colour (unlike anything the model was trained on) and generic captions."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    colour = rng.integers(30, 230, 3)
    out = []
    for i in range(n):
        pixels = np.clip(colour[None, None, :] + rng.normal(0, 25, (64, 64, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append((f"{i:02d}.png", buf.getvalue()))
    return out, list(CAPTIONS[:n])


UPLOADS = {"world": world_upload, "noise": noise_upload}


def onboard(
    url: str, user: str, n: int, seed: int, timeout: float, uploads: str = "world", poll: float = 0.0
) -> dict[str, Any]:
    """One user: POST the fit, poll the job, generate the first image; the times from the upload's start."""
    import requests

    images, captions = UPLOADS[uploads](n, seed)
    files = [("images", (name, data, "image/png")) for name, data in images]
    started = time.perf_counter()
    r = requests.post(f"{url}/v1/users/{user}/fit", files=files, data={"captions": captions}, timeout=timeout)
    if r.status_code != 202:
        return {"user": user, "error": f"{r.status_code}: {r.text[:200]}"}
    job = r.json()["job_id"]
    accepted = time.perf_counter() - started
    deadline = started + timeout
    while True:
        query = "?wait=30" if poll <= 0 else ""  # 0: long polls, answered when the job ends
        status = requests.get(f"{url}/v1/jobs/{job}{query}", timeout=90).json()
        if status["status"] in ("SUCCEEDED", "FAILED", "STOPPED") or time.perf_counter() > deadline:
            break
        time.sleep(max(0.0, poll))
    fitted = time.perf_counter() - started
    if status["status"] != "SUCCEEDED":
        return {"user": user, "error": status.get("message") or status["status"], "fitted_s": fitted}
    g = requests.post(
        f"{url}/v1/generate", json={"prompt": "a cat", "user_id": user, "seed": 0, "format": "json"}, timeout=120
    )
    first = time.perf_counter() - started
    return {
        "user": user,
        "accepted_s": accepted,
        "servable_s": fitted,
        "first_image_s": first,
        "generate_status": g.status_code,
        "steps": status["user"].get("steps"),
    }


def scenario(url: str, tag: str, n: int, users: int, repeats: int, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    if users == 1:
        for k in range(repeats):
            runs.append(onboard(url, f"{tag}-n{n}-solo{k}", n, 1000 * n + k, args.timeout, args.uploads, args.poll))
        wall = None
    else:
        started = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            runs = list(
                pool.map(
                    lambda k: onboard(
                        url, f"{tag}-n{n}-burst{k}", n, 5000 + 100 * n + k, args.timeout, args.uploads, args.poll
                    ),
                    range(users),
                )
            )
        wall = time.perf_counter() - started
    ok = [r for r in runs if "error" not in r]
    firsts = [r["first_image_s"] for r in ok]
    out: dict[str, Any] = {
        "images": n,
        "users": users,
        "succeeded": len(ok),
        "errors": [r["error"] for r in runs if "error" in r][:3],
        "first_image_p50_s": statistics.median(firsts) if firsts else None,
        "first_image_max_s": max(firsts) if firsts else None,
        "servable_p50_s": statistics.median([r["servable_s"] for r in ok]) if ok else None,
        "steps": [r["steps"] for r in ok],
        "runs": runs,
    }
    if wall is not None:
        last = max((r["servable_s"] for r in ok), default=None)
        out["all_servable_s"] = last if len(ok) == users else None
        out["fits_per_minute"] = 60.0 * len(ok) / last if last else None
        out["wall_s"] = wall
    print({k: v for k, v in out.items() if k != "runs"}, flush=True)
    return out


def run_path(session: Any, config: Any, tag: str, args: argparse.Namespace, burst: bool) -> list[dict[str, Any]]:
    from ray import serve

    from serving.app import build
    from serving.config import APP_NAME

    if config.fitting.runner != session.config.fitting.runner:  # the session deployed its own when it started
        serve.run(build(config), name=APP_NAME, route_prefix="/")
    session.wait_ready(300.0)
    url = session.http_url
    if tag == "new":  # the workers load the model when the app starts; wait for that as a server's start would
        onboard(url, "warmup", 1, 1, args.timeout, args.uploads)
    rows = []
    for n in args.images:
        rows.append(scenario(url, tag, n, 1, args.repeats if tag == "new" else 1, args))
    if burst:
        for n in args.images:
            rows.append(scenario(url, tag, n, args.burst, 1, args))
    return rows


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, users, key, title in (
        (axes[0], 1, "first_image_p50_s", "one user: upload -> first image (p50, s)"),
        (
            axes[1],
            result["config"]["burst"],
            "all_servable_s",
            f"{result['config']['burst']} users at once: all servable (s)",
        ),
    ):
        for i, path_name in enumerate(("old", "new")):
            rows = [r for r in result[path_name] if r["users"] == users]
            xs = [r["images"] for r in rows]
            ys = [r.get(key) or 0 for r in rows]
            ax.bar([j + 0.4 * i for j in range(len(xs))], ys, width=0.4, label=f"{path_name} path")
            ax.set_xticks([j + 0.2 for j in range(len(xs))], [f"{x} images" for x in xs])
        ax.set_title(title, fontsize=9)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--old-images", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--burst", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--old-burst", action="store_true", help="measure the old path's burst too (long)")
    p.add_argument("--skip-old", action="store_true")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument(
        "--poll",
        type=float,
        default=0.0,
        help="0 (default): each client long-polls GET /v1/jobs/{id}?wait=30 (answered when the job ends); S > 0: "
        "polls every S seconds (the times are then this coarse, and 16 clients polling at 4/s cost the 2-core "
        "machine 20 s of a 16-user burst)",
    )
    p.add_argument(
        "--uploads",
        choices=sorted(UPLOADS),
        default="world",
        help="world: new users of the embedded model's world (its images and prompts); noise: noise around a colour",
    )
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from serving.config import ServerOptions, build_config
    from serving.server import ServerSession

    result: dict[str, Any] = {"config": vars(args) | {"workers": WORKERS}, "new": [], "old": []}
    with tempfile.TemporaryDirectory(prefix="premier-onboarding-") as work:
        base = {"store": str(Path(work) / "store"), "max_queued_requests": 256}
        new = build_config(
            {**base, "fitting": {**WORKERS, "max_running_jobs": args.burst, "max_queued_jobs": args.burst}}
        )
        old = build_config({**base, "fitting": {**JOBS, "max_running_jobs": 2, "max_queued_jobs": args.burst}})
        options = ServerOptions(http_port=0, grpc_port=0)
        with ServerSession(new, options, dashboard=not args.skip_old) as session:  # the old path's Jobs API
            result["new"] = run_path(session, new, "new", args, burst=True)
            if not args.skip_old:
                old_args = argparse.Namespace(**{**vars(args), "images": args.old_images or args.images})
                result["old"] = run_path(session, old, "old", old_args, burst=args.old_burst)
    result["summary"] = summary(result, args)
    path = write_result("onboarding", result, args.out)
    plot(result, path.with_suffix(".png"))
    print(result["summary"])
    return result


def summary(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    def row(path: str, n: int, users: int) -> dict[str, Any] | None:
        return next((r for r in result[path] if r["images"] == n and r["users"] == users), None)

    out: dict[str, Any] = {}
    for n in args.images:
        new1, old1 = row("new", n, 1), row("old", n, 1)
        if new1 and old1 and new1["first_image_p50_s"] and old1["first_image_p50_s"]:
            out[f"speedup_first_image_{n}_images"] = old1["first_image_p50_s"] / new1["first_image_p50_s"]
        newb, oldb = row("new", n, args.burst), row("old", n, args.burst)
        if newb and not oldb and old1 and old1.get("servable_p50_s"):
            out[f"old_{args.burst}_users_{n}_images_all_servable_s_ESTIMATE"] = (
                old1["servable_p50_s"] * args.burst / 2  # max_running_jobs 2 of the old config, fits in waves
            )
    new8 = row("new", 8, 1)
    out["goal_p50_first_image_8_images_le_10s"] = bool(new8 and (new8["first_image_p50_s"] or 1e9) <= 10.0)
    bursts = [r for r in result["new"] if r["users"] == args.burst]
    out["goal_16_users_all_servable_le_60s"] = bool(bursts) and all(
        (r.get("all_servable_s") or 1e9) <= 60.0 for r in bursts
    )
    out["fits_per_minute_at_saturation"] = max((r.get("fits_per_minute") or 0 for r in bursts), default=None)
    return out


if __name__ == "__main__":
    main()
