"""`serve run` (Ray Serve's own CLI) starts the packaged config file: the one KubeRay embeds."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from serving.config import PACKAGED_SERVE_CONFIG
from serving.server import free_port

START_TIMEOUT_S = 240


def _serve_file(tmp_path: Path) -> tuple[Path, int]:
    """The packaged file with free ports and a store under tmp_path; nothing else changed."""
    data = yaml.safe_load(PACKAGED_SERVE_CONFIG.read_text())
    http_port = free_port()
    data["http_options"]["port"] = http_port
    data["grpc_options"]["port"] = free_port()
    data["applications"][0]["args"]["store"] = str(tmp_path / "store")
    path = tmp_path / "serve_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path, http_port


def test_serve_run_starts_the_packaged_config_and_serves(tmp_path):
    path, port = _serve_file(tmp_path)
    serve_cli = Path(sys.executable).with_name("serve")
    assert serve_cli.exists(), "Ray Serve's CLI is installed with ray[serve]"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREMIER_SERVE_", "RAY_ADDRESS"))}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(
        [str(serve_cli), "run", str(path)],
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert proc.poll() is None, f"serve run exited early:\n{proc.stdout.read()[-3000:]}"
            try:
                if requests.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # the proxy is up before the app
                pass
            if time.monotonic() > deadline:
                pytest.fail("serve run did not become ready")
            time.sleep(1)
        r = requests.post(
            url + "/v1/generate",
            json={"prompt": "a red circle in the center", "user_id": "alice", "seed": 1, "format": "json"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["seed"] == 1 and body["image"] and body["timings"]["pipeline_s"] > 0
        assert requests.get(url + "/v1/users/alice", timeout=30).status_code == 200  # the store was seeded
        assert requests.post(url + "/v1/generate", json={"prompt": ""}, timeout=30).status_code == 400
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run deletes the app and stops its Ray
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode is not None
