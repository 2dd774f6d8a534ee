"""The code's shape: every module imports on its own, no import cycles (module-level or hidden in a function),
no module over 400 lines, the library never imports Streamlit, and no test double ships in the product."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import zimage

PACKAGE = Path(zimage.__file__).parent
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the zimage modules it imports anywhere in its body (a submodule's own ancestors excluded)."""
    files = module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in files}
                deps.update(subs or ({base} if base in files else set()))
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def rooms(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The same graph one level up: zimage.jobs, zimage.registry, ... (top-level modules are their own room)."""
    out: dict[str, set[str]] = {}
    for module, deps in graph.items():
        room = ".".join(module.split(".")[:2])
        out.setdefault(room, set()).update(".".join(d.split(".")[:2]) for d in deps)
        out[room].discard(room)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_modules_or_rooms():
    graph = import_graph()
    assert len(graph) > 50 and "zimage.fsio" in graph["zimage.data.folders"]  # the graph sees real imports
    assert cycles(graph) == []
    assert cycles(rooms(graph)) == []


def test_no_module_is_over_400_lines():
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_library_never_imports_streamlit_and_ships_no_test_double():
    for name, path in module_files().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "streamlit" not in imported, name
        defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        assert not [d for d in defined if d.startswith(("Fake", "fake_", "Dummy", "Mock"))], name


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter():
    names = [m.name for m in pkgutil.walk_packages(zimage.__path__, "zimage.") if not m.name.endswith("__main__")]

    def try_import(name: str) -> tuple[str, int, str]:
        out = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
        return name, out.returncode, out.stderr[-500:]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(n, err) for n, rc, err in pool.map(try_import, names) if rc != 0]
    assert len(names) > 50 and failures == []
