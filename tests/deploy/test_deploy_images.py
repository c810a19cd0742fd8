"""deploy/docker: the images' structure, checked without building them (base images cannot be pulled here).

What a build would only reveal late, or a running container never: a root user, a missing health
check, weights or stores baked into a layer, a COPY of a file that does not exist, an entrypoint or
config file that `premier serve` rejects, a store path that is not on a volume.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
IMAGES = ("cpu", "cuda")
# What may be copied from the build context: sources, packaging and the deploy files the images need.
ALLOWED_SOURCES = {
    "pyproject.toml",
    "README.md",
    "constraints",
    "premier",
    "kernels",
    "store",
    "serving",
    "deploy/docker/serve-cpu.yaml",
    "deploy/docker/serve-cuda.yaml",
}
FORBIDDEN = ("*.safetensors", "*.sqlite3*", "*checkpoint*", "*premier-store*", "*models*", "*.ckpt", "*.pt", "*.bin")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(path: Path) -> list[Stage]:
    """Stages of a Dockerfile: (instruction, argument) pairs with continuations joined and comments dropped."""
    lines, buf = [], ""
    for raw in path.read_text().splitlines():
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        lines.append(buf + s)
        buf = ""
    stages: list[Stage] = []
    for line in lines:
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            parts = arg.split()
            stages.append(Stage(parts[0], parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None))
        elif stages:
            stages[-1].instructions.append((op, arg.strip()))
    return stages


def exec_form(arg: str) -> list[str]:
    return json.loads(arg) if arg.startswith("[") else shlex.split(arg)


def copies(stage: Stage) -> list[tuple[list[str], str, bool]]:
    """(sources, destination, from another stage) of each COPY."""
    out = []
    for arg in stage.all("COPY"):
        words = shlex.split(arg)
        flags = [w for w in words if w.startswith("--")]
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1], any(f.startswith("--from=") for f in flags)))
    return out


@pytest.fixture(params=IMAGES)
def image(request: pytest.FixtureRequest) -> tuple[str, list[Stage]]:
    return request.param, parse_dockerfile(DOCKER / f"Dockerfile.{request.param}")


def test_multi_stage_and_non_root(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    assert len(stages) >= 2 and all(s.name for s in stages[:-1])
    final = stages[-1]
    assert any(src for src, _, from_stage in copies(final) if from_stage), (
        "the runtime stage copies the built environment"
    )
    assert not any(arg for arg in final.all("RUN") if "pip install" in arg), "no installs in the runtime stage"
    users = final.all("USER")
    assert users, "the runtime stage sets a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    uid_created = any(f"--uid {user}" in arg or f"useradd {user}" in arg for arg in final.all("RUN"))
    assert uid_created or not user.isdigit() or int(user) >= 1000


def test_package_is_installed(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    build = " ".join(arg for s in stages[:-1] for arg in s.all("RUN"))
    assert "pip install" in build and ("pip install ." in build or "pip install -c constraints/cpu.txt ." in build)
    if name == "cpu":
        assert "-c constraints/cpu.txt ." in build and "whl/cpu" in build
    else:
        assert "constraints/cpu.txt" not in build  # the CPU pins would bring the CPU torch


def test_healthcheck_probes_the_health_route(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    (check,) = stages[-1].all("HEALTHCHECK")
    cmd = exec_form(check.split("CMD", 1)[1].strip())
    assert cmd[0] == "python" and "/healthz" in cmd[-1]
    config, options = _image_config(name)
    assert f"127.0.0.1:{options.http_port}/healthz" in cmd[-1]
    assert '@api.get("/healthz"' in (REPO / "serving" / "api_v1.py").read_text()
    # The probe is the script a container runs: it must at least compile.
    compile(cmd[-1], "healthcheck", "exec")


def test_no_weights_or_data_baked_in(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    for stage in stages:
        for sources, _, from_stage in copies(stage):
            if from_stage:
                continue
            for src in sources:
                assert src.rstrip("/").lstrip("./") in ALLOWED_SOURCES, f"{stage.name}: COPY {src}"
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
                assert not any(fnmatch.fnmatch(src, p) for p in FORBIDDEN), src
    for stage in stages:
        for arg in stage.all("RUN"):
            assert "huggingface-cli" not in arg and "snapshot_download" not in arg and "wget http" not in arg


def test_data_paths_are_volumes(image: tuple[str, list[Stage]]) -> None:
    name, stages = image
    volumes = [v for arg in stages[-1].all("VOLUME") for v in exec_form(arg)]
    config, _ = _image_config(name)
    assert any(Path(v) == Path(config.store) or Path(v) in Path(config.store).parents for v in volumes)
    for path in (config.model, config.checkpoint):
        if path is not None:
            assert any(Path(v) in Path(path).parents for v in volumes), path


def _config_file(name: str) -> tuple[Path, str]:
    """(repo source, image path) of the serve config the image's CMD reads."""
    stages = parse_dockerfile(DOCKER / f"Dockerfile.{name}")
    cmd = exec_form(stages[-1].all("CMD")[-1])
    dest = cmd[cmd.index("--config") + 1]
    (src,) = [s for sources, d, _ in copies(stages[-1]) if d == dest for s in sources]
    return REPO / src, dest


