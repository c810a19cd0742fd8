"""The layering of docs/architecture.md, checked on the source: no import circles, imports point down only.

Every import counts, at module level and inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kernels", "premier", "store", "serving")
MAX_LINES = 400  # "about 350", with room for the formatter's wrapping


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an imported name belongs to (its longest known prefix)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in MODULES:
            return ".".join(parts)
        parts.pop()
    return None


def _imports(mod: str, path: Path) -> tuple[set[str], list[str]]:
    """(project modules `mod` imports, the string arguments of its importlib.import_module calls)."""
    tree = ast.parse(path.read_text(), str(path))
    deps: set[str] = set()
    dynamic: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            deps.update(r for a in node.names if (r := _resolve(a.name)))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            for a in node.names:
                r = _resolve(f"{base}.{a.name}")
                if r:
                    deps.add(r)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            dynamic += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    deps.discard(mod)
    return deps, dynamic


GRAPH = {mod: _imports(mod, path) for mod, path in MODULES.items()}


def test_the_graph_is_read():
    assert len(MODULES) > 60 and "serving.ingress" in GRAPH["serving.app"][0] or "serving.ingress" in str(GRAPH)
    assert "premier.pipeline" in GRAPH["serving.generator"][0]


def test_no_import_circles():
    # A package's __init__ may re-export its own modules: those edges are not layering, leave them out.
    edges = {
        m: {d for d in deps if not (MODULES[d].name == "__init__.py" and m.startswith(d + "."))}
        for m, (deps, _) in GRAPH.items()
    }
    try:
        list(graphlib.TopologicalSorter(edges).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import circle: {' -> '.join(e.args[1])}")


def test_imports_point_down():
    allowed = {
        "kernels": set(),
        "premier": {"kernels"},
        "store": {"kernels", "premier"},
        "serving": {"kernels", "premier", "store"},
    }
    wrong = []
    for mod, (deps, _) in GRAPH.items():
        layer = mod.split(".")[0]
        for d in deps:
            target = d.split(".")[0]
            if target != layer and target not in allowed[layer] and mod != "premier.cli":
                wrong.append(f"{mod} -> {d}")
    assert not wrong, wrong


def test_the_command_root_is_a_leaf_and_imports_each_layer_explicitly():
    importers = [m for m, (deps, _) in GRAPH.items() if "premier.cli" in deps and m != "premier.__main__"]
    assert importers == []
    deps, _ = GRAPH["premier.cli"]
    assert {"serving.cli", "store.cli", "premier.training.cli", "premier.world.cli", "premier.commands"} <= deps


def test_no_import_module_strings_between_layers():
    crossing = [
        f"{m} -> {name}"
        for m, (_, dynamic) in GRAPH.items()
        for name in dynamic
        if name.split(".")[0] in PACKAGES and name.split(".")[0] != m.split(".")[0]
    ]
    assert not crossing, crossing


def test_serving_never_drives_the_command_line():
    for mod, (deps, _) in GRAPH.items():
        if mod.startswith("serving.") and mod != "serving.cli":
            assert not any(d.endswith(".cli") or d == "premier.commands" for d in deps), (mod, deps)
    fit_job, _ = GRAPH["serving.fit_job"]
    assert "premier.training.fit" in fit_job  # fitting is a library call
    assert "subprocess" not in (ROOT / "serving" / "fit_job.py").read_text()


def test_modules_stay_small_or_say_why():
    long = []
    for mod, path in MODULES.items():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and "one module" not in doc and "one file" not in doc:
            long.append(f"{mod}: {lines} lines")
    assert not long, long
