"""An exception raised inside a hook names the plugin and the hook that raised it; a failing report hook does not
drop the other plugins' report sections; GPTOPT_TRACE_PLUGINS shows which plugin's hook ran and for how long."""
import types

import pytest

from gptopt_core import Pipeline, SourceError, StepFailed, hookimpl
from gptopt_core.plugins import CORE, PluginHookError, PluginLoadWarning, Plugins
from gptopt_core.kit.testing import register_plugin

TINY = {"model": "tiny-random-gpt2", "device": "cpu", "quiet": True}
EVAL = {"max_tokens": 200, "block_size": 64}


def one_hook(name, fn):
    return types.SimpleNamespace(**{name: hookimpl(fn)})


def boom(**_):
    raise RuntimeError("plugin bug")


@pytest.mark.parametrize("hook", ["gptopt_step_started", "gptopt_step_finished", "gptopt_collect_metrics"])
def test_observer_errors_name_the_plugin_and_hook(hook, tmp_path):
    fn = {"gptopt_step_started": lambda ctx, step: boom(), "gptopt_step_finished": lambda ctx, step, record: boom(),
          "gptopt_collect_metrics": lambda ctx: boom() if ctx.records else None}[hook]
    with register_plugin(one_hook(hook, fn), "test-observer"):
        with pytest.raises((PluginHookError, StepFailed)) as exc:
            Pipeline(**TINY, out=tmp_path / "o").add("eval", **EVAL).run()
    assert f"plugin test-observer failed in {hook}: RuntimeError: plugin bug" in str(exc.value)
    assert "plugin bug" in (tmp_path / "o" / "run.json").read_text()  # the run is recorded as failed


@pytest.mark.parametrize("hook", ["gptopt_training_loss", "gptopt_after_optimizer_step"])
def test_training_hook_errors_blame_the_hooks_plugin_not_the_training_step(hook):
    fn = {"gptopt_training_loss": lambda ctx, model, batch, outputs: boom(),
          "gptopt_after_optimizer_step": lambda ctx, model, step: boom()}[hook]
    with register_plugin(one_hook(hook, fn), "test-trainhook"):
        with pytest.raises(StepFailed) as exc:
            Pipeline(**TINY).add("finetune", steps=1, batch_size=1, seq_len=32).run()
    assert str(exc.value) == (f"step 'finetune' (plugin gptopt-transfer) failed: PluginHookError: plugin "
                              f"test-trainhook failed in {hook}: RuntimeError: plugin bug")
    assert exc.value.error.plugin == "test-trainhook" and isinstance(exc.value.error.error, RuntimeError)


def test_resolve_model_errors_name_the_source_plugin_and_user_errors_pass_unchanged():
    def resolve(spec, options):
        if spec == "zoo:crash":
            raise KeyError("config.json")
        if spec == "zoo:missing":
            raise SourceError("zoo has no model 'missing'")

    with register_plugin(one_hook("gptopt_resolve_model", resolve), "test-zoo"):
        with pytest.raises(PluginHookError, match=r"^plugin test-zoo failed in gptopt_resolve_model: KeyError: "
                                                  r"'config.json'$"):
            Pipeline(**{**TINY, "model": "zoo:crash"}).add("eval").run()
        with pytest.raises(SourceError, match=r"^zoo has no model 'missing'$"):
            Pipeline(**{**TINY, "model": "zoo:missing"}).add("eval").run()


def test_a_failing_run_finished_keeps_the_other_plugins_sections(tmp_path):
    def good(ctx, records, out_dir):
        return ["## From the good plugin"]

    def bad(ctx, records, out_dir):
        raise ValueError("cannot plot")

    with register_plugin(one_hook("gptopt_run_finished", good), "test-good-report"), \
            register_plugin(one_hook("gptopt_run_finished", bad), "test-bad-report"):
        with pytest.warns(PluginLoadWarning, match="plugin test-bad-report failed in gptopt_run_finished"):
            result = Pipeline(**TINY, out=tmp_path / "o").add("eval", **EVAL).run()
    assert result.manifest["status"] == "ok"
    report = (tmp_path / "o" / "report.md").read_text()
    assert "## From the good plugin" in report
    assert "> plugin test-bad-report failed in gptopt_run_finished: ValueError: cannot plot" in report


def test_trace_names_plugin_hook_and_milliseconds(monkeypatch, capsys):
    from gptopt_core.kit import builtin

    monkeypatch.setenv("GPTOPT_TRACE_PLUGINS", "1")
    plugins = Plugins()
    plugins.register(builtin, CORE, "gptopt", builtin=True)
    plugins.register(one_hook("gptopt_step_started", lambda ctx, step: None), "test-traced")
    Pipeline(**TINY, plugins=plugins).add("eval", **EVAL).run()
    lines = [l.split() for l in capsys.readouterr().err.splitlines() if l.startswith("gptopt trace: ")]
    seen = {(l[2], l[3]) for l in lines}
    assert {(CORE, "gptopt_resolve_model"), (CORE, "gptopt_collect_metrics"),
            ("test-traced", "gptopt_step_started")} <= seen
    assert all(l[5] == "ms" and float(l[4]) >= 0 for l in lines)
    untraced = Plugins()  # off by default
    monkeypatch.delenv("GPTOPT_TRACE_PLUGINS")
    assert Plugins().trace is False and untraced.trace is True
