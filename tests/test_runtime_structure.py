"""The runtime's shape, checked on the CPU: no import cycle inside the package (no lazy import
upward either), and the simulation's policy module free of the kernels' machinery."""

import ast
import subprocess
import sys
from pathlib import Path

import hierasparse_gen

PACKAGE = Path(hierasparse_gen.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from .x import y`` anywhere in the file, function
    bodies included). ``from . import y`` counts as importing submodule y when y is one. A package's
    ``__init__`` re-exporting from its own submodules is a facade, not an import upward: those edges
    are left out (Python loads the submodules first either way)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        here = name if is_package else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = here.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.split(".")[0] == "hierasparse_gen":
                    target = node.module
                else:
                    continue
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in files]
                edges.update(subs or [target])
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in files)
        if is_package:
            edges = {e for e in edges if not e.startswith(name + ".")}
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None
    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        for n in graph[m] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_the_package_has_no_import_cycle():
    graph = _import_graph()
    assert {"hierasparse_gen.registry", "hierasparse_gen.ops.base", "hierasparse_gen.cache"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_check_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downward():
    graph = _import_graph()
    above_registry = {"hierasparse_gen.library", "hierasparse_gen.cache", "hierasparse_gen.hf",
                      "hierasparse_gen.bench", "hierasparse_gen.simulate"}
    assert not _reachable(graph, "hierasparse_gen.registry") & ({m for m in graph if m.startswith(
        "hierasparse_gen.ops")} | above_registry)
    assert "hierasparse_gen.registry" in _reachable(graph, "hierasparse_gen.ops.base")  # ops look libraries up there
    policy = _reachable(graph, "hierasparse_gen.policy")
    assert policy <= {"hierasparse_gen.errors"}


def test_the_simulation_loads_no_kernel_machinery():
    """hierasparse_gen.simulate (the pure-torch model of the cache) imports neither the ops, the compiler, the
    registry nor jinja2."""
    code = ("import sys, hierasparse_gen.simulate\n"
            "print(sorted(m for m in ('hierasparse_gen.ops', 'hierasparse_gen.compiler', 'hierasparse_gen.registry',"
            " 'hierasparse_gen.cache', 'jinja2') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
