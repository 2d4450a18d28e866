"""cpu-fast: conversions, the quality guard, auto's choice, save/reload and bad input, on the tiny models."""
import copy
import json

import pytest
import torch
import torch.nn as nn
from conftest import error_lines, run_gptopt

from gptopt_core import GptoptError, ParamsError, Pipeline, PlanError
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.metrics import model_bytes, num_params
from gptopt_core.kit.modules import is_conv1d
from gptopt_core.kit.testing import make_context
from gptopt_cpu import CpuFastStep, load_converted
from gptopt_cpu.convert import (as_linear, convert_model, is_dynamic_int8, linear_names, plain_quantize_dynamic,
                                torchao_problem)
from gptopt_cpu.guard import guard_plan

MODELS = ["tiny-random-gpt2", "tiny-random-llama"]


@pytest.fixture(scope="module")
def contexts():
    return {m: make_context(model=m) for m in MODELS}


def fresh(contexts, name):
    """A float copy of the tiny model (the context's model stays untouched)."""
    return copy.deepcopy(contexts[name].model).float().eval()


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def ids_of(ctx, n=64):
    return ctx.data.valid_ids[:n].unsqueeze(0)


def unigram_model(ctx):
    """Make the tiny Llama a unigram model whose int8 output head breaks, and nothing else matters.

    Hidden channel 0 carries a large constant (embedding column 0), the final norm passes only channel 0, and
    the (untied) head's column 0 holds the train split's log unigram frequencies: the float model predicts the
    unigram distribution. One huge head weight in column 1 (a channel the norm zeroes) changes nothing in float,
    but sets the head's per-tensor int8 scale so high that every unigram weight rounds to zero: int8 on the head
    turns the prediction uniform (ppl x5-10); int8 anywhere else changes almost nothing.
    """
    model = ctx.model
    counts = torch.bincount(ctx.data.train_ids, minlength=model.config.vocab_size).float() + 1
    with torch.no_grad():
        model.lm_head.weight = nn.Parameter(torch.zeros_like(model.lm_head.weight))
        model.get_input_embeddings().weight[:, 0] = 100.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        hidden = model.config.hidden_size ** 0.5
        model.lm_head.weight[:, 0] = (counts / counts.sum()).log() / hidden
        model.lm_head.weight[0, 1] = 1000.0
    return model


SENSITIVE = "lm_head"


# -- conversions ----------------------------------------------------------------------------------------
def test_as_linear_computes_what_conv1d_computes(contexts):
    model = fresh(contexts, "tiny-random-gpt2")
    conv = model.transformer.h[0].mlp.c_fc
    assert is_conv1d(conv)
    x = torch.randn(3, 5, conv.weight.shape[0])
    torch.testing.assert_close(as_linear(conv)(x), conv(x))


@pytest.mark.parametrize("name", MODELS)
def test_int8_dynamic_converts_every_linear_layer_and_stays_close(contexts, name):
    ctx = contexts[name]
    model = fresh(contexts, name)
    ref, before = logits(model, ids_of(ctx)), model_bytes(model)
    layers = linear_names(model)
    converted = convert_model(model, "int8-dynamic")
    assert sorted(converted) == sorted(layers) and len(layers) > 5
    assert all(is_dynamic_int8(model.get_submodule(n)) for n in layers)  # Conv1D included
    out = logits(model, ids_of(ctx))
    assert not torch.equal(out, ref)  # really quantized
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert model_bytes(model) < 0.75 * before  # the int8 weights are counted, smaller than fp32
    orig = contexts[name].model
    tied = orig.get_output_embeddings().weight is orig.get_input_embeddings().weight
    head = orig.get_output_embeddings().weight.numel() if tied else 0  # an int8 head is its own copy
    assert num_params(model) == num_params(orig) + head


def test_plain_quantize_dynamic_on_gpt2_only_reaches_the_output_head(contexts):
    """quantize_dynamic(model, {nn.Linear}) skips GPT-2's Conv1D blocks: only lm_head becomes int8."""
    model = plain_quantize_dynamic(fresh(contexts, "tiny-random-gpt2"))
    dynamic = [n for n, m in model.named_modules() if is_dynamic_int8(m)]
    assert dynamic == ["lm_head"]
    llama = plain_quantize_dynamic(fresh(contexts, "tiny-random-llama"))
    assert len([m for m in llama.modules() if is_dynamic_int8(m)]) == len(linear_names(fresh(contexts, "tiny-random-llama")))


