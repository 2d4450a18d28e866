"""The plugin contract's small print: one table of ctx.state keys and facts, checked against the plugins' code;
step help shows real defaults; plugins keep pruned weights at zero through the hook, not the core."""
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import ROOT

from gptopt_core import FACTS, STATE_KEYS
from gptopt_core.plugins import get_plugins
from gptopt_core.steps import fact_matches

STATE_LITERAL = re.compile(r"""\bstate(?:\[|\.get\(|\.setdefault\(|\.pop\()\s*["']([^"']+)["']""")


def state_literals():
    found = {}
    for path in sorted((ROOT / "plugins").rglob("*.py")):
        for key in STATE_LITERAL.findall(path.read_text()):
            found.setdefault(key, path.relative_to(ROOT))
    return found


def undeclared(found: dict, table) -> dict:
    return {k: str(p) for k, p in found.items() if k not in table}


def test_every_ctx_state_key_a_plugin_uses_is_in_the_one_table():
    """Against the registered table (gptopt_register_vocabulary): every key a plugin's code names is declared by
    some loaded plugin, each with its owner and meaning; a key missing from the table is caught (planted)."""
    found = state_literals()
    assert {"masks", "quantized", "trainer", "l1"} <= set(found)  # the scan sees the keys plugins really use
    missing = undeclared(found, STATE_KEYS)
    assert not missing, f"declare these ctx.state keys (gptopt_core.StateKey, gptopt_register_vocabulary): {missing}"
    for key, (owner, meaning) in STATE_KEYS.items():
        assert owner in get_plugins().info and len(meaning) > 20, key
    planted = {k: v for k, v in STATE_KEYS.items() if k != "gguf"}  # the export plugin's declaration left out
    assert undeclared(found, planted) == {"gguf": str(found["gguf"])}


def _declared_facts(cls):
    facts = set(cls.requires) | set(cls.forbids) | set(cls.provides) | set(cls.removes)
    try:
        facts |= cls().next_facts(set())  # steps whose params all have defaults: their planned facts too
    except Exception:
        pass
    return facts


def test_every_fact_a_step_declares_belongs_to_a_documented_family():
    plugins = get_plugins()
    seen = set()
    for name, cls in plugins.steps.items():
        for fact in _declared_facts(cls):
            family = fact.split(":")[0]
            assert family in FACTS, f"step {name} ({cls.plugin}) uses fact '{fact}': add '{family}' to FACTS"
            seen.add(family)
    assert {"quantized", "masks", "l1"} <= seen
    # the matching rule the table states
    assert fact_matches("quantized", "quantized:8bit") and fact_matches("quantized:4bit", "quantized:4bit")
    assert not fact_matches("quantized:4bit", "quantized:8bit") and not fact_matches("quant", "quantized")


def test_step_help_shows_real_defaults_for_every_option():
    from gptopt_core.cli import cli

    runner = CliRunner()
    for step in ("prune", "lora", "eval"):
        out = runner.invoke(cli, ["run", step, "--help"], terminal_width=200).output
        assert "[default: (" not in out, out
    lora = runner.invoke(cli, ["run", "lora", "--help"], terminal_width=200).output
    assert re.search(r"--target-modules VALUE .*\[default: auto\]", lora), lora
    assert re.search(r"--merge / --no-merge .*\[default: False\]", lora)


def test_masks_are_kept_by_the_prune_plugins_hook_not_the_training_loop():
    training = (ROOT / "gptopt_core" / "kit" / "training.py").read_text()
    assert 'state.get("masks")' not in training and "mask_targets(" not in training  # (mask_targets: modules.py)
    plugins = get_plugins()
    owners = [impl.plugin_name for impl in plugins.hook.gptopt_after_optimizer_step.get_hookimpls()]
    assert "gptopt-prune" in owners and owners[-1] == "gptopt-prune"  # tryfirst: pluggy calls the last one first


def test_distillation_options_belong_to_the_transfer_plugin():
    from gptopt_core import ParamsError, Step
    from gptopt_core.kit.training import TrainParams

    assert "distill_from" not in TrainParams.model_fields

    class MyTraining(Step):
        name = "my-training"
        Params = TrainParams

    with pytest.raises(ParamsError, match="unknown option 'distill_from'"):
        MyTraining(distill_from="original")
    assert get_plugins().steps["lora"](distill_from="original").wants_original_model()
    assert not MyTraining().wants_original_model()


def test_l1_reads_a_later_pruning_steps_plan_facts_whoever_provides_it():
    from gptopt_core import Pipeline, Step
    from gptopt_core.kit.testing import register_plugin

    class MyPrune(Step):
        """A third-party pruner: promises masks, chosen per layer, 30%."""

        name = "my-prune"
        provides = frozenset({"masks"})

        def plan_facts(self):
            return {"masks": {"sparsity": 0.3, "rule": "layer", "method": "mine"}}

    plugin = type("P", (), {"gptopt_register_steps": staticmethod(
        __import__("gptopt_core").hookimpl(lambda register: register(MyPrune)))})()
    with register_plugin(plugin, "test-my-prune"):
        pipe = Pipeline(model="tiny-random-gpt2").add("l1", weight=5).add("finetune", steps=1).add("my-prune")
        pipe.validate()
    assert {k: pipe.steps[0].plan[k] for k in ("select", "sparsity", "rule", "prune_method")} == {
        "select": "prunable", "sparsity": 0.3, "rule": "layer", "prune_method": "mine"}
    builtin = Pipeline(model="tiny-random-gpt2").add("l1", weight=5).add("finetune", steps=1).add(
        "prune", method="wanda", sparsity=0.5)
    builtin.validate()
    assert builtin.steps[0].plan["rule"] == "row" and builtin.steps[0].plan["sparsity"] == 0.5


def test_a_plugin_steps_declared_columns_reach_the_summary_and_report(tmp_path):
    from gptopt_core import Pipeline, Step, hookimpl
    from gptopt_core.kit.testing import register_plugin

    class Count(Step):
        """Count weight layers."""

        name = "count-layers"
        columns = {"layer_count": ("layers", "d"), "layer_share": ("share", ".1%")}

        def apply(self, ctx):
            return {"layer_count": 14, "layer_share": 0.25}

    plugin = type("P", (), {"gptopt_register_steps": staticmethod(hookimpl(lambda register: register(Count)))})()
    with register_plugin(plugin, "test-columns"):
        Pipeline(model="tiny-random-gpt2", device="cpu", quiet=True, out=tmp_path / "o").add("count-layers").run()
    report = (tmp_path / "o" / "report.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| # |"))
    row = next(line for line in report.splitlines() if "| count-layers |" in line)
    assert header.endswith("| layers | share |") and row.endswith("| 14 | 25.0% |"), (header, row)
