"""Broken plugins of every kind are reported by name and unregistered completely; every other plugin keeps working.

In process (a fresh plugin manager, one broken module at a time) and as a user meets them: real distributions
(``*.dist-info`` with ``entry_points.txt``) on ``PYTHONPATH`` next to a working plugin, through the real CLI.
"""
import json
import textwrap
import types
import warnings

import pytest
from conftest import error_lines, run_gptopt

from gptopt_core import GptoptError, Step, hookimpl
from gptopt_core.plugins import CORE, PluginLoadWarning, Plugins
from gptopt_core.kit.testing import register_plugin


class Good(Step):
    """A step from a working plugin."""

    name = "good"

    def apply(self, ctx):
        return {}


class Nameless(Step):
    """A step without a name."""

    def apply(self, ctx):
        return {}


class FakeEval(Step):
    """A second `eval`."""

    name = "eval"


class Other(Step):
    """Another step."""

    name = "other"


def plugin(**hooks):
    """A plugin object whose attributes are the given hook implementations."""
    return types.SimpleNamespace(**hooks)


def steps_hook(*classes):
    @hookimpl
    def gptopt_register_steps(register):
        for cls in classes:
            register(cls)

    return gptopt_register_steps


@hookimpl
def gptopt_step_started(ctx, step):
    raise AssertionError("a rejected plugin's hook must never run")


def fresh(strict=False):
    from gptopt_core.kit import builtin

    plugins = Plugins(strict=strict)
    plugins.register(builtin, CORE, "gptopt", builtin=True)
    good = plugins.register(plugin(gptopt_register_steps=steps_hook(Good)), "gptopt-good")
    assert good.error is None and plugins.steps["good"].plugin == "gptopt-good"
    return plugins


def misspelled():
    @hookimpl
    def gptopt_step_finshed(ctx, step, record):
        pass

    return plugin(gptopt_register_steps=steps_hook(Other), gptopt_step_finshed=gptopt_step_finshed)


def unmarked():
    def gptopt_step_finished(ctx, step, record):  # no @hookimpl: pluggy would skip it silently
        pass

    return plugin(gptopt_step_finished=gptopt_step_finished)


def bad_args():
    @hookimpl
    def gptopt_step_finished(ctx, step, recrod):
        pass

    return plugin(gptopt_step_started=gptopt_step_started, gptopt_step_finished=gptopt_step_finished)


def raises_in_register():
    @hookimpl
    def gptopt_register_steps(register):
        register(Other)
        raise RuntimeError("no GPU driver")

    return plugin(gptopt_register_steps=gptopt_register_steps, gptopt_step_started=gptopt_step_started)


BROKEN = {  # what is wrong → (plugin object, the reason gptopt gives)
    "unknown hook": (misspelled, "implements unknown hook gptopt_step_finshed (did you mean gptopt_step_finished?)"),
    "unmarked hook": (unmarked, "gptopt_step_finished is not marked @hookimpl"),
    "bad hook arguments": (bad_args, "Argument(s) {'recrod'} are declared in the hookimpl but can not be found"),
    "step without name": (lambda: plugin(gptopt_register_steps=steps_hook(Other, Nameless),
                                         gptopt_step_started=gptopt_step_started),
                          "registered step class Nameless without a name"),
    "not a step": (lambda: plugin(gptopt_register_steps=steps_hook(Other, dict)),
                   "registered <class 'dict'>, which is not a gptopt_core.Step subclass"),
    "core step name": (lambda: plugin(gptopt_register_steps=steps_hook(Other, FakeEval),
                                      gptopt_step_started=gptopt_step_started),
                       "step 'eval' is already registered by plugin gptopt-core"),
    "other plugin's step name": (lambda: plugin(gptopt_register_steps=steps_hook(Good)),
                                 "step 'good' is already registered by plugin gptopt-good"),
    "register_steps raises": (raises_in_register, "gptopt_register_steps raised RuntimeError: no GPU driver"),
}