def test_keep_leaves_matching_layers_in_float(contexts):
    model = fresh(contexts, "tiny-random-gpt2")
    converted = convert_model(model, "int8-dynamic", keep=["h.0.*", "lm_head"])
    assert is_conv1d(model.transformer.h[0].attn.c_attn) and isinstance(model.lm_head, nn.Linear)
    assert is_dynamic_int8(model.transformer.h[1].attn.c_attn)
    assert "lm_head" not in converted and not any(n.startswith("transformer.h.0.") for n in converted)


def test_bf16_converts_every_weight_and_stays_close(contexts):
    ctx = contexts["tiny-random-llama"]
    model = fresh(contexts, "tiny-random-llama")
    ref = logits(model, ids_of(ctx))
    convert_model(model, "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    out = logits(model, ids_of(ctx))
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_torchao_formats_work_where_torchao_runs_and_fail_clearly_where_not(contexts):
    problem = torchao_problem()
    ctx = contexts["tiny-random-gpt2"]
    if problem is None:
        for fmt in ("ao-int8-weight", "ao-int8-dynamic"):
            model = fresh(contexts, "tiny-random-gpt2")
            ref, before = logits(model, ids_of(ctx)), model_bytes(model)
            convert_model(model, fmt)
            assert isinstance(model.transformer.h[0].mlp.c_fc, nn.Linear)  # Conv1D turned into Linear
            out = logits(model, ids_of(ctx))
            assert (out - ref).abs().max() < 0.05 * ref.abs().max()
            assert model_bytes(model) < 0.75 * before
    else:
        assert "torchao" in problem
        with pytest.raises(GptoptError, match="torchao"):
            Pipeline(model="tiny-random-gpt2", quiet=True).add("cpu-fast", format="ao-int8-weight").validate()


# -- the guard ------------------------------------------------------------------------------------------
def test_guard_keeps_exactly_the_layer_the_conversion_breaks():
    ctx = make_context(model="tiny-random-llama")
    model = unigram_model(ctx)
    blocks = ctx.calibration_blocks(2, 64)
    before = copy.deepcopy(model.state_dict())
    info = guard_plan(model, "int8-dynamic", blocks, 0.02)
    assert info["plain_calib_ppl_ratio"] > 3  # converting everything breaks the budget
    assert info["keep"] == [SENSITIVE]
    assert info["within_budget"] and info["calib_ppl_ratio"] <= 1.02
    assert max(info["sensitivity"], key=info["sensitivity"].get) == SENSITIVE
    after = model.state_dict()  # the model is left as it was
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not is_dynamic_int8(m) for m in model.modules())


def test_guard_measures_nothing_when_everything_fits(contexts):
    ctx = contexts["tiny-random-gpt2"]
    info = guard_plan(fresh(contexts, "tiny-random-gpt2"), "int8-dynamic", ctx.calibration_blocks(2, 64), 0.05)
    assert info["keep"] == [] and "sensitivity" not in info and info["calib_ppl_ratio"] <= 1.05


def test_step_guarded_vs_plain_on_a_sensitive_model():
    """The seed's plain conversion next to the guarded one, on a model whose int8 head breaks."""
    ctx = make_context(model="tiny-random-llama")
    unigram_model(ctx)
    layers = len(linear_names(ctx.model))
    ref = perplexity(ctx.model, ctx.data.valid_ids, 256, 256, 1024)["perplexity"]
    plain_model = copy.deepcopy(ctx.model)
    convert_model(plain_model, "int8-dynamic")
    plain = perplexity(plain_model, ctx.data.valid_ids, 256, 256, 1024)["perplexity"]
    step = CpuFastStep(format="int8-dynamic", guard_ppl_increase="2%", calib_blocks=2, calib_seq_len=64)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    guarded = perplexity(ctx.model, ctx.data.valid_ids, 256, 256, 1024)["perplexity"]
    assert metrics["kept_layers"] == [SENSITIVE] and metrics["converted_layers"] == layers - 1
    assert plain / ref > 3 and guarded / ref < 1.02
    assert step.next_facts(set()) == {"quantized:cpu-int8", "cpu-only"}


