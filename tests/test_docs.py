"""Docs cannot drift: generated references match the code; the guide's example installs and runs verbatim."""
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, run_gptopt

from gptopt_core.tools import docgen


def test_generated_references_match_the_code():
    for path, text in docgen.generated().items():
        assert path.read_text() == text, f"{path.name} is stale: run python -m gptopt_core.tools.docgen"


def test_every_hook_is_documented_and_tested():
    hooks_doc = (ROOT / "docs" / "hooks.md").read_text()
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py") if p.name != "test_docs.py")
    for name in docgen.hook_names():
        assert f"`{name}(" in hooks_doc, f"{name} missing from docs/hooks.md"
        assert name in tests, f"no test mentions {name}"


def guide_files():
    text = (ROOT / "docs" / "plugin-guide.md").read_text()
    return dict(re.findall(r"<!-- file: (.+?) -->\n```\w*\n(.*?)```", text, flags=re.S))


def test_guide_files_are_the_example_package():
    files = guide_files()
    assert set(files) == {"gptopt-hello/pyproject.toml", "gptopt-hello/gptopt_hello/__init__.py",
                          "gptopt-hello/tests/test_hello.py", "gptopt-starcoder2/pyproject.toml",
                          "gptopt-starcoder2/gptopt_starcoder2/__init__.py",
                          "gptopt-starcoder2/tests/test_starcoder2.py", "gptopt-clip/pyproject.toml",
                          "gptopt-clip/gptopt_clip/__init__.py", "gptopt-clip/tests/test_clip.py"}
    for rel, content in files.items():
        assert (ROOT / "docs" / "examples" / rel).read_text() == content


def install_guide_package(tmp_path, package: str) -> dict:
    """Write the guide's files of ``package`` as a user would copy them, pip-install it into a target dir and
    return the environment that puts it on the path."""
    for rel, content in guide_files().items():
        if rel.startswith(package + "/"):
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_text(content)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(tmp_path / package)], check=True, capture_output=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def test_guide_example_installs_and_runs_verbatim(tmp_path):
    env = install_guide_package(tmp_path, "gptopt-hello")
    assert "hello" in run_gptopt("steps", env=env).stdout
    proc = run_gptopt("run", "--model", "tiny-random-llama", "hello", "--name", "you", "--times", "2", "eval",
                      "--max-tokens", "600", env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr.count("Hello, you!") == 2, proc.stderr
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "gptopt-hello" / "tests")], env={**os.environ, **env},
                           capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout + tests.stderr


def test_every_committed_recipe_validates():
    from pathlib import Path

    from gptopt_core import Pipeline

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 12
    for path in recipes:
        Pipeline.from_recipe(path).validate()  # raises a one-line GptoptError on any bad key, value or order


def test_guide_family_example_installs_and_runs_verbatim(tmp_path):
    """The plugin guide's StarCoder2 row (gptopt_register_architectures): installed as a user would, the family's
    tiny model runs a chain into llama.cpp, its own test passes, and the CLI lists it."""
    env = install_guide_package(tmp_path, "gptopt-starcoder2")
    proc = run_gptopt("run", "--model", "tiny-random-starcoder2", "export", "--to", tmp_path / "s.gguf", "--type",
                      "f32", env=env, cwd=tmp_path)
    assert proc.returncode == 0 and (tmp_path / "s.gguf").is_file(), proc.stderr
    plugins = run_gptopt("plugins", env=env).stdout
    assert "gptopt-starcoder2" in plugins
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "gptopt-starcoder2" / "tests")], env={**os.environ, **env},
                           capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0 and "2 passed" in tests.stdout, tests.stdout + tests.stderr


def test_guide_observer_example_installs_and_runs_verbatim(tmp_path):
    """The plugin guide's clip99 observer (gptopt_register_observers): installed as a user would, it is listed, its
    own test (quantize --method rtn and gptq with it) passes, and an unknown observer names the registered ones."""
    env = install_guide_package(tmp_path, "gptopt-clip")
    plugins = run_gptopt("plugins", env=env).stdout
    assert "gptopt-clip  (gptopt-clip 0.1.0)\n    observers: clip99" in plugins, plugins
    bad = run_gptopt("run", "--model", "tiny-random-llama", "quantize", "--method", "rtn", "--bits", "4",
                     "--observer", "clip98", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "unknown observer 'clip98'; registered: clip99, hmse, minmax, mse" in bad.stderr
    tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(tmp_path / "gptopt-clip" / "tests")], env={**os.environ, **env},
                           capture_output=True, text=True, cwd=tmp_path)
    assert tests.returncode == 0 and "1 passed" in tests.stdout, tests.stdout + tests.stderr


def test_save_format_worked_example_runs_as_written(tmp_path):
    """docs/save-formats.md's worked example: registered from the page's code, it writes and plan-refuses as the
    page says."""
    import types

    import pytest

    from gptopt_core import Pipeline, PlanError
    from gptopt_core.kit.testing import register_plugin

    text = (ROOT / "docs" / "save-formats.md").read_text()
    code = re.search(r"A worked example.*?```python\n(.*?)```", text, flags=re.S).group(1)
    module = types.ModuleType("torch_state_example")
    exec(compile(code, "save-formats.md", "exec"), module.__dict__)
    with register_plugin(module, "torch-state-example"):
        Pipeline(model="tiny-random-llama", device="cpu", quiet=True).add(
            "save", to=tmp_path / "m", format="torch-state").run()
        assert {"state.pt", "config.json", "recipe.yaml", "run.json"} <= {p.name for p in (tmp_path / "m").iterdir()}
        with pytest.raises(PlanError, match="save --format torch-state: 4-bit bitsandbytes weights"):
            Pipeline(model="tiny-random-llama").add("save", to=tmp_path / "n", format="torch-state").validate(
                {"quantized:4bit"})