@pytest.mark.parametrize("kind", BROKEN)
def test_a_broken_plugin_is_reported_and_unregistered_completely(kind):
    make, reason = BROKEN[kind]
    plugins = fresh()
    with pytest.warns(PluginLoadWarning, match="plugin gptopt-bad: "):
        info = plugins.register(make(), "gptopt-bad")
    assert reason in info.error and "\n" not in info.error
    assert plugins.info["gptopt-bad"].error == info.error and info.steps == [] and info.hooks == []
    assert plugins.pm.get_plugin("gptopt-bad") is None
    assert all(impl.plugin_name != "gptopt-bad" for caller in plugins.pm.hook.__dict__.values()
               if hasattr(caller, "get_hookimpls") for impl in caller.get_hookimpls())
    # nothing it registered survives; the core's and the good plugin's steps are untouched
    assert set(plugins.steps) == {"eval", "save", "good"}
    assert plugins.steps["eval"].plugin == "gptopt-core" and plugins.steps["good"].plugin == "gptopt-good"
    plugins.hook.gptopt_step_started(ctx=None, step=None)  # its observer is gone


@pytest.mark.parametrize("kind", ["unknown hook", "core step name", "register_steps raises"])
def test_strict_mode_makes_a_broken_plugin_one_error(kind):
    make, reason = BROKEN[kind]
    plugins = fresh(strict=True)
    with pytest.raises(GptoptError, match="GPTOPT_STRICT_PLUGINS=1") as exc:
        plugins.register(make(), "gptopt-bad")
    assert str(exc.value).startswith("plugin gptopt-bad: ") and reason in str(exc.value)


def test_a_plugin_that_provides_nothing_is_a_warning_and_strict_error():
    plugins = fresh()
    with pytest.warns(PluginLoadWarning, match="gptopt-empty: provides no hooks and no steps"):
        info = plugins.register(types.SimpleNamespace(helper=lambda: 1), "gptopt-empty")
    assert info.error is None and "no hooks and no steps" in info.warning
    with pytest.raises(GptoptError, match="gptopt-empty: provides no hooks and no steps"):
        fresh(strict=True).register(types.SimpleNamespace(), "gptopt-empty")


def test_register_plugin_fixture_raises_the_reason_and_leaves_nothing():
    with pytest.raises(GptoptError, match="step 'eval' is already registered by plugin gptopt-core"):
        with register_plugin(plugin(gptopt_register_steps=steps_hook(Other, FakeEval)), "test-dup"):
            pass
    from gptopt_core.plugins import get_plugins

    assert "test-dup" not in get_plugins().info and "other" not in get_plugins().steps
    assert get_plugins().steps["eval"].plugin == "gptopt-core"


@pytest.mark.parametrize("var, value", [("GPTOPT_BLOCK_PLUGINS", "gptopt-prune"),
                                        ("GPTOPT_LOAD_PLUGINS", "gptopt-bench")])