# -- auto -----------------------------------------------------------------------------------------------
def test_auto_picks_the_fastest_candidate_within_budget_and_shows_its_table():
    ctx = make_context(model="tiny-random-llama")
    step = CpuFastStep(candidates=["bf16", "int8-dynamic"], eval_tokens=512, block_size=256, prompt_tokens=16,
                       new_tokens=8, rounds=2, calib_blocks=2, calib_seq_len=64)
    metrics = step.apply(ctx)
    table = {r["format"]: r for r in metrics["auto_table"]}
    assert set(table) == {"fp32", "bf16", "int8-dynamic"}
    assert table["fp32"]["ppl_ratio"] == 1.0 and table["fp32"]["decode_speedup"] == 1.0
    eligible = [r for name, r in table.items() if name != "fp32" and r["ppl_ratio"] <= 1.10]
    best = max(eligible, key=lambda r: r["decode_tokens_per_s"])
    assert metrics["auto_choice"] == best["format"] and table[best["format"]]["chosen"]
    assert sum(r["chosen"] for r in table.values()) == 1
    assert ctx.model.gptopt_cpu["format"] == best["format"]
    assert step.next_facts(set()) == ({"quantized:cpu-bf16", "cpu-only"} if best["format"] == "bf16"
                                      else {"quantized:cpu-int8", "cpu-only"})
    # the chosen model is the converted one: its perplexity is the table's
    again = perplexity(ctx.model, ctx.data.valid_ids, 256, 256, 512)["perplexity"]
    assert again == pytest.approx(table[best["format"]]["perplexity"], rel=1e-6)


def test_auto_shows_plain_int8_next_to_guarded_and_refuses_an_impossible_budget():
    ctx = make_context(model="tiny-random-llama")
    unigram_model(ctx)
    step = CpuFastStep(candidates=["int8-dynamic"], guard=False, max_ppl_increase="1%", eval_tokens=512,
                       block_size=256, prompt_tokens=16, new_tokens=4, rounds=1)
    with pytest.raises(GptoptError, match=r"no format stays within --max-ppl-increase 1\.0%.*int8-dynamic"):
        step.apply(ctx)

    step = CpuFastStep(candidates=["int8-dynamic"], max_ppl_increase="2%", eval_tokens=512, block_size=256,
                       prompt_tokens=16, new_tokens=4, rounds=1, calib_blocks=2, calib_seq_len=64)
    metrics = step.apply(ctx)
    table = {r["format"]: r for r in metrics["auto_table"]}
    assert table["int8-dynamic-plain"]["kept_layers"] == 0 and table["int8-dynamic"]["kept_layers"] == 1
    assert table["int8-dynamic-plain"]["ppl_ratio"] > 3 and not table["int8-dynamic-plain"]["within_budget"]
    assert table["int8-dynamic"]["ppl_ratio"] <= 1.02
    assert metrics["auto_choice"] == "int8-dynamic"


# -- params and plan -------------------------------------------------------------------------------------
@pytest.mark.parametrize("params, match", [
    ({"max_ppl_increase": 0}, "max_ppl_increase"),
    ({"max_ppl_increase": "-5%"}, "max_ppl_increase"),
    ({"max_ppl_increase": "lots"}, "10%"),
    ({"format": "int4"}, "format"),
    ({"format": "bf16", "keep": ["lm_head"]}, "int8 formats"),
    ({"format": "bf16", "candidates": ["bf16"]}, "--format auto only"),
])
def test_bad_params_are_one_clear_error(params, match):
    with pytest.raises(ParamsError, match=match):
        CpuFastStep(**params)


def test_plan_refuses_quantized_models_training_after_and_prune_after():
    with pytest.raises(PlanError, match="already quantized"):
        Pipeline(model="tiny-random-gpt2").add("cpu-fast").validate({"quantized:4bit"})
    with pytest.raises(PlanError, match="prune"):
        Pipeline(model="tiny-random-gpt2").add("cpu-fast", format="int8-dynamic").add("prune", sparsity=0.5).validate()
    with pytest.raises(GptoptError, match="after the training steps"):
        Pipeline(model="tiny-random-gpt2").add("cpu-fast", format="bf16").add("finetune", steps=1).validate()


def test_preflight_refuses_a_model_on_cuda(contexts):
    ctx = make_context(model="tiny-random-gpt2")
    ctx.device = torch.device("cuda", 0)  # what a run with --device cuda hands the step
    with pytest.raises(GptoptError, match="CPU inference but the model is on cuda:0; run the chain with --device cpu"):
        CpuFastStep(format="bf16").preflight(ctx)


