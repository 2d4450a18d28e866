"""A plugin that changes a model's module structure saves and reloads it through the documented convention
(docs/examples/gptopt-lowrank): its save hook marks the changed layers, its model source rebuilds them and loads
every weight strictly. Plain ``from_pretrained`` on the same directory silently gives those layers random weights,
which is why the convention exists."""
import importlib.util

import pytest
from conftest import ROOT

from gptopt_core import Pipeline
from gptopt_core.kit.testing import register_plugin

EVAL = {"max_tokens": 65, "block_size": 64}


@pytest.fixture(scope="module")
def lowrank():
    """The example plugin's module, loaded from its file (not installed) and registered for these tests."""
    path = ROOT / "docs" / "examples" / "gptopt-lowrank" / "gptopt_lowrank" / "__init__.py"
    spec = importlib.util.spec_from_file_location("gptopt_lowrank", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with register_plugin(module, "gptopt-lowrank-example"):
        yield module


def test_a_structure_changing_plugin_saves_and_reloads_exactly(lowrank, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    first = (Pipeline(model="tiny-random-llama", device="cpu", quiet=True).add("lowrank", rank=4)
             .add("eval", **EVAL).add("save", to=str(tmp_path / "m")).run())
    assert first.records[0]["metrics"]["lowrank_layers"] == 6  # 2 layers x gate/up/down
    assert (tmp_path / "m" / lowrank.MARKER).exists()
    again = Pipeline(model=str(tmp_path / "m"), device="cpu", quiet=True).add("eval", **EVAL).run()
    assert again.manifest["model"]["source"] == "lowrank"
    assert again.records[0]["metrics"]["perplexity"] == pytest.approx(first.records[1]["metrics"]["perplexity"],
                                                                      rel=1e-6)
    name = "model.layers.0.mlp.gate_proj"
    pair = again.model.get_submodule(name)
    factored = pair[1].weight @ pair[0].weight  # the layer the reloaded model computes with
    saved = first.model.get_submodule(name)
    assert torch.equal(factored, saved[1].weight @ saved[0].weight)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m")  # without the convention: a fresh random layer
    assert type(plain.get_submodule(name)).__name__ == "Linear"
    assert not torch.allclose(plain.get_submodule(name).weight, factored, atol=1e-3)