def test_registering_under_a_name_the_environment_excludes_is_an_error(monkeypatch, var, value):
    """pluggy registers nothing, silently, under a blocked name: the core says so instead."""
    monkeypatch.setenv(var, value)
    plugins = Plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugins.load_entry_points()
        info = plugins.register(plugin(gptopt_register_steps=steps_hook(Other)), "gptopt-prune")
    assert info.error.startswith(f"the name gptopt-prune is excluded by {var}") and "other" not in plugins.steps
    with pytest.raises(GptoptError, match=f"gptopt-prune: the name gptopt-prune is excluded by {var}"):
        strict = Plugins(strict=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strict.load_entry_points()
        strict.register(plugin(gptopt_register_steps=steps_hook(Other)), "gptopt-prune")


@pytest.mark.parametrize("var", ["GPTOPT_BLOCK_PLUGINS", "GPTOPT_LOAD_PLUGINS"])
def test_a_renamed_plugins_old_name_still_works_in_the_lists(monkeypatch, var):
    """gptopt-bnb is gptopt-quantize now; lists written for the old name keep their meaning, unwarned."""
    monkeypatch.setenv(var, "gptopt-bnb")
    plugins = Plugins()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.load_entry_points()
    assert not [w for w in caught if "gptopt-bnb" in str(w.message)]
    loaded = "quantize" in plugins.steps
    assert loaded == (var == "GPTOPT_LOAD_PLUGINS")
    assert (set(plugins.info) == {"gptopt-quantize"}) == (var == "GPTOPT_LOAD_PLUGINS")


def test_a_check_plan_that_raises_gptopt_error_is_a_plan_error(tmp_path):
    class Picky(Step):
        """Refuses every plan."""

        name = "picky"

        def check_plan(self, before, after, facts):
            raise GptoptError("picky: never")

    from gptopt_core import Pipeline, PlanError

    with register_plugin(plugin(gptopt_register_steps=steps_hook(Picky)), "test-picky"):
        with pytest.raises(PlanError, match="picky: never"):
            Pipeline(model="tiny-random-gpt2").add("picky").validate()


# -- as a user meets them: real distributions on the path, the real CLI ------------------------------------------
GOOD_PLUGIN = '''
from gptopt_core import Step, hookimpl

class Wave(Step):
    """Wave."""
    name = "wave"
    def apply(self, ctx):
        ctx.log("wave from a good plugin")
        return {"waved": 1}

@hookimpl
def gptopt_register_steps(register):
    register(Wave)

@hookimpl
def gptopt_step_finished(ctx, step, record):
    record["metrics"]["seen_by_good"] = True
'''

HALF = '''
from gptopt_core import Step, hookimpl

class {cls}(Step):
    """Half."""
    name = {step!r}

@hookimpl
def gptopt_step_finished(ctx, step, record):
    record["metrics"]["seen_by_{module}"] = True

@hookimpl
def gptopt_register_steps(register):
    register({cls})
'''

DISTRIBUTIONS = {  # module → (source, reason shown by `gptopt plugins`)
    "gptopt_good": (GOOD_PLUGIN, None),
    "gptopt_exits": ("import sys\nsys.exit(3)\n", "failed to load: called sys.exit: 3"),
    "gptopt_missing": ("import gptopt_no_such_dependency\n",
                       "failed to load: ModuleNotFoundError: No module named 'gptopt_no_such_dependency'"),
    "gptopt_typo": ("from gptopt_core import hookimpl\n@hookimpl\ndef gptopt_run_finshed(ctx, records, out_dir):\n"
                    "    pass\n", "implements unknown hook gptopt_run_finshed (did you mean gptopt_run_finished?)"),
    "gptopt_noname": (HALF.format(cls="NoName", step="", module="noname"),
                      "registered step class NoName without a name"),
    "gptopt_takeseval": (HALF.format(cls="MyEval", step="eval", module="takeseval"),
                         "step 'eval' is already registered by plugin gptopt-core"),
    "gptopt_takeswave": (HALF.format(cls="MyWave", step="wave", module="takeswave"),
                         "step 'wave' is already registered by plugin gptopt-good"),
    "gptopt_empty": ("HELPER = 1\n", None),
}


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    for module, (source, _) in DISTRIBUTIONS.items():
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(textwrap.dedent(source))
        dist_name = module.replace("_", "-")
        info = site / f"{module}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist_name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[gptopt]\n{dist_name} = {module}\n")
    return site