# -- save / reload --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["int8-dynamic", "bf16"])
def test_saved_model_reloads_and_computes_the_same(tmp_path, fmt):
    target = tmp_path / "m"
    params = {"format": fmt} if fmt == "bf16" else {"format": fmt, "keep": ["h.1.mlp.*"]}
    result = Pipeline(model="tiny-random-gpt2", quiet=True).add("cpu-fast", **params).add("save", to=str(target)).run()
    saved = result.model
    record = json.loads((target / "gptopt_cpu.json").read_text())
    assert record["format"] == fmt
    model, _, _ = load_converted(target)
    ids = result.ctx.data.valid_ids[:48].unsqueeze(0)
    assert torch.equal(logits(model, ids), logits(saved, ids))  # bit for bit
    if fmt == "int8-dynamic":
        from safetensors import safe_open

        with safe_open(str(target / "gptopt_cpu.safetensors"), "pt") as f:  # int8 on disk, no float copy
            keys = set(f.keys())
            assert f.get_tensor("transformer.h.0.mlp.c_fc.weight_int8").dtype == torch.int8
        assert "transformer.h.0.mlp.c_fc.weight" not in keys and "transformer.h.1.mlp.c_fc.weight" in keys
        assert (target / "gptopt_cpu.safetensors").stat().st_size < 1.05 * model_bytes(saved)
        assert result.ctx.state["quantized"]["transformer.h.0.mlp.c_fc"] == "int8-dynamic"
        assert is_conv1d(model.transformer.h[1].mlp.c_fc) and is_dynamic_int8(model.transformer.h[0].mlp.c_fc)
        assert not (target / "model.safetensors").exists()  # nothing a plain HF loader would misread
    else:
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(str(target), dtype="auto")  # a standard HF checkpoint
        assert plain.dtype == torch.bfloat16 and torch.equal(logits(plain, ids), logits(saved, ids))
    # the core's model sources hand the directory to this plugin: gptopt run --model DIR
    again = Pipeline(model=str(target), quiet=True).add("eval", block_size=64, max_tokens=256).run()
    assert again.ctx.facts == ({"cpu-only", "quantized:cpu-int8"} if fmt != "bf16" else {"cpu-only", "quantized:cpu-bf16"})
    direct = perplexity(saved, result.ctx.data.valid_ids, 64, 64, 256)["perplexity"]
    assert again.records[0]["metrics"]["perplexity"] == pytest.approx(direct, rel=1e-9)


def test_torchao_model_saves_and_reloads_where_torchao_runs(tmp_path):
    target = tmp_path / "ao"
    pipe = Pipeline(model="tiny-random-gpt2", quiet=True).add("cpu-fast", format="ao-int8-weight", guard=False) \
        .add("save", to=str(target))
    if torchao_problem() is not None:  # torchao is the optional extra gptopt[cpu]: refused before anything runs
        with pytest.raises(GptoptError, match="torchao"):
            pipe.run()
        return
    result = pipe.run()
    model, _, record = load_converted(target)
    assert record["format"] == "ao-int8-weight" and "transformer.h.0.mlp.c_fc.weight" in record["wrapped"]
    ids = result.ctx.data.valid_ids[:48].unsqueeze(0)
    assert torch.equal(logits(model, ids), logits(result.model, ids))


# -- the CLI, as a user runs it ----------------------------------------------------------------------------
def test_cli_convert_save_and_run_the_saved_model(tmp_path):
    out = tmp_path / "m"
    r = run_gptopt("run", "--model", "tiny-random-gpt2", "--out", tmp_path / "run", "cpu-fast", "--format",
                   "int8-dynamic", "eval", "--block-size", "64", "--max-tokens", "256", "save", "--to", out)
    assert r.returncode == 0, r.stderr
    ppl = json.loads((tmp_path / "run" / "run.json").read_text())["steps"][1]["metrics"]["perplexity"]
    r = run_gptopt("run", "--model", out, "--out", tmp_path / "run2", "eval", "--block-size", "64",
                   "--max-tokens", "256")
    assert r.returncode == 0, r.stderr
    again = json.loads((tmp_path / "run2" / "run.json").read_text())["steps"][0]["metrics"]["perplexity"]
    assert again == pytest.approx(ppl, rel=1e-9)


