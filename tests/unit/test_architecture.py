"""The package's layering, read from the source: which module may import which.

Every import counts, at module level or inside a function (a lazy import is still a dependency
that a reader must follow), except those under ``if TYPE_CHECKING:``.

The source is parsed in a fresh interpreter (this file run as a script): CPython 3.11's
``ast.parse`` can fail with "AST constructor recursion depth mismatch" in a process whose
earlier work left its recursion counters off (seen after the rest of the suite had run), and
the layering must not depend on what ran before it.
"""
from __future__ import annotations

import ast
import functools
import graphlib
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"edje_search": ROOT / "edje_search", "edje_search_cli": ROOT / "cli"}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for child in node.body for n in ast.walk(child))
    return skipped


def _import_graph_here() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from x import name`` counts ``x.name`` when it
    is a module, else ``x``)."""
    files = {}
    for package, root in PACKAGES.items():
        for path in root.rglob("*.py"):
            files[_module_name(package, root, path)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = module.split(".") if is_pkg else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
    return graph


def _classes_here() -> list[tuple[str, str, int]]:
    """(file, class, lines) of every class in the packages."""
    out = []
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    out.append((path.relative_to(ROOT).as_posix(), node.name, node.end_lineno - node.lineno + 1))
    return out


@functools.lru_cache(maxsize=1)
def _parsed() -> dict:
    """The import graph and class sizes, computed by this file run in a fresh interpreter."""
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from x import name`` counts ``x.name`` when it
    is a module, else ``x``)."""
    return {m: set(deps) for m, deps in _parsed()["graph"].items()}


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (as graphlib reports it), or [] when the graph has none."""
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return []


def _is_package_init(name: str) -> bool:
    return (PACKAGES["edje_search"] / Path(*name.split(".")[1:]) / "__init__.py").is_file()


def test_no_import_cycles():
    graph = import_graph()
    assert "edje_search.storage.index_store" in graph["edje_search.engine"]  # the graph was read
    # A package's __init__ that re-exports its modules (lazily) is a table of contents, not a layer.
    graph = {m: {t for t in deps if not _is_package_init(t)} for m, deps in graph.items()}
    assert _cycle(graph) == []


def _imports_from(prefix: str, target: str) -> list[tuple[str, str]]:
    graph = import_graph()
    return sorted((m, t) for m, deps in graph.items() if m.startswith(prefix)
                  for t in deps if t == target or t.startswith(target + "."))


def test_storage_imports_neither_models_nor_engine():
    assert _imports_from("edje_search.storage", "edje_search.models") == []
    assert _imports_from("edje_search.storage", "edje_search.engine") == []
    assert _imports_from("edje_search.storage", "edje_search.indexer") == []


def test_evaluation_does_not_import_training():
    assert _imports_from("edje_search.evaluation", "edje_search.training") == []


def test_engine_internals_stay_inside_the_engine():
    """``engine.store`` and ``engine.model`` are the engine's own: other modules use its methods."""
    allowed = {"edje_search/engine.py", "edje_search/indexer.py"}
    found = []
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if rel in allowed:
                continue
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if re.search(r"\bengine\.(store|model)\b", line):
                    found.append(f"{rel}:{i}: {line.strip()}")
    assert found == []


def test_modules_and_classes_stay_small():
    """No module over 450 lines, no class over 300: a reader can hold one in mind."""
    too_big = []
    for root in PACKAGES.values():
        for path in root.rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            rel = path.relative_to(ROOT).as_posix()
            if text.count("\n") > 450:
                too_big.append(f"{rel}: {text.count(chr(10))} lines")
    too_big += [f"{rel}: class {name} {lines} lines" for rel, name, lines in _parsed()["classes"] if lines > 300]
    assert too_big == []


def test_code_cites_no_document_outside_the_repository():
    cited = []
    for top in ("edje_search", "cli", "tests"):
        for path in (ROOT / top).rglob("*.py"):
            if path.name == "test_architecture.py":
                continue
            if "DESIGN" + ".md" in path.read_text(encoding="utf-8"):
                cited.append(path.relative_to(ROOT).as_posix())
    assert cited == []


if __name__ == "__main__":
    print(json.dumps({"graph": {m: sorted(d) for m, d in _import_graph_here().items()}, "classes": _classes_here()}))
