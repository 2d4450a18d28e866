"""One public API: plugins, benchmarks and the docs example import only names in ``gptopt_core.__all__``; every
public name resolves, is documented in docs/python-api.md with its signature, and loads lazily (fast --help)."""
import ast
import importlib
import subprocess
import sys

from conftest import ROOT

import gptopt_core
from gptopt_core import docgen

USERS = ("plugins", "benchmarks", "docs/examples")


def core_imports():
    """``(file, module, name)`` for every ``from gptopt_core[...] import name`` outside the core and its tests."""
    for top in USERS:
        for path in sorted((ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gptopt_core":
                    for alias in node.names:
                        yield path.relative_to(ROOT), node.module, alias.name


def test_plugins_benchmarks_and_examples_import_only_public_names():
    public = {id(getattr(gptopt_core, n)): n for n in gptopt_core.__all__}
    seen, private = set(), []
    for path, module, name in core_imports():
        seen.add(name)
        obj = getattr(importlib.import_module(module), name, None)
        if module != "gptopt_core" and id(obj) not in public:
            private.append(f"{path}: from {module} import {name}")
        elif module == "gptopt_core" and name not in gptopt_core.__all__:
            private.append(f"{path}: from gptopt_core import {name}")
    assert not private, "not in gptopt_core.__all__ (make it public or stop using it):\n" + "\n".join(private)
    assert {"Step", "hookimpl", "weight_modules", "perplexity", "make_context"} <= seen  # the scan sees real imports


#: plugin files still importing public names from a core submodule (none left; the set may only shrink)
SUBMODULE_IMPORTS_PENDING: set = set()


def test_plugins_import_public_names_from_gptopt_core_itself():
    """docs/python-api.md: import from ``gptopt_core``; the submodule a name is defined in may change."""
    found = {str(path) for path, module, _ in core_imports() if str(path).startswith("plugins/")
             and module != "gptopt_core"}
    assert found <= SUBMODULE_IMPORTS_PENDING, sorted(found - SUBMODULE_IMPORTS_PENDING)


def test_no_plugin_imports_another_plugin():
    packages = {p.name for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists()}
    for package in packages:
        for path in (ROOT / "plugins" / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
                for name in names:
                    assert name.split(".")[0] not in packages - {package}, f"{path} imports {name}"


def test_every_public_name_resolves_and_is_documented_with_its_signature():
    text = (ROOT / "docs" / "python-api.md").read_text()
    assert text == docgen.python_api_markdown(), "docs/python-api.md is stale: run python -m gptopt_core.tools.docgen"
    for name in gptopt_core.__all__:
        obj = getattr(gptopt_core, name)
        assert f"### `{name}" in text or f"### `class {name}" in text, name
        if callable(obj) and not isinstance(obj, type):
            assert f"{name}{docgen._plain_signature(__import__('inspect').signature(obj))}" in text, name
    assert "| `masks` | gptopt-prune |" in text  # the state-key table is rendered


def test_public_helpers_load_lazily():
    code = ("import sys, gptopt_core; assert 'torch' not in sys.modules; "
            "gptopt_core.perplexity; assert 'gptopt_core.kit.evaluate' in sys.modules; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "ok", proc.stderr
