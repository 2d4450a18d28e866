"""export --plan: per-tensor GGUF types from measured sensitivity within a bits-per-weight budget (``auto``), or
from a file. Checked: each reported sensitivity against gguf-py's own q4_0 round trip of that weight alone, the
greedy fill by sensitivity per byte within the budget, the types and bits per weight gguf-py reads back from the
file, plan files naming tensors by GGUF or module name, bad plans and budgets refused in one line.

Nothing here needs llama.cpp (the plan is gptopt's own writer): the module blocks ``import llama_cpp``, so it runs,
and must pass, where llama-cpp-python is not installed."""
import json
import sys

import pytest
import torch
from test_bad_input import run_in_process

from gptopt_core import ParamsError, Pipeline, tiny_model


@pytest.fixture(autouse=True)
def no_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # an import of it raises ImportError


def file_types(path):
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def test_plan_auto_measures_each_tensor_and_fills_the_budget_greedily(tmp_path):
    """Each candidate's reported sensitivity is the calibration loss with gguf-py's own q4_0 round trip of that
    weight alone; upgrades go in order of sensitivity per byte while the budget lasts; the file holds the plan."""
    import math

    import gguf

    from gptopt_core import calibration_nll, get_plugins, make_context, replace_module
    from gptopt_export.quantize_llamacpp import weight_bits

    ctx = make_context("tiny-random-llama")
    metrics = get_plugins().step_class("export")(to=str(tmp_path / "mix.gguf"), type="q4_0", plan="auto",
                                                 max_bpw=5.0).apply(ctx)
    sens = metrics["gguf_plan_sensitivity"]
    # 14 block weights, the untied head and the input embedding
    assert len(sens) == metrics["gguf_plan_candidates"] == 16 and metrics["gguf_plan_base_bpw"] == pytest.approx(4.5)
    assert {"output.weight", "token_embd.weight"} <= set(sens)

    blocks = ctx.calibration_blocks(4, 256)
    base = calibration_nll(ctx.model, blocks)
    v = ctx.model.model.layers[0].self_attn.v_proj
    w = v.weight.detach().numpy()
    q4 = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q4_0), gguf.GGMLQuantizationType.Q4_0)
    new = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    new.weight.data = torch.from_numpy(q4.copy())
    replace_module(ctx.model, "model.layers.0.self_attn.v_proj", new)
    ratio = math.exp(calibration_nll(ctx.model, blocks) - base)
    replace_module(ctx.model, "model.layers.0.self_attn.v_proj", v)
    assert sens["blk.0.attn_v.weight"] == pytest.approx(ratio, abs=2e-7)

    shapes = {t.name: int(t.n_elements) for t in gguf.GGUFReader(str(tmp_path / "mix.gguf")).tensors
              if len(t.shape) == 2}
    extra = {n: shapes[n] * (8.5 - 4.5) / 8 for n in sens}  # q8_0 over q4_0, bytes
    assert list(sens) == sorted(sens, key=lambda n: -math.log(sens[n]) / extra[n])
    budget, picked = sum(shapes.values()) * (5.0 - 4.5) / 8, {}
    for n in sens:
        if sens[n] > 1 and extra[n] <= budget:
            picked[n], budget = "q8_0", budget - extra[n]
    assert metrics["gguf_plan"] == picked and 0 < len(picked) < 16
    types = file_types(tmp_path / "mix.gguf")
    assert {n: t for n, t in types.items() if t == "q8_0"} == picked
    assert {t for n, t in types.items() if n in shapes and n not in picked} == {"q4_0"}
    assert weight_bits(tmp_path / "mix.gguf") == pytest.approx(metrics["gguf_plan_bpw"], abs=1e-4)
    assert 4.5 < metrics["gguf_plan_bpw"] <= 5.0


def test_plan_file_names_tensors_by_gguf_or_module_name(tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"model.layers.0.self_attn.v_proj": "q8_0", "blk.1.ffn_down.weight": "f16",
                                "token_embd.weight": "q8_0"}))
    res = Pipeline(model="tiny-random-llama", quiet=True).add(
        "export", to=str(tmp_path / "f.gguf"), type="q4_0", plan=str(plan)).run()
    types = file_types(tmp_path / "f.gguf")
    assert (types["blk.0.attn_v.weight"], types["blk.1.ffn_down.weight"], types["token_embd.weight"]) == (
        "q8_0", "f16", "q8_0")
    assert types["blk.1.attn_v.weight"] == "q4_0" and res.records[0]["metrics"]["gguf_plan_file"] == str(plan)


@pytest.mark.parametrize("content, message", [
    ({"model.layers.9.mlp.up_proj": "q8_0"}, "'model.layers.9.mlp.up_proj' is not a tensor of this model"),
    ({"blk.0.attn_v.weight": "q3_x"}, "type 'q3_x' unknown"),
    (["blk.0.attn_v.weight"], "give a mapping of tensor names to GGUF types"),
])
def test_bad_plan_file_is_one_line_exit_2_and_writes_nothing(tmp_path, content, message):
    (tmp_path / "plan.yaml").write_text(json.dumps(content))
    r = run_in_process("run", "--model", "tiny-random-llama", "export", "--to", "f.gguf", "--type", "q4_0",
                       "--plan", "plan.yaml", cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]


def test_budget_below_the_base_type_is_one_line_exit_2(tmp_path):
    r = run_in_process("run", "--model", "tiny-random-llama", "export", "--to", "f.gguf", "--type", "q4_0",
                       "--plan", "auto", "--max-bpw", "4", cwd=tmp_path)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--max-bpw 4 is below the file without upgrades (4.500" in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("params, message", [
    ({"plan": "auto"}, "--plan auto needs --max-bpw"),
    ({"max_bpw": 5.0}, "--max-bpw is the budget of --plan auto"),
    ({"plan": "plan.txt"}, "give --plan auto or a plan file ending in .json, .yaml or .yml"),
    ({"plan": "auto", "max_bpw": 5.0, "type": "auto"}, "give --type \\(e.g. q4_0\\), not auto"),
])
def test_plan_options_are_checked(params, message):
    with pytest.raises(ParamsError, match=message):
        Pipeline(model="tiny-random-llama", quiet=True).add("export", to="m.gguf", **{"type": "q4_0", **params})
