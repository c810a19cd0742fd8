"""The GPU kit on a CPU: gpu-run.sh --smoke end to end, the wheel pins, the budget, the result schema, bad input.

Nothing here downloads: the wheel script is run with --list / --dry-run only, and gpu-run.sh gets
an empty (or fake) wheel folder and PIP_NO_INDEX=1, so it installs nothing from anywhere.
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from benchmarks import gpu_suite
from benchmarks.gpu import preflight
from benchmarks.gpu.plan import Row, Scheduler
from benchmarks.gpu.report import SCHEMA, Report

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "scripts" / "gpu-wheels.sh"
RUN = ROOT / "scripts" / "gpu-run.sh"
TARGET_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "platform_machine": "x86_64",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}


def _sh(*args: str, env: dict | None = None, timeout: float = 60, drop: tuple = ()) -> subprocess.CompletedProcess:
    full = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in drop}
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=full)


def _pins() -> dict[str, tuple[str, str]]:
    out = _sh(WHEELS, "--list")
    assert out.returncode == 0, out.stderr
    pins = {}
    for line in out.stdout.splitlines():
        name, version, role = line.split()
        pins[canonicalize_name(name)] = (version, role)
    return pins


# ----------------------------------------------------------------------------- gpu-run.sh --smoke
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_gpu_run_smoke_on_the_cpu(tmp_path):
    """The same code path as on a GPU: kernels in Triton's interpreter, the tiny model, every kind of row."""
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = {"PIP_NO_INDEX": "1", "PYTHON": sys.executable, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # ~60 s on an idle 2-core machine; the limit only catches a hang (a busy machine may be many times slower).
    # Every row must run here, so the measurement budget (a GPU session's) must not run out on a busy machine:
    # beside `stress-ng --cpu 2` the smoke run used 311 s of its 300 and skipped the int8 check.
    flags = ("--smoke", "--budget-s", "100000", "--wheels", wheels)
    proc = _sh("nice", RUN, out, *flags, env=env, timeout=1100, drop=("TRITON_INTERPRET",))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "gpu-run: missing wheel diffusers==0.42.1" in log and "kernels in Triton's interpreter" in log
    data = json.loads((out / "gpu_suite_smoke.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert (out / "gpu_suite_smoke.md").read_text().startswith("# GPU suite (smoke)")
    assert (out / "run.log").read_text().strip()
    assert data["status"] == "complete" and data["mode"] == "smoke" and data["config"]["triton_interpret"] is True
    assert data["device"]["cuda"] is False and "CPU build" in data["device"]["no_gpu_reason"]
    assert any("missing wheel torchao==0.18.0" in n for n in data["notes"])
    # Preflight: the fused ops really ran (the interpreter), and the small model agreed.
    checks = {c["name"]: c for c in data["preflight"]["checks"]}
    assert data["preflight"]["passed"] is True and all(c["passed"] is True for c in checks.values()), checks
    zero = checks["zero delta equals stock diffusers"]["details"]
    assert zero["float32"]["backend"] == "triton" and zero["float32"]["kernel_calls"]
    # Kernels: both AdaLN variants, eager, compiled, inline under compile, and the copy beside them.
    (row,) = data["kernels"]
    assert set(row["impls"]) == {"fused_reordered", "fused_original", "eager", "compiled_reference", "inline_compiled"}
    for impl in row["impls"].values():
        assert impl["host_us"] > 0 and impl["device_us"] is None and impl["max_abs_error"] < 1e-4
    assert row["copy"]["host_us"] > 0 and row["fastest_fused"] in ("fused_reordered", "fused_original")
    # One step of each variant; float8-dynamic skipped with the reason; the generation and the checks.
    variants = {r["variant"] for r in data["steps"]}
    assert variants == {
        "plain_eager",
        "premier_eager",
        "premier_reference_eager",
        "plain_compiled",
        "premier_compiled",
        "premier_reference_compiled",
        "premier_int8",
    }
    compiled = {r["variant"]: r for r in data["steps"]}
    assert compiled["premier_compiled"]["new_graphs"] >= 1 and compiled["premier_eager"]["new_graphs"] == 0
    assert compiled["premier_eager"]["kernel_backend"] == "triton"
    skipped = {s["what"]: s["reason"] for s in data["skipped"]}
    assert "compute capability >= 8.9" in skipped["step premier_float8_dynamic 32px B=1"]
    assert "no CUDA GPU" in skipped["copy bandwidth (2 GiB)"]
    assert not [s for s in skipped.values() if s.startswith(("failed", "time budget"))], skipped
    (gen,) = data["generations"]
    assert gen["variant"] == "premier_compiled" and gen["steps"] == gpu_suite.SMOKE["steps"]
    assert data["checks"]["kernels_vs_inline_reference"]["relative_l2"] < 1e-5
    assert data["checks"]["kernels_vs_inline_reference"]["kernel_backend"] == "triton"
    assert data["checks"]["premier_compiled_vs_eager"]["relative_l2"] < 1e-5
    assert 0 < data["checks"]["premier_int8_vs_eager"]["relative_l2"] < 0.1
    assert data["quantization"]["int8"]["inductor_settings_changed"] == []


# ----------------------------------------------------------------------------- bad input, in process
def test_a_cuda_host_without_a_gpu_and_missing_packages_each_give_one_line(tmp_path, monkeypatch, capsys):
    """No GPU on a CUDA build, no diffusers, no torchao: one line each, every row listed with its reason."""

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system. Please check ...")

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "init", no_driver)
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.setitem(sys.modules, "torchao", None)
    data = gpu_suite.main(["--full", "--out-dir", str(tmp_path)])
    jsonschema.validate(data, SCHEMA)
    assert data["status"] == "complete" and data["device"]["no_gpu_reason"].startswith("Found no NVIDIA driver")
    notes = "\n".join(data["notes"])
    assert notes.count("no CUDA GPU: Found no NVIDIA driver on your system.") == 1
    assert "int8 rows skipped: torchao is not importable" in notes
    reasons = {s["what"]: s["reason"] for s in data["skipped"]}
    assert reasons["kernel adaln_per_token B=8"].startswith("no CUDA GPU (Found no NVIDIA driver")
    assert reasons["step premier_compiled 1024px B=1"].startswith("no CUDA GPU")
    assert not data["kernels"] and not data["steps"]
    pre = {c["name"]: c for c in data["preflight"]["checks"]}
    assert pre["zero delta equals stock diffusers"]["skipped"].startswith("diffusers is not importable")
    assert pre["fused ops vs reference, bfloat16"]["passed"] is None
    assert data["preflight"]["passed"] is True
    assert "Found no NVIDIA driver" in capsys.readouterr().out


def test_without_diffusers_the_kernels_are_still_measured(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    data = gpu_suite.main(["--smoke", "--out-dir", str(tmp_path)])
    assert data["status"] == "complete"
    assert any(n.startswith("FLUX-sized rows skipped: diffusers is not importable") for n in data["notes"])
    (row,) = data["kernels"]
    assert row["impls"]["eager"]["host_us"] > 0
    assert "no Triton backend for cpu" in row["impls"]["fused_reordered"]["skipped"]
    assert not data["steps"] and any(s["what"] == "step premier_int8 32px B=1" for s in data["skipped"])


# ----------------------------------------------------------------------------- the budget
class _Report:
    def __init__(self):
        self.skipped = []

    def skip(self, what, reason):
        self.skipped.append((what, reason))


def test_the_budget_skips_the_least_important_remaining_rows():
    now = [0.0]
    ran = []

    def row(name, prio, cost, setups=(), unavailable=None):
        def run():
            ran.append(name)
            now[0] += cost
            if name == "broken":
                raise ValueError("out of memory, say")

        return Row(name, prio, run, lambda: cost, list(setups), unavailable)

    build = [("model", lambda: 0.0 if "a" in ran else 20.0)]  # a shared set-up, counted once, done by a
    report = _Report()
    sched = Scheduler(100.0, report, clock=lambda: now[0])
    sched.run(
        [
            row("a", 1, 10, build),
            row("b", 3, 30, build),
            row("broken", 2, 5),
            row("c", 2, 30, build),
            row("d", 4, 10),
            row("e", 1, 20),
            row("gone", 1, 1, unavailable="torchao is not importable"),
        ]
    )
    # At a's turn the rest is estimated at 125 s (the set-up once): d and b are set aside, a runs.
    # At b's turn the set-up is done and b fits beside the more important rest: it runs. d, least
    # important, never fits at its turn; e, the most important, runs last.
    assert ran == ["a", "b", "broken", "c", "e"]
    assert [w for w, _ in report.skipped] == ["gone", "broken", "d"]
    reasons = dict(report.skipped)
    assert reasons["gone"] == "torchao is not importable"
    assert reasons["broken"] == "failed: ValueError: out of memory, say"
    assert reasons["d"].startswith("time budget: 75 s of 100 s used") and "importance 4" in reasons["d"]
    assert now[0] <= 100


# ----------------------------------------------------------------------------- the result document
def test_the_document_is_rewritten_after_every_measurement_and_follows_the_schema(tmp_path):
    report = Report(tmp_path, "gpu_suite", "full")
    report.save()
    first = json.loads((tmp_path / "gpu_suite.json").read_text())
    jsonschema.validate(first, SCHEMA)
    assert first["status"] == "running"
    row = {
        "variant": "premier_compiled",
        "resolution": 1024,
        "batch": 1,
        "step_s": 0.2,
        "first_call_s": 40.0,
        "new_graphs": 3,
        "peak_gpu_gb": float("nan"),  # non-finite numbers are written as null
    }
    report.add("steps", row)
    data = json.loads((tmp_path / "gpu_suite.json").read_text())
    jsonschema.validate(data, SCHEMA)
    assert data["steps"][0]["peak_gpu_gb"] is None
    assert "| premier_compiled | 1024 | 1 | 200.0 |" in (tmp_path / "gpu_suite.md").read_text()
    report.skip("step plain_compiled 1024px B=8", "time budget")
    assert json.loads((tmp_path / "gpu_suite.json").read_text())["skipped"][-1]["reason"] == "time budget"
    for broken in (
        {k: v for k, v in data.items() if k != "steps"},
        {**data, "status": "done"},
        {**data, "steps": [{**data["steps"][0], "step_s": 0}]},
        {**data, "skipped": ["no reason"]},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(copy.deepcopy(broken), SCHEMA)


def test_preflight_tolerances_are_the_cpu_tests():
    spec = importlib.util.spec_from_file_location(
        "_interpreted", ROOT / "tests" / "kernels" / "test_kernels_interpreted.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.TOL == preflight.TOL
    from conftest import tiny_flux

    config = tiny_flux().config
    assert all(
        tuple(config[k]) == v if isinstance(v, tuple) else config[k] == v for k, v in preflight.SMALL_FLUX.items()
    )
    assert preflight.ZERO_DELTA_FP32_MAX_ABS == 1e-5  # tests/premier/test_transformer.py


# ----------------------------------------------------------------------------- the wheels
def test_wheel_pins_are_the_tested_versions_and_cover_what_the_run_imports():
    pins = _pins()
    assert {n for n, (_, role) in pins.items() if role == "always"} == {"diffusers", "torchao"}
    assert {role for _, role in pins.values()} == {"always", "fill-in"}
    constraints = {}
    for line in (ROOT / "constraints" / "cpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            constraints[canonicalize_name(name)] = version
    for name, (version, _) in pins.items():
        expected = constraints.get(name) or importlib.metadata.version(name)
        assert version == expected, f"{name}: pinned {version}, the project tests with {expected}"
    # The closure of diffusers' and torchao's requirements, minus a CUDA PyTorch image, is pinned.
    image = {canonicalize_name(n) for n in _sh(WHEELS, "--image").stdout.split()}
    assert {"torch", "numpy", "pillow"} <= image and not image & set(pins)
    todo, closure = ["diffusers", "torchao"], set()
    while todo:
        name = canonicalize_name(todo.pop())
        if name in closure or name in image:
            continue
        closure.add(name)
        for req in map(Requirement, importlib.metadata.requires(name) or []):
            if req.marker is None or req.marker.evaluate(TARGET_ENV):
                todo.append(req.name)
    assert closure == set(pins), (closure - set(pins), set(pins) - closure)


def test_wheel_script_arguments_and_dry_run(tmp_path):
    out = _sh(WHEELS, "--dry-run", "--python", "3.11", tmp_path / "w")
    assert out.returncode == 0, out.stderr
    assert "--python-version 3.11" in out.stdout and "--no-deps" in out.stdout and "--only-binary=:all:" in out.stdout
    assert (
        f"-d {tmp_path / 'w'}" in out.stdout and "diffusers==0.42.1" in out.stdout and "torchao==0.18.0" in out.stdout
    )
    assert not (tmp_path / "w").exists()  # a dry run creates and downloads nothing
    assert _sh(WHEELS, "--help").returncode == 0
    for bad, message in (
        (["--python"], "--python needs a version"),
        (["--python", "3"], "expected a version such as 3.12"),
        (["--fast"], "unknown option --fast"),
        (["a", "b"], "one folder only"),
    ):
        proc = _sh(WHEELS, *bad)
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)


def test_gpu_run_arguments_and_which_wheels_it_installs(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("diffusers-0.42.1-py3-none-any.whl", "zipp-4.1.2-py3-none-any.whl", "idna-3.19-py3-none-any.whl"):
        (wheels / name).touch()
    # A host Python that lacks zipp and idna (and has everything else): only those fill-ins are wanted.
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\ncat >/dev/null\necho 'zipp idna'\n")
    fake.chmod(0o755)
    proc = _sh(
        RUN, tmp_path / "out", "--full", "--budget-s", "120", "--wheels", wheels, "--dry-run", env={"PYTHON": str(fake)}
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "would install diffusers-0.42.1-py3-none-any.whl" in lines
    assert "would install zipp-4.1.2-py3-none-any.whl" in lines
    assert any(l.startswith("gpu-run: missing wheel torchao==0.18.0") and "own copy is used" in l for l in lines)
    assert any(l.startswith("gpu-run: missing wheel idna==3.20") and "the host has none" in l for l in lines)
    assert not any("requests" in l for l in lines)  # a fill-in the host has is neither installed nor missing
    (run,) = [l for l in lines if l.startswith("would run:")]
    assert "-m benchmarks.gpu_suite --full --out-dir" in run and "--budget-s 120" in run
    assert f"PYTHONPATH=<temporary folder>:{ROOT}" in run
    assert not (tmp_path / "out").exists()
    for bad, message in (
        ([], "OUT_DIR is required"),
        (["o", "--budget-s", "abc"], "expected a positive number"),
        (["o", "--budget-s", "0"], "expected a positive number"),
        (["o", "--smoke", "--full"], "exclude each other"),
        (["o", "--fast"], "unknown option --fast"),
        (["o", "p"], "one OUT_DIR only"),
    ):
        proc = _sh(RUN, *bad, "--dry-run")
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr)
