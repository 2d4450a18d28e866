"""A typed context: RunContext declares every field it carries, nothing sets another attribute on it, ctx.state
stores only declared keys, and the report gets the recipe as data (no call back up into the pipeline)."""
import dataclasses
import re

import pytest
from conftest import ROOT

from gptopt_core import Pipeline, RunContext, StepFailed, get_plugins
from gptopt_core.vocabulary import State, UndeclaredStateKey

DECLARED = {f.name for f in dataclasses.fields(RunContext)} | {"hook", "is_main_process", "recipe"}
#: ``ctx.NAME =`` / ``self.ctx.NAME +=`` in code: the attribute a statement sets on a RunContext
ASSIGNED = re.compile(r"\b(?:self\.)?ctx\.(\w+)\s*(?:[-+*/|&]?=)(?!=)")


def assigned_names(text: str) -> set:
    return set(ASSIGNED.findall(text))


def test_run_context_declares_every_field_and_refuses_others():
    assert "__slots__" in vars(RunContext) and not hasattr(RunContext(None, None, None, None), "__dict__")
    assert {"pipeline", "manifest", "recipe", "recipe_head", "steps", "state", "plugins"} - DECLARED == {"pipeline"}
    ctx = RunContext(model=None, tokenizer=None, device="cpu", data=None, plugins=get_plugins())
    ctx.model, ctx.step_index = "a model", 2  # declared fields are the context's to change
    with pytest.raises(AttributeError):
        ctx.pipeline = object()  # the pipeline is not the context's: its steps, recipe and manifest are
    with pytest.raises(AttributeError):
        ctx._dense = {}
    assert isinstance(ctx.state, State) and ctx.manifest == {} and ctx.steps == ()


def test_no_code_sets_an_undeclared_attribute_on_a_context():
    found = {}
    for folder in ("gptopt_core", "plugins", "tests", "benchmarks", "docs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "test_context.py":  # this file plants them
                continue
            for name in assigned_names(path.read_text()) - DECLARED:
                found.setdefault(name, str(path.relative_to(ROOT)))
    assert not found, f"declare these as RunContext fields or keep them in ctx.state: {found}"
    # planted: what pipeline.py and tests/test_prune.py did before the context was typed
    assert assigned_names("        ctx.pipeline = self\n        ctx._dense = {}\n") - DECLARED == {"pipeline",
                                                                                                 "_dense"}


def test_report_takes_the_recipe_and_manifest_as_data():
    """No pipeline behind the context: the report reads the recipe from the context's steps as they are now (a
    step may resolve a param while it runs, as quantize --plan auto does)."""
    from gptopt_core.report import build_manifest

    step = get_plugins().step_class("eval")(max_tokens=64)
    ctx = RunContext(model=None, tokenizer=None, device="cpu", data=None, seed=3, plugins=get_plugins(),
                     steps=(step,), recipe_head={"model": "m", "seed": 3},
                     manifest={"device": "cpu", "model": {"spec": "m", "hash": "h"}})
    step.params = step.Params(**{**step.params.model_dump(), "max_tokens": 128})  # as quantize --plan auto does
    manifest = build_manifest(ctx)
    assert manifest["recipe"] == {"model": "m", "seed": 3, "steps": [{"eval": step.params_dict()}]}
    assert manifest["recipe"]["steps"][0]["eval"]["max_tokens"] == 128
    assert manifest["device"] == "cpu" and manifest["seed"] == 3


def test_a_step_storing_an_undeclared_state_key_fails_naming_it():
    import types

    from gptopt_core import Step, hookimpl
    from gptopt_core.kit.testing import register_plugin

    class Stash(Step):
        """Stores a key it never declared."""

        name = "stash"

        def apply(self, ctx):
            ctx.state["stash"] = 1
            return {}

    plugin = types.SimpleNamespace(gptopt_register_steps=hookimpl(lambda register: register(Stash)))
    with register_plugin(plugin, "test-stash"):
        pipe = Pipeline(model="tiny-random-llama", device="cpu", quiet=True).add("stash")
        with pytest.raises(StepFailed) as info:
            pipe.run()
        ctx = pipe.prepare()  # the context a run hands its steps: the chain, its recipe, its inputs, as data
    assert isinstance(info.value.__cause__, UndeclaredStateKey)
    assert "UndeclaredStateKey: ctx.state['stash'] is not a declared state key" in str(info.value)
    assert ctx.steps == tuple(pipe.steps) and ctx.recipe == pipe.recipe()
    assert ctx.manifest["model"]["spec"] == "tiny-random-llama" and "model_bytes" in ctx.manifest["loaded"]
