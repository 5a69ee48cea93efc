"""The layers of docs/architecture.md, checked on the source: every import of an instill module
goes down the layers (or stays inside its own package), and no report imports its experiment."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "instill"

#: Layer of each module (first matching prefix wins), as in docs/architecture.md.
LAYERS = [
    ("instill.errors", 1), ("instill.seeds", 1), ("instill.stats", 1), ("instill.devices", 1),
    ("instill.storage", 2), ("instill.methods", 2), ("instill.models", 2),
    ("instill.core", 3), ("instill.tasks", 3), ("instill.runio", 3), ("instill.checkpoint", 3),
    ("instill.training", 4), ("instill.analysis", 4),
    ("instill.batched", 5),
    *((f"instill.experiments.{m}", 5) for m in (
        "framework", "executors", "pipeline", "common", "reporting")),
    ("instill.experiments", 6),
    ("instill.cli", 7), ("instill.__main__", 7),
]


def _module(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS and docs/architecture.md")


def _imports(path: Path) -> set[str]:
    """instill modules imported anywhere in the file (lazy imports inside functions too)."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("instill")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            if not base.startswith("instill"):
                continue
            folder = SRC.parent.joinpath(*base.split("."))
            subs = {f"{base}.{a.name}" for a in node.names
                    if (folder / f"{a.name}.py").exists() or (folder / a.name).is_dir()}
            found |= subs or {base}  # `from instill import stats` names a module
    return found


def _edges() -> list[tuple[str, str]]:
    return [(_module(p), m) for p in sorted(SRC.rglob("*.py")) if p.name != "__init__.py"
            for m in _imports(p)]


def test_imports_go_down_the_layers():
    def package(module: str) -> str:
        return module.rsplit(".", 1)[0]

    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, b in _edges()
              if _layer(b) > _layer(a) or (_layer(b) == _layer(a) and package(a) != package(b)
                                            and not b.startswith(package(a)))]
    assert upward == []


def test_the_core_knows_nothing_of_tasks_runs_or_experiments():
    bad = [(a, b) for a, b in _edges() if a.startswith("instill.core")
           and b.startswith(("instill.tasks", "instill.runio", "instill.experiments",
                             "instill.training"))]
    assert bad == []


def test_reports_do_not_import_their_experiment():
    bad = [(a, b) for a, b in _edges() if a.endswith("_report")
           and b == a.removesuffix("_report")]
    assert bad == []


def test_no_import_circles():
    graph: dict[str, set[str]] = {}
    for a, b in _edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, node])):
                return cycle
        state[node] = 2
        return None

    cycles = [c for n in sorted(graph) if n not in state and (c := visit(n, []))]
    assert cycles == []


def test_experiments_do_not_import_each_other():
    """An experiment imports the framework layer and its own config/report/data modules; what
    two experiments share moves down a layer."""
    def family(module: str) -> str:
        return module.rsplit(".", 1)[-1].split("_")[0]

    bad = [(a, b) for a, b in _edges() if _layer(a) == _layer(b) == 6
           and family(a) != family(b)]
    assert bad == []
