"""No hidden ties through the model object: a ``gptopt_<x>`` attribute a plugin puts on a model (or a module) is
read only by that plugin. Another plugin learns what it needs from facts (``ctx.facts``: ``cpu-only``,
``quantized:cpu-int8``, ...), ``ctx.state`` keys or the core's public API, never from ``model.gptopt_cpu``.

The scan is static (every ``x.gptopt_<name>`` and ``getattr/hasattr/setattr(x, "gptopt_<name>")`` in a plugin's
files); hook calls (``ctx.hook.gptopt_save_model``) are not attributes of a model and are left out."""
import ast

import pytest
from conftest import ROOT

from gptopt_core.hookspecs import hook_names

PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())
EXAMPLES = sorted(p.parent for p in (ROOT / "docs" / "examples").glob("*/*/__init__.py"))
HOOKS = set(hook_names())


def attribute_uses(source: str, where: str) -> tuple[dict, dict]:
    """``(set, read)``: ``{attribute name: ["where:line", ...]}`` of the ``gptopt_*`` attributes ``source`` sets
    (assignment, ``setattr``) and reads (load, ``getattr``, ``hasattr``, ``delattr``)."""
    sets, reads = {}, {}
    for node in ast.walk(ast.parse(source)):
        name, store = None, False
        if isinstance(node, ast.Attribute) and node.attr.startswith("gptopt_") and node.attr not in HOOKS:
            name, store = node.attr, isinstance(node.ctx, ast.Store)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
              and node.args[1].value.startswith("gptopt_")):
            name, store = node.args[1].value, node.func.id == "setattr"
        if name:
            (sets if store else reads).setdefault(name, []).append(f"{where}:{node.lineno}")
    return sets, reads


def package_uses(package) -> tuple[dict, dict]:
    sets, reads = {}, {}
    for path in sorted(package.rglob("*.py")):
        s, r = attribute_uses(path.read_text(), str(path.relative_to(package.parent)))
        for table, part in ((sets, s), (reads, r)):
            for name, places in part.items():
                table.setdefault(name, []).extend(places)
    return sets, reads


def foreign_reads(packages) -> list[str]:
    """Every read of a ``gptopt_*`` attribute in a package that does not set it itself, with who does."""
    uses = {p.name: package_uses(p) for p in packages}
    setters = {}
    for pkg, (sets, _) in uses.items():
        for name in sets:
            setters.setdefault(name, []).append(pkg)
    found = []
    for pkg, (sets, reads) in uses.items():
        for name, places in sorted(reads.items()):
            if name not in sets:
                owner = ", ".join(setters.get(name, [])) or "no plugin (the core, or nobody)"
                found.append(f"{pkg} reads {name} ({', '.join(places)}), which is set by {owner}")
    return found


def test_no_plugin_reads_a_model_attribute_another_plugin_set():
    found = foreign_reads(PLUGINS + EXAMPLES)
    assert not found, ("a plugin reads an attribute it did not put on the model; use facts, ctx.state or the core's "
                       "public API instead:\n" + "\n".join(found))


def test_the_scan_sees_a_planted_tie(tmp_path):
    """The planted fault, kept: ctensors reading cpu-fast's record again is caught (both spellings), a plugin
    reading what it set itself is not, and neither is a hook call."""
    for name, code in {"gptopt_cpu": "def save(model):\n    model.gptopt_cpu = {}\n    return model.gptopt_cpu\n",
                       "gptopt_ctensors": "def refusal(ctx, model):\n"
                                          "    ctx.hook.gptopt_save_model(ctx=ctx, model=model, path=None)\n"
                                          "    return getattr(model, 'gptopt_cpu', None) or model.gptopt_cpu\n"}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(code)
    found = foreign_reads([tmp_path / "gptopt_cpu", tmp_path / "gptopt_ctensors"])
    assert len(found) == 1 and found[0].startswith("gptopt_ctensors reads gptopt_cpu (")
    assert found[0].count(":3") == 2 and found[0].endswith("set by gptopt_cpu")


@pytest.mark.parametrize("package", PLUGINS, ids=lambda p: p.name)
def test_plugins_are_scanned(package):
    """The scan reads every plugin's files (a package it cannot parse would hide its ties)."""
    package_uses(package)
