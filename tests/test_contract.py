"""docs/contract.md holds: a plugin written against the first contract (the docs of 2026-11-28) still works, and a
renamed plugin keeps its old name, both in the plugin lists and in `gptopt plugins`.

``tests/data/first_contract/plugin-guide.md`` is ``docs/plugin-guide.md`` as of commit 5e49a61 (the end of the first
round, verbatim); ``tests/data/first_contract/gptopt-broken`` is that commit's ``docs/examples/gptopt-broken``.
"""
import json
import os
import re
import subprocess
import sys

from conftest import ROOT, run_gptopt

FIRST = ROOT / "tests" / "data" / "first_contract"


def _install_first_contract_plugins(tmp_path) -> dict:
    """The first guide's ``gptopt-hello`` files written as its reader copied them, and the first round's broken
    plugin, pip-installed into a target dir; the environment that puts them on the path."""
    text = (FIRST / "plugin-guide.md").read_text()
    files = dict(re.findall(r"<!-- file: (.+?) -->\n```\w*\n(.*?)```", text, flags=re.S))
    assert set(files) == {"gptopt-hello/pyproject.toml", "gptopt-hello/gptopt_hello/__init__.py",
                          "gptopt-hello/tests/test_hello.py"}
    for rel, content in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(content)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(tmp_path / "gptopt-hello"), str(FIRST / "gptopt-broken")], check=True, capture_output=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def test_a_plugin_written_from_the_first_contract_still_passes(tmp_path):
    env = _install_first_contract_plugins(tmp_path)
    # the first round's own checks of a third-party and a broken plugin (tests/test_core_cli.py at 5e49a61)
    steps = run_gptopt("steps", env=env)
    assert steps.returncode == 0 and "hello" in steps.stdout
    assert "plugin gptopt-broken failed to load: ModuleNotFoundError" in steps.stderr, steps.stderr
    plugins = json.loads(run_gptopt("plugins", "--json", env=env).stdout)
    by_name = {p["name"]: p for p in plugins}
    assert by_name["gptopt-hello"]["steps"] == ["hello"] and by_name["gptopt-hello"]["distribution"] == "gptopt-hello"
    assert "gptopt_this_module_does_not_exist" in by_name["gptopt-broken"]["error"]
    # the first contract's plugin list, each name still giving the steps it gave then (a plugin may gain steps:
    # gptopt-l1 gives robust too since issue 39; docs/contract.md)
    first = {"gptopt-core": ["eval", "save"], "gptopt-bench": ["bench"], "gptopt-bnb": ["quantize"],
             "gptopt-cpu": ["cpu-fast"], "gptopt-l1": ["l1"], "gptopt-prune": ["prune"],
             "gptopt-transfer": ["lora", "finetune"]}
    assert {name: by_name[name]["steps"][:len(steps)] for name, steps in first.items()} == first
    assert by_name["gptopt-bnb"]["renamed_to"] == "gptopt-quantize" and by_name["gptopt-bnb"]["error"] is None
    # the guide's own test, run as its reader would
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "gptopt-hello" / "tests")], env={**os.environ, **env},
                           capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout + tests.stderr


def test_a_renamed_plugin_is_listed_under_its_old_name_too():
    from gptopt_core.plugins import RENAMED, get_plugins

    plugins = get_plugins()
    listing = plugins.listing()
    names = [i.name for i in listing]
    for old, now in RENAMED.items():
        new, alias = listing[names.index(now)], listing[names.index(old)]
        assert names.index(old) == names.index(now) + 1  # right after the plugin itself
        assert new.aliases == [old] and new.renamed_to is None and old not in plugins.info
        assert alias.renamed_to == now and alias.aliases == [] and alias.steps == new.steps
    assert sum(i.renamed_to is None for i in listing) == len(plugins.info)
    text = run_gptopt("plugins").stdout
    assert "gptopt-bnb  (gptopt" in text and "(renamed: now gptopt-quantize)" in text


def test_the_summary_table_goes_to_stderr_unwrapped_without_a_terminal(capsys, monkeypatch):
    """docs/getting-started.md: the end-of-run table is on stderr, one line per row when stderr is a file or pipe
    (rich would wrap it at 80 columns), as wide as COLUMNS says when that is set."""
    import types

    from rich.console import Console

    from gptopt_core.plugins import get_plugins
    from gptopt_core.report import print_summary

    metrics = {"perplexity": 12345.678, "model_bytes": 123456789012, "sparsity": 0.5, "decode_tokens_per_s": 1234.5,
               "prefill_ms": 12345.6, "peak_memory_bytes": 123456789012}
    records = [{"name": name, "status": "ok", "seconds": 1234.5, "metrics": metrics}
               for name in ("quantize-with-a-long-name", "eval")]
    monkeypatch.delenv("COLUMNS", raising=False)
    ctx = types.SimpleNamespace(records=records, plugins=get_plugins(), console=Console(stderr=True), quiet=False,
                                is_main_process=True, model_spec="tiny-random-llama")
    print_summary(ctx)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and max(map(len, lines)) > 80
    rows = [line for line in lines if "quantize-with-a-long-name" in line or " eval " in line]
    assert len(rows) == 2 and all("123456.8" in row and "1234.5" in row for row in rows), err
    monkeypatch.setenv("COLUMNS", "80")
    ctx.console = Console(stderr=True)
    print_summary(ctx)
    assert max(map(len, capsys.readouterr().err.splitlines())) <= 80  # what the user asked for