@pytest.mark.parametrize("args, message", [
    (["cpu-fast", "--max-ppl-increase", "0"], "max_ppl_increase"),
    (["cpu-fast", "--format", "bf16", "prune", "--sparsity", "0.5"], "cannot run after cpu-fast"),
    (["quantize", "--bits", "4", "cpu-fast"], "already quantized"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    r = run_gptopt("run", "--model", "tiny-random-gpt2", *args)
    lines = error_lines(r.stderr)
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and message in lines[0], r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_refuses_a_cuda_model():
    r = run_gptopt("run", "--model", "tiny-random-gpt2", "--device", "cuda", "cpu-fast", "--format", "bf16")
    lines = error_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "--device cpu" in lines[0], r.stderr


# -- ao-int8-weight-bf16 and --compile -----------------------------------------------------------------------
def test_ao_int8_weight_bf16_saves_and_reloads_bit_for_bit(tmp_path):
    target = tmp_path / "aob"
    pipe = Pipeline(model="tiny-random-llama", quiet=True).add("cpu-fast", format="ao-int8-weight-bf16") \
        .add("save", to=str(target))
    if torchao_problem() is not None:
        with pytest.raises(GptoptError, match="torchao"):
            pipe.run()
        return
    result = pipe.run()
    linear = result.model.model.layers[0].mlp.up_proj
    assert linear.weight.qdata.dtype == torch.int8 and linear.weight.dtype == torch.bfloat16  # int8 values
    assert result.model.model.norm.weight.dtype == torch.bfloat16  # the float part is bf16
    model, _, record = load_converted(target)
    assert record["format"] == "ao-int8-weight-bf16" and record["wrapped"]
    ids = result.ctx.data.valid_ids[:48].unsqueeze(0)
    assert torch.equal(logits(model, ids), logits(result.model, ids))


def test_compile_runs_the_same_model_faster_path_and_reloads_compiled(tmp_path):
    """--compile wraps the converted model's forward in torch.compile; the weights, eval and save are the
    model's own, and the saved record makes the loader compile again."""
    target = tmp_path / "c"
    result = (Pipeline(model="tiny-random-llama", quiet=True)
              .add("cpu-fast", format="bf16", compile=True).add("eval", block_size=64, max_tokens=256)
              .add("save", to=str(target)).run())
    model = result.model
    assert model._gptopt_compiled and result.records[0]["metrics"]["compiled"]
    eager = copy.deepcopy(Pipeline(model="tiny-random-llama", quiet=True).add("cpu-fast", format="bf16").run().model)
    ids = result.ctx.data.valid_ids[:64].unsqueeze(0)
    torch.testing.assert_close(logits(model, ids), logits(eager, ids), atol=0.05, rtol=0.05)
    out = model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)
    again, _, record = load_converted(target)
    assert record["compile"] is True and again._gptopt_compiled
    ppl = perplexity(again, result.ctx.data.valid_ids, 64, 64, 256)["perplexity"]
    assert ppl == pytest.approx(result.records[1]["metrics"]["perplexity"], rel=1e-3)


def test_compile_without_a_cxx_compiler_is_refused_before_the_model_loads(monkeypatch):
    import shutil

    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(GptoptError, match="needs a C\\+\\+ compiler"):
        Pipeline(model="tiny-random-llama", quiet=True).add("cpu-fast", format="bf16", compile=True).validate()


def test_auto_with_compile_times_compiled_candidates_and_keeps_the_chosen_one_compiled():
    ctx = make_context(model="tiny-random-llama")
    step = CpuFastStep(candidates=["bf16", "int8-dynamic"], compile=True, eval_tokens=512, block_size=256,
                       prompt_tokens=16, new_tokens=8, rounds=1, calib_blocks=2, calib_seq_len=64)
    metrics = step.apply(ctx)
    table = {r["format"]: r for r in metrics["auto_table"]}
    assert table["bf16"]["compiled"] and not table["int8-dynamic"]["compiled"] and not table["fp32"]["compiled"]
    chosen = metrics["auto_choice"]
    assert bool(getattr(ctx.model, "_gptopt_compiled", False)) == table[chosen]["compiled"]
    assert ctx.model.gptopt_cpu.get("compile", False) == table[chosen]["compiled"]
    again = perplexity(ctx.model, ctx.data.valid_ids, 256, 256, 512)["perplexity"]
    assert again == pytest.approx(table[chosen]["perplexity"], rel=1e-3)  # compiled or not: the same model
