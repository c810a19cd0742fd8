"""The suite's results: one JSON document and a short Markdown table, rewritten after every measurement.

Nothing is held back for the end: a run killed at any point leaves everything measured so far
under OUT_DIR (each file is replaced atomically, so a reader never sees half of one). `SCHEMA`
is the document's JSON Schema; `tests/benchmarks/test_gpu_suite.py` validates a smoke run's
document against it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import environment

SCHEMA_ID = "premier-gpu-suite/1"
STATUSES = ("running", "complete", "preflight_failed", "interrupted", "error")

_num = {"type": ["number", "null"]}
_str = {"type": "string"}
_timing = {
    "type": "object",
    "required": ["device_us", "host_us"],
    "properties": {"device_us": _num, "host_us": _num, "gb_per_s": _num, "fraction_of_copy": _num},
}
SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": [
        "schema",
        "benchmark",
        "mode",
        "status",
        "environment",
        "device",
        "versions",
        "config",
        "budget",
        "preflight",
        "kernels",
        "steps",
        "generations",
        "quantization",
        "checks",
        "targets",
        "skipped",
        "notes",
        "wall_s",
    ],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "benchmark": {"enum": ["gpu_suite", "gpu_suite_smoke"]},
        "mode": {"enum": ["full", "smoke"]},
        "status": {"enum": list(STATUSES)},
        "environment": {"type": "object"},
        "device": {
            "type": "object",
            "required": ["type", "cuda", "name", "capability", "no_gpu_reason"],
            "properties": {
                "type": {"enum": ["cuda", "cpu"]},
                "cuda": {"type": "boolean"},
                "name": {"type": ["string", "null"]},
                "capability": {"type": ["array", "null"], "items": {"type": "integer"}},
                "no_gpu_reason": {"type": ["string", "null"]},
            },
        },
        "versions": {"type": "object", "additionalProperties": {"type": ["string", "null"]}},
        "config": {"type": "object"},
        "budget": {
            "type": "object",
            "required": ["measurement_s", "effective_s", "used_s"],
            "properties": {"measurement_s": {"type": "number"}, "effective_s": _num, "used_s": _num},
        },
        "preflight": {
            "type": "object",
            "required": ["passed", "wall_s", "checks"],
            "properties": {
                "passed": {"type": ["boolean", "null"]},
                "wall_s": _num,
                "checks": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "passed", "wall_s"],
                        "properties": {
                            "name": _str,
                            "passed": {"type": ["boolean", "null"]},
                            "skipped": _str,
                            "wall_s": _num,
                        },
                    },
                },
            },
        },
        "kernels": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["op", "batch", "dim", "dtype", "bytes", "copy", "impls"],
                "properties": {
                    "op": _str,
                    "batch": {"type": "integer"},
                    "dim": {"type": "integer"},
                    "bytes": {"type": "integer"},
                    "copy": _timing,
                    "impls": {"type": "object", "additionalProperties": _timing},
                },
            },
        },
        "steps": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["variant", "resolution", "batch", "step_s", "first_call_s", "new_graphs", "peak_gpu_gb"],
                "properties": {
                    "variant": _str,
                    "resolution": {"type": "integer"},
                    "batch": {"type": "integer"},
                    "step_s": {"type": "number", "exclusiveMinimum": 0},
                    "first_call_s": {"type": "number"},
                    "new_graphs": {"type": "integer"},
                    "peak_gpu_gb": _num,
                },
            },
        },
        "generations": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["variant", "resolution", "batch", "steps", "total_s", "peak_gpu_gb"],
                "properties": {"total_s": {"type": "number", "exclusiveMinimum": 0}, "steps": {"type": "integer"}},
            },
        },
        "quantization": {"type": "object"},
        "checks": {"type": "object"},
        "targets": {"type": "object"},
        "skipped": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["what", "reason"],
                "properties": {"what": _str, "reason": _str},
            },
        },
        "notes": {"type": "array", "items": _str},
        "wall_s": {"type": "number"},
    },
}


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become null, tuples lists, anything else its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Report:
    """The result document, saved to `<out_dir>/<benchmark>.json` and `.md` after every change."""

    def __init__(self, out_dir: str | Path, benchmark: str, mode: str, start: float | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out_dir / f"{benchmark}.json"
        self.md_path = self.out_dir / f"{benchmark}.md"
        self.start = time.perf_counter() if start is None else start
        self.data: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "benchmark": benchmark,
            "mode": mode,
            "status": "running",
            "environment": environment(),
            "device": {"type": "cpu", "cuda": False, "name": None, "capability": None, "no_gpu_reason": None},
            "versions": {},
            "config": {},
            "budget": {"measurement_s": 0.0, "effective_s": None, "used_s": None},
            "preflight": {"passed": None, "wall_s": None, "checks": []},
            "kernels": [],
            "steps": [],
            "generations": [],
            "quantization": {},
            "checks": {},
            "targets": {},
            "skipped": [],
            "notes": [],
            "wall_s": 0.0,
        }

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def note(self, line: str) -> None:
        """One clear line for the log and the document (a missing wheel, no GPU, ...)."""
        print(line, flush=True)
        self.data["notes"].append(line)
        self.save()

    def skip(self, what: str, reason: str) -> None:
        print(f"skip {what}: {reason}", flush=True)
        self.data["skipped"].append({"what": what, "reason": reason})
        self.save()

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.data[section].append(row)
        self.save()

    def save(self) -> None:
        self.data["wall_s"] = time.perf_counter() - self.start
        data = _clean(self.data)
        _write(self.json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
        _write(self.md_path, markdown(data))


# ----------------------------------------------------------------------------- Markdown
def _f(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def markdown(d: dict[str, Any]) -> str:
    dev = d["device"]
    pre = d["preflight"]
    lines = [
        f"# GPU suite ({d['mode']}): {dev['name'] or dev['type']}",
        "",
        f"Status **{d['status']}** after {d['wall_s']:.0f} s; preflight "
        + {True: "passed", False: "**failed**", None: "not run"}[pre["passed"]]
        + (f" in {pre['wall_s']:.0f} s" if pre["wall_s"] is not None else "")
        + f"; budget {d['budget']['measurement_s']:.0f} s of measurement"
        + (f", {d['budget']['used_s']:.0f} s used." if d["budget"]["used_s"] is not None else "."),
        "",
    ]
    failed = [c for c in pre["checks"] if c["passed"] is False]
    for c in failed:
        lines.append(f"- preflight FAILED: {c['name']}: {c.get('error') or c.get('details')}")
    if d["kernels"]:
        lines += [
            "## Kernels (device time per call from CUDA graph replay; host-inclusive beside it)",
            "",
            "| op | B | impl | device µs | host µs | GB/s | of copy |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in d["kernels"]:
            for name, t in [*r["impls"].items(), ("copy (same bytes)", r["copy"])]:
                lines.append(
                    f"| {r['op']} | {r['batch']} | {name} | {_f(t.get('device_us'))} | {_f(t.get('host_us'))} | "
                    f"{_f(t.get('gb_per_s'), digits=0)} | {_pct(t.get('fraction_of_copy'))} |"
                )
        lines.append("")
    if d["steps"]:
        lines += [
            "## One denoising step",
            "",
            "| variant | res | B | step ms | images/s per step | first call s | new graphs | peak GiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in d["steps"]:
            lines.append(
                f"| {r['variant']} | {r['resolution']} | {r['batch']} | {_f(r['step_s'], 1e3)} | "
                f"{_f(r['batch'] / r['step_s'], digits=2)} | {_f(r['first_call_s'])} | {r['new_graphs']} | "
                f"{_f(r['peak_gpu_gb'])} |"
            )
        lines.append("")
    if d["generations"]:
        lines += [
            "## Generations",
            "",
            "| variant | res | B | steps | total s | peak GiB |",
            "|---|---|---|---|---|---|",
        ]
        for r in d["generations"]:
            lines.append(
                f"| {r['variant']} | {r['resolution']} | {r['batch']} | {r['steps']} | {_f(r['total_s'], digits=2)} | "
                f"{_f(r['peak_gpu_gb'])} |"
            )
        lines.append("")
    targets = {k: v for k, v in d["targets"].items() if isinstance(v, dict) and "pass" in v}
    if targets:
        lines += ["## Targets", ""]
        lines += [f"- {k}: {_f(v['value'], digits=3)} ({'pass' if v['pass'] else 'FAIL'})" for k, v in targets.items()]
        lines.append("")
    if d["skipped"]:
        lines += ["## Skipped", ""] + [f"- {s['what']}: {s['reason']}" for s in d["skipped"]] + [""]
    if d["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in d["notes"]] + [""]
    return "\n".join(lines)