def _image_config(name: str):
    from serving.config import load_config

    src, _ = _config_file(name)
    return load_config(src, environ={})


def test_entrypoint_is_the_servers(image: tuple[str, list[Stage]], monkeypatch: pytest.MonkeyPatch) -> None:
    """CMD runs a console script of the package; its serve config passes `premier serve --check-config`."""
    from premier.cli import main

    name, stages = image
    (cmd,) = stages[-1].all("CMD")
    argv = exec_form(cmd)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts and argv[1] == "serve"
    src, dest = _config_file(name)
    for k in [k for k in os.environ if k.startswith("PREMIER_SERVE_")]:
        monkeypatch.delenv(k)
    args = [src if a == dest else a for a in argv[1:]]
    # Closed by default: the image listens on 0.0.0.0, so it starts only with an API key (or --insecure).
    assert main([*map(str, args), "--check-config"]) == 2
    monkeypatch.setenv("PREMIER_SERVE_API_KEY", "a-key")
    assert main([*map(str, args), "--check-config"]) == 0
    config, options = _image_config(name)
    assert options.host == "0.0.0.0"
    if name == "cuda":
        assert config.device == "cuda" and config.num_gpus >= 1 and config.model and config.checkpoint
    else:
        assert config.model is None and config.num_gpus == 0
    # The same file shape as the packaged one and the RayService's.
    data = yaml.safe_load(src.read_text())
    assert data["applications"][0]["import_path"] == "serving.app:build_app"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, enough for these checks: last matching pattern wins, ! re-includes."""
    result = False
    for p in patterns:
        neg = p.startswith("!")
        p = p[1:] if neg else p
        p = p.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes):
            result = not neg
    return result


def test_dockerignore_keeps_data_out_and_sources_in() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".git/config",
        "premier-store/users.sqlite3",
        "x/users.sqlite3-wal",
        "runs/a/checkpoints/step-1/adapters.safetensors",
        "world-work/model.safetensors",
        ".venv/bin/python",
    ):
        assert _ignored(path, patterns), path
    kept = [str(p.relative_to(REPO)) for p in (REPO / "premier" / "assets").rglob("*") if p.is_file()]
    kept += [
        "pyproject.toml",
        "README.md",
        "constraints/cpu.txt",
        "serving/app.py",
        "premier/cli.py",
        "store/database.py",
        "kernels/__init__.py",
        "store/backup.py",
        "deploy/docker/serve-cuda.yaml",
        "deploy/docker/serve-cpu.yaml",
    ]
    for path in kept:
        assert not _ignored(path, patterns), path