def test_installed_broken_plugins_are_listed_with_reasons_and_the_rest_work(broken_site, tmp_path):
    env = {"PYTHONPATH": str(broken_site)}
    listing = run_gptopt("plugins", "--json", env=env)
    assert listing.returncode == 0, listing.stderr
    by_name = {p["name"]: p for p in json.loads(listing.stdout)}
    for module, (_, reason) in DISTRIBUTIONS.items():
        info = by_name[module.replace("_", "-")]
        assert info["distribution"] == module.replace("_", "-") and info["version"] == "0.1"
        if reason:
            assert reason in info["error"] and not info["steps"] and not info["hooks"], info
            # a load failure keeps the first contract's sentence, "plugin NAME failed to load: ..." (docs/contract.md)
            sep = " " if reason.startswith("failed to load: ") else ": "
            assert f"plugin {info['name']}{sep}{reason}" in listing.stderr
    assert by_name["gptopt-empty"]["warning"].startswith("provides no hooks and no steps")
    assert by_name["gptopt-good"]["steps"] == ["wave"] and by_name["gptopt-good"]["error"] is None
    assert by_name["gptopt-prune"]["steps"][:1] == ["prune"] and by_name[CORE]["steps"] == ["eval", "save"]
    text = run_gptopt("plugins", env=env).stdout
    assert "gptopt-exits  (gptopt-exits 0.1)\n    ERROR: failed to load: called sys.exit: 3" in text
    # a chain runs with the good plugin's step and observer; none of the rejected plugins' hooks fire. -q leaves
    # only the plugin warnings on stderr (no progress bars, no "Writing model shards" from transformers)
    proc = run_gptopt("run", "--model", "tiny-random-gpt2", "--out", tmp_path / "o", "-q", "wave", "eval",
                      "--max-tokens", "300", "--block-size", "64", "save", "--to", tmp_path / "m", env=env,
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and all(line.startswith("Warning: plugin gptopt-") for line in proc.stderr.splitlines())
    assert (tmp_path / "m" / "model.safetensors").exists()
    metrics = [s["metrics"] for s in json.loads((tmp_path / "o" / "run.json").read_text())["steps"]]
    assert all(m["seen_by_good"] for m in metrics) and metrics[0]["waved"] == 1
    assert not any(k.startswith("seen_by_") and k != "seen_by_good" for m in metrics for k in m)
    assert metrics[1]["perplexity"] > 1


def test_strict_block_and_load_lists(broken_site):
    env = {"PYTHONPATH": str(broken_site)}
    strict = run_gptopt("steps", env={**env, "GPTOPT_STRICT_PLUGINS": "1"})
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert error_lines(strict.stderr) == ["Error: plugin gptopt-empty: provides no hooks and no steps (does the entry "
                                          "point name the right module?) (GPTOPT_STRICT_PLUGINS=1)"]
    bad = ",".join(m.replace("_", "-") for m, (_, reason) in DISTRIBUTIONS.items() if reason) + ", gptopt-empty"
    blocked = run_gptopt("steps", env={**env, "GPTOPT_STRICT_PLUGINS": "1", "GPTOPT_BLOCK_PLUGINS": bad})
    assert blocked.returncode == 0 and blocked.stderr == "" and "wave" in blocked.stdout
    only = run_gptopt("plugins", "--json", env={**env, "GPTOPT_LOAD_PLUGINS": "gptopt-good, gptopt-nope,gptopt-core"})
    assert only.returncode == 0
    assert [p["name"] for p in json.loads(only.stdout)] == [CORE, "gptopt-good"]
    warned = only.stderr.splitlines()
    assert error_lines(only.stderr) == [] and len(warned) == 2
    assert warned[0] == "Warning: GPTOPT_LOAD_PLUGINS: 'gptopt-core' is the core and always loads"
    assert warned[1].startswith("Warning: GPTOPT_LOAD_PLUGINS: 'gptopt-nope' is not an installed plugin (installed: ")
    assert "gptopt-good" in warned[1] and "gptopt-prune" in warned[1]
    # an empty allow-list loads no entry point at all (so the sys.exit plugin is never imported): core only
    none = run_gptopt("steps", env={**env, "GPTOPT_LOAD_PLUGINS": ""})
    assert none.returncode == 0 and none.stderr == ""
    assert [line.split()[0] for line in none.stdout.splitlines()] == ["eval", "save"]


def test_in_process_warnings_are_one_line():
    plugins = fresh()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plugins.register(misspelled(), "gptopt-typo")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
