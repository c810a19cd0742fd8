"""`premier serve --demo DIR`: the README's main command, end to end against a real server.

Start the server (free ports, a fresh store seeded with the embedded demo users unless --store
is given), send every (prompt, user) request at once over HTTP (so the server batches users
together), the same requests over KServe v2 gRPC with an unmodified tritonclient, check that
both protocols give the same pixels, write the images and a contact sheet, stop, print where
they are.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from premier.models.embedded import DEMO_PROMPTS
from serving.config import MODEL_NAME, ServeConfig, ServerOptions


def same_pixels(max_diff: int) -> str:
    """How a gRPC image (computed alone) compares with its HTTP twin (batched with others): a batch's matmuls sum
    in another order, which can move a pixel by one level of 255 after rounding; more is a real difference."""
    if max_diff == 0:
        return "yes, pixel for pixel"
    return f"yes, to within {max_diff} level of 255 (batch rounding)" if max_diff <= 1 else f"NO (max diff {max_diff})"


def http_generate(url: str, headers: dict[str, str], prompt: str, user: str | None, seed: int) -> dict[str, Any]:
    import base64
    import io

    import requests
    from PIL import Image

    r = requests.post(
        url + "/v1/generate",
        json={"prompt": prompt, "user_id": user, "seed": seed, "format": "json"},
        headers=headers,
        timeout=300,
    )
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text}")
    body = r.json()
    body["array"] = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["image"]))).convert("RGB"))
    return body


def grpc_generate(client: Any, prompt: str, user: str | None, seed: int, headers: dict[str, str]) -> np.ndarray:
    import tritonclient.grpc as tg

    inputs = []
    for name, dtype, value in (
        ("PROMPT", "BYTES", np.array([prompt.encode()], dtype=object)),
        ("USER_ID", "BYTES", np.array([(user or "").encode()], dtype=object)),
        ("SEED", "INT64", np.array([seed], dtype=np.int64)),
    ):
        t = tg.InferInput(name, [1], dtype)
        t.set_data_from_numpy(value)
        inputs.append(t)
    metadata = {k.lower(): v for k, v in headers.items()}
    return client.infer(MODEL_NAME, inputs, headers=metadata or None).as_numpy("IMAGE")


def demo_users(config: ServeConfig) -> list[str]:
    """The users the store was seeded with (the embedded model's demo users), if any."""
    if config.model is not None or config.checkpoint is not None or not config.seed_demo_users:
        return []
    from premier.models.embedded import embedded_demo_records

    return [r.user_id for r in embedded_demo_records()]


def run_demo(
    out: str | Path,
    config: ServeConfig,
    options: ServerOptions,
    *,
    explicit_store: bool = False,
    address: str | None = None,
    seed: int = 0,
) -> int:
    import tritonclient.grpc as tg
    from PIL import Image

    from serving.server import ServerSession

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="premier-demo-store-") as tmp:
        if not explicit_store:
            config = config.model_copy(update={"store": str(Path(tmp) / "store")})
        options = options.model_copy(update={"http_port": 0, "grpc_port": 0}) if address is None else options
        print(f"premier serve --demo: starting the server (store {config.store}) ...", flush=True)
        t0 = time.perf_counter()
        with ServerSession(config, options, address=address, dashboard=False) as server:
            started_s = time.perf_counter() - t0
            import requests

            headers = server.auth_headers()
            info = requests.get(server.http_url + "/v1/model", headers=headers, timeout=60).json()
            users = demo_users(config) or info["training_users"][:4]
            columns: list[str | None] = [*users, None]
            jobs = [(p, u) for p in DEMO_PROMPTS for u in columns]
            t1 = time.perf_counter()
            with ThreadPoolExecutor(len(jobs)) as pool:
                http = list(pool.map(lambda j: http_generate(server.http_url, headers, j[0], j[1], seed), jobs))
            http_s = time.perf_counter() - t1
            client = tg.InferenceServerClient(server.grpc_target)
            t2 = time.perf_counter()
            grpc = [grpc_generate(client, DEMO_PROMPTS[0], u, seed, headers) for u in columns]
            grpc_s = time.perf_counter() - t2
            client.close()
        print("premier serve --demo: server stopped", flush=True)

    h, w = http[0]["array"].shape[:2]
    sheet = Image.new("RGB", (w * len(columns), h * len(DEMO_PROMPTS)))
    summary = []
    for k, ((prompt, user), res) in enumerate(zip(jobs, http)):
        i, j = divmod(k, len(columns))
        name = f"http_prompt{i}_{user or 'none'}.png"
        Image.fromarray(res["array"]).save(out / name)
        sheet.paste(Image.fromarray(res["array"]), (j * w, i * h))
        summary.append(
            {
                "file": name,
                "protocol": "http",
                "prompt": prompt,
                "user_id": user,
                "seed": res["seed"],
                "batch_size": res["batch_size"],
                "timings": res["timings"],
            }
        )
    same = []
    for user, arr in zip(columns, grpc):
        name = f"grpc_prompt0_{user or 'none'}.png"
        Image.fromarray(arr).save(out / name)
        ref = http[columns.index(user)]["array"]
        same.append(int(np.abs(arr.astype(int) - ref.astype(int)).max()))
        summary.append(
            {"file": name, "protocol": "kserve-grpc", "prompt": DEMO_PROMPTS[0], "user_id": user, "seed": seed}
        )
    sheet_path = out / "contact_sheet.png"
    sheet.save(sheet_path)
    batches = sorted({r["batch_size"] for r in http})
    (out / "summary.json").write_text(
        json.dumps(
            {
                "images": summary,
                "server_start_s": started_s,
                "http_s": http_s,
                "grpc_s": grpc_s,
                "grpc_vs_http_max_abs_diff": same,
            },
            indent=2,
        )
    )
    print(
        f"served {len(http)} images over HTTP ({len(DEMO_PROMPTS)} prompts x {len(columns)} users incl. plain FLUX, "
        f"sent at once: batch sizes {batches}) in {http_s:.2f}s, and {len(grpc)} over KServe v2 gRPC in {grpc_s:.2f}s; "
        f"gRPC equals HTTP: {same_pixels(max(same))}"
    )
    print("users: " + ", ".join(u or "none (plain FLUX)" for u in columns))
    print(
        f"images in {out.resolve()}/ (contact sheet {sheet_path.resolve()}: rows prompts, columns users; "
        f"timings in {(out / 'summary.json').resolve()})"
    )
    return 0


__all__ = ["run_demo", "http_generate", "grpc_generate", "DEMO_PROMPTS"]
