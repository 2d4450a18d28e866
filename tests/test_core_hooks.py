"""Every core-called hook, exercised through a real pipeline with an inline plugin."""
import json
import types

import pytest

from gptopt_core import GptoptError, Pipeline, SourceError, hookimpl
from gptopt_core.kit.models import LoadedModel, tiny_model
from gptopt_core.kit.testing import register_plugin


def test_observer_metric_model_source_save_and_report_hooks(tmp_path):
    calls = []

    @hookimpl
    def gptopt_resolve_model(spec, options):
        if spec != "my-zoo:small":
            return None
        calls.append(("resolve", options["device"]))
        model, tok = tiny_model("tiny-random-llama", seed=5)
        return LoadedModel(model, tok, "my-zoo")

    @hookimpl
    def gptopt_step_started(ctx, step):
        calls.append(("started", step.name))

    @hookimpl
    def gptopt_step_finished(ctx, step, record):
        calls.append(("finished", step.name, "perplexity" in record["metrics"]))
        record["metrics"]["observed"] = True

    @hookimpl
    def gptopt_collect_metrics(ctx):
        return {"layers": sum(1 for _ in ctx.model.modules())}

    @hookimpl(tryfirst=True)
    def gptopt_save_model(ctx, model, path):
        calls.append(("save", path.name.startswith(".m.partial-")))
        return None  # let the core's save_pretrained write it

    @hookimpl
    def gptopt_run_finished(ctx, records, out_dir):
        calls.append(("run_finished", len(records), out_dir.name))
        (out_dir / "extra.txt").write_text("plot")
        return ["## Extra section"]

    plugin = types.SimpleNamespace(**{f.__name__: f for f in (
        gptopt_resolve_model, gptopt_step_started, gptopt_step_finished, gptopt_collect_metrics, gptopt_save_model,
        gptopt_run_finished)})
    with register_plugin(plugin, "observer"):
        result = (Pipeline(model="my-zoo:small", out=tmp_path / "o", quiet=True, device="cpu")
                  .add("eval", max_tokens=600).add("save", to=str(tmp_path / "m")).run())
    assert calls == [("resolve", "cpu"), ("started", "eval"), ("finished", "eval", True), ("started", "save"),
                     ("save", True), ("finished", "save", False), ("run_finished", 2, "o")]
    assert result.records[0]["metrics"]["observed"] and result.records[0]["metrics"]["layers"] > 10
    manifest = json.loads((tmp_path / "o" / "run.json").read_text())
    assert manifest["model"]["source"] == "my-zoo" and manifest["steps"][1]["metrics"]["observed"]
    assert "## Extra section" in (tmp_path / "o" / "report.md").read_text()
    assert (tmp_path / "o" / "extra.txt").exists() and (tmp_path / "m" / "model.safetensors").exists()


def test_collected_metrics_become_summary_columns_through_gptopt_register_columns(tmp_path):
    @hookimpl
    def gptopt_register_columns(register):
        register("layers", "layers")
        register("arch", "arch")  # a text metric: shown as it is
        register("half_layers", "half", ".1%")

    @hookimpl
    def gptopt_collect_metrics(ctx):
        n = sum(1 for _ in ctx.model.modules())
        return {"layers": n, "arch": type(ctx.model).__name__, "half_layers": 0.5, "hidden": 1}

    plugin = types.SimpleNamespace(gptopt_register_columns=gptopt_register_columns,
                                   gptopt_collect_metrics=gptopt_collect_metrics)
    with register_plugin(plugin, "columns") as plugins:
        assert plugins.info["columns"].columns == ["layers", "arch", "half_layers"]
        Pipeline(model="tiny-random-llama", out=tmp_path / "o", quiet=True, device="cpu").add(
            "eval", max_tokens=600).run()
    report = (tmp_path / "o" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| #"))
    assert header.endswith("| layers | arch | half |") and "hidden" not in header
    assert "| LlamaForCausalLM | 50.0% |" in report
    clash = types.SimpleNamespace(gptopt_register_columns=hookimpl(lambda register: register("perplexity", "ppl")))
    with pytest.raises(GptoptError, match="column 'perplexity' is already shown by the core"):
        with register_plugin(clash, "clash"):
            pass


def test_resolve_hook_errors_are_clean():
    @hookimpl
    def gptopt_resolve_model(spec, options):
        if spec.startswith("my-zoo:"):
            raise SourceError(f"my-zoo has no model '{spec[7:]}'")

    with register_plugin(types.SimpleNamespace(gptopt_resolve_model=gptopt_resolve_model), "zoo"):
        with pytest.raises(SourceError, match="my-zoo has no model 'huge'"):
            Pipeline(model="my-zoo:huge", quiet=True, device="cpu").add("eval").run()
