"""The shape of the code: no import circle inside the core or inside any plugin, and no torch on the way to
``import gptopt_core`` or ``gptopt --help`` (torch, transformers, rich and matplotlib load where a step needs them;
gptopt's own modules import each other at the top, so this graph is the whole story)."""
import ast
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGES = [ROOT / "gptopt_core"] + sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())


def import_graph(package) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, module names dotted from the package (``pipeline``,
    ``kit.grids``; ``__init__`` for the package itself, ``kit`` for a subpackage's ``__init__``), from every import
    statement anywhere in the file (top level or inside a function), relative or absolute."""
    files = {".".join(p.relative_to(package).with_suffix("").parts): p for p in package.rglob("*.py")}
    modules = {name.removesuffix(".__init__") if name != "__init__" else "__init__": p for name, p in files.items()}

    def owner(dotted: str) -> str:  # the longest module name that dotted (relative to the package) starts with
        parts = dotted.split(".") if dotted else []
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or "__init__"

    graph = {}
    for name, path in modules.items():
        here = [] if name == "__init__" else name.split(".")
        pkg = here if path.name == "__init__.py" else here[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    parts = alias.name.split(".")
                    if parts[0] == package.name:
                        deps.add(owner(".".join(parts[1:])))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
                    parts = base + (node.module.split(".") if node.module else [])
                else:
                    parts = (node.module or "").split(".")
                    if parts[0] != package.name:
                        continue
                    parts = parts[1:]
                for alias in node.names:  # from package import a: a submodule or a name of package
                    deps.add(owner(".".join(parts + [alias.name])))
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_import_circle(package):
    graph = import_graph(package)
    assert not cycles(graph), f"{package.name}: modules importing each other in a circle: {cycles(graph)}"


def test_the_graph_sees_real_imports_and_circles():
    core = import_graph(ROOT / "gptopt_core")
    assert "plugins" in core["pipeline"] and "kit.builtin" in core["plugins"] and "steps" in core["kit.builtin"]
    assert "kit.modules" in core["kit.calibration"] and "architectures" in core["kit.calibration"]  # across the subpackage
    assert not {"pipeline", "plugins", "recipes"} & core["kit.builtin"]  # the core's own plugin is a leaf
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


HEAVY = ("torch", "transformers", "matplotlib", "rich")


@pytest.mark.parametrize("code", [
    "import gptopt_core",
    "from gptopt_core.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass",
    "from gptopt_core import get_plugins\nget_plugins()",  # every installed plugin's __init__ and step.py
], ids=["import", "help", "plugins"])
def test_no_heavy_import_on_the_way_to_help(code):
    check = f"import sys\n{code}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
