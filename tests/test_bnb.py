"""quantize (gptopt-quantize) on the tiny GPT-2 (Conv1D) and tiny Llama (nn.Linear) models: every option, tied heads,
chain position, save → plain from_pretrained, plan auto / file / replay, bad input through the real CLI."""
import json
import math

import pytest
import torch

from conftest import error_lines

from gptopt_core import Pipeline, PlanError
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.testing import make_context

ARCHS = ["tiny-random-gpt2", "tiny-random-llama"]
EVAL = {"block_size": 128, "max_tokens": 512}


def run(model, *steps, **kw):
    kw.setdefault("device", "cpu")
    pipe = Pipeline(model=model, quiet=True, **kw)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def quantize_ctx(model, **params):
    from gptopt_quantize import QuantizeStep

    ctx = make_context(model=model)
    dense = perplexity(ctx.model, ctx.data.valid_ids, **{"block_size": 128, "stride": 128, "max_tokens": 512})
    step = QuantizeStep(**params)
    metrics = step.apply(ctx)
    return ctx, step, metrics, dense["perplexity"]


def kinds(model):
    return {n: type(m).__name__ for n, m in model.named_modules()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("params,expect", [
    ({"bits": 8}, "int8"),
    ({"bits": 4}, "nf4"),
    ({"bits": 4, "quant_type": "fp4", "double_quant": False, "block_size": 128, "compute_dtype": "bfloat16"}, "fp4"),
    ({"bits": 8, "int8_threshold": 0.0}, "int8"),
])
def test_every_layer_quantized_and_ppl_close(arch, params, expect):
    from gptopt_core.kit.metrics import model_bytes
    from gptopt_core.kit.modules import weight_modules

    ctx, step, metrics, dense = quantize_ctx(arch, **params)
    q = ctx.state["quantized"]
    assert q and set(q.values()) == {expect}
    # every linear / Conv1D layer except the head is a bitsandbytes module now; the head is kept
    head = ctx.model.get_output_embeddings()
    assert all(type(m).__name__ in ("Linear8bitLt", "Linear4bit") for _, m in weight_modules(ctx.model))
    assert type(head).__name__ in ("Linear", "Conv1D")
    after = perplexity(ctx.model, ctx.data.valid_ids, 128, 128, 512)["perplexity"]
    assert abs(after / dense - 1) < 0.02
    assert model_bytes(ctx.model) < metrics["bytes_before"]
    assert step.next_facts(set()) == {"quantized:8bit" if expect == "int8" else "quantized:4bit"}
    if expect != "int8":
        layer = next(m for m in ctx.model.modules() if type(m).__name__ == "Linear4bit")
        assert layer.weight.quant_state.blocksize == params.get("block_size", 64)
        assert bool(layer.weight.compress_statistics) == params.get("double_quant", True)
        assert layer.compute_dtype == getattr(torch, params.get("compute_dtype", "float32"))
        assert ctx.model.is_loaded_in_4bit
    else:
        assert ctx.model.is_loaded_in_8bit and not ctx.model.is_loaded_in_4bit
        layer = next(m for m in ctx.model.modules() if type(m).__name__ == "Linear8bitLt")
        assert layer.state.threshold == params.get("int8_threshold", 6.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_match_dense(arch):
    """The quantized layer computes x @ W^T (+ b) for Conv1D (stored (in, out)) and Linear alike."""
    from gptopt_quantize.convert import make_linear
    from gptopt_core.kit.modules import weight_matrix, weight_modules

    ctx = make_context(model=arch)
    name, layer = weight_modules(ctx.model)[0]
    w = weight_matrix(layer).detach().clone()
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    x = torch.randn(3, w.shape[1])
    ref = torch.nn.functional.linear(x, w, bias)
    s = {"int8_threshold": 6.0, "compute_dtype": "float32", "double_quant": True, "block_size": 64}
    for prec, tol in (("int8", 0.03), ("nf4", 0.15), ("fp4", 0.2)):
        out = make_linear(layer, prec, s, torch.device("cpu"))(x)
        assert out.shape == ref.shape
        assert ((out - ref).norm() / ref.norm()) < tol, prec


@pytest.mark.parametrize("arch", ARCHS)
def test_include_exclude(arch):
    ctx, _, metrics, _ = quantize_ctx(arch, bits=4, include=["*mlp*"], exclude=["*.1.*"])
    q = ctx.state["quantized"]
    assert q and all("mlp" in n and ".1." not in n for n in q)
    assert metrics["quantized_modules"] == len(q)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("emb", ["8", "4"])
def test_full_quantization_embeddings_and_head(arch, emb):
    from gptopt_core.kit.metrics import model_bytes

    ctx, step, metrics, dense = quantize_ctx(arch, bits=4, embeddings=emb)
    model = ctx.model
    layout_kinds = kinds(model)
    emb_mod, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(emb_mod).__name__ == ("QuantEmbedding8bit" if emb == "8" else "QuantEmbedding4bit")
    assert type(head).__name__ == ("Linear8bitLt" if emb == "8" else "Linear4bit")
    # no full-precision weight matrix is left
    assert not any(k in ("Linear", "Conv1D", "Embedding") for k in layout_kinds.values())
    if arch == "tiny-random-gpt2":  # tied: the head computes with the embedding's quantized storage
        assert head.weight.data_ptr() == emb_mod.weight.data_ptr()
        x = torch.randn(2, emb_mod.embedding_dim)
        deq = emb_mod.dequantized_weight()
        ref = x @ deq.t()
        assert ((head(x).float() - ref).norm() / ref.norm()) < 0.03
    after = perplexity(model, ctx.data.valid_ids, 128, 128, 512)["perplexity"]
    assert abs(after / dense - 1) < 0.03
    assert model.state_dict()  # quantized embeddings still give a state dict
    assert model_bytes(model) < 0.45 * metrics["bytes_before"]
    assert step.next_facts(set()) == {"quantized:4bit"} | ({"quantized:8bit"} if emb == "8" else set())


def test_quantize_after_weights_changed_in_chain():
    """The step quantizes the model as it stands: zeros written by an earlier step stay zeros (int8)."""
    from gptopt_quantize import QuantizeStep
    from gptopt_core.kit.modules import weight_matrix, weight_modules

    ctx = make_context(model="tiny-random-gpt2")
    name, layer = weight_modules(ctx.model)[0]
    with torch.no_grad():
        layer.weight[:, ::2] = 0  # Conv1D (in, out): zero every other output column
    zero_rows = weight_matrix(layer).abs().sum(1) == 0
    QuantizeStep(bits=8).apply(ctx)
    q = ctx.model.get_submodule(name)
    assert torch.equal(q.weight.data.abs().sum(1) == 0, zero_rows)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("params", [{"bits": 8}, {"bits": 4}, {"bits": 4, "embeddings": "8"},
                                    "mixed"])
def test_save_loads_back_with_plain_from_pretrained(arch, params, tmp_path):
    from transformers import AutoModelForCausalLM

    # what one BitsAndBytesConfig cannot describe (int8 beside nf4, int8 embeddings) is written de-quantized only
    # when asked (save refuses it otherwise: tests/test_ctensors.py)
    dequantized = params == "mixed" or "embeddings" in params
    if params == "mixed":  # a mixed plan: int8 attention, nf4 MLP, int8 embeddings
        ctx = make_context(model=arch)
        from gptopt_core.kit.modules import weight_modules

        plan = {n: ("int8" if "attn" in n else "nf4") for n, _ in weight_modules(ctx.model)}
        plan[next(n for n, m in ctx.model.named_modules() if m is ctx.model.get_input_embeddings())] = "int8"
        params = {"plan": plan}
    res = run(arch, ("quantize", params), ("eval", EVAL),
              ("save", {"to": str(tmp_path / "m"), "allow_dequantized": dequantized}))
    ppl = res.records[1]["metrics"]["perplexity"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "bitsandbytes"
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    names = {type(m).__name__ for m in loaded.modules()}
    assert names & {"Linear4bit", "Linear8bitLt"}
    again = perplexity(loaded, res.ctx.data.valid_ids, 128, 128, 512)["perplexity"]
    assert abs(again / ppl - 1) < 0.005
    # and gptopt loads it back as a quantized model that refuses a second quantize
    with pytest.raises(PlanError, match="already quantized"):
        run(str(tmp_path / "m"), ("quantize", {"bits": 8}))


def test_plan_auto_records_and_replays(tmp_path, cli):
    out = tmp_path / "run"
    res = run("tiny-random-llama", ("quantize", {"plan": "auto", "max_ppl_increase": "1%", "embeddings": "4",
                                                 "calib_blocks": 2, "calib_seq_len": 64, "check_blocks": 3}),
              out=str(out))
    rec = res.records[0]
    report = rec["metrics"]["plan"]
    assert report["calib_tokens"] == 2 * 64 and report["check_tokens"] == 3 * 64
    # the reported ratio of the chosen plan is the one measured on the check blocks, against the dense model
    from gptopt_core.kit.sensitivity import calibration_nll

    check = res.ctx.calibration_blocks(3, 64)
    dense = make_context(model="tiny-random-llama").model
    measured = math.exp(calibration_nll(res.ctx.model, check) - calibration_nll(dense, check))
    assert measured == pytest.approx(report["calib_ppl_ratio"], abs=2e-5)
    plan = rec["params"]["plan"]
    assert isinstance(plan, dict) and set(plan.values()) <= {"int8", "nf4", "keep"}
    assert report["budget"] == 0.01 and report["trials"]
    assert report["met"] is (report["calib_ppl_ratio"] <= 1.01)
    assert res.ctx.state["quantized"] == {n: p for n, p in plan.items() if p != "keep"}
    assert res.ctx.facts == {f"quantized:{'8bit' if p == 'int8' else '4bit'}" for p in plan.values() if p != "keep"}
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["recipe"]["steps"][0]["quantize"]["plan"] == plan
    # replay from run.json: same plan, no measuring (no planner report)
    r2 = cli("run", "--recipe", out / "run.json", "--out", tmp_path / "replay", "-q")
    assert r2.returncode == 0, r2.stderr
    rec2 = json.loads((tmp_path / "replay" / "run.json").read_text())["steps"][0]
    assert rec2["params"]["plan"] == plan and "plan" not in rec2["metrics"]
    # a larger budget never needs more bytes
    loose = run("tiny-random-llama", ("quantize", {"plan": "auto", "max_ppl_increase": "50%", "embeddings": "4",
                                                   "calib_blocks": 2, "calib_seq_len": 64}))
    assert loose.records[0]["metrics"]["model_bytes"] <= rec["metrics"]["model_bytes"]


def test_plan_file(tmp_path):
    ctx = make_context(model="tiny-random-gpt2")
    from gptopt_core.kit.modules import weight_modules

    names = [n for n, _ in weight_modules(ctx.model)]
    plan = {names[0]: "int8", names[1]: "fp4", names[2]: "keep"}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    res = run("tiny-random-gpt2", ("quantize", {"plan": str(path)}))
    assert res.ctx.state["quantized"] == {names[0]: "int8", names[1]: "fp4"}
    assert res.records[0]["params"]["plan"] == plan  # the recipe carries the mapping, not the path


def test_plan_ordering_facts():
    with pytest.raises(PlanError, match="already quantized"):
        Pipeline(model="tiny-random-gpt2", quiet=True).add("quantize", bits=8).add("quantize", bits=4).validate()
    pipe = Pipeline(model="tiny-random-gpt2", quiet=True).add("quantize", bits=4, embeddings="8")
    assert pipe.steps[0].next_facts(set()) == {"quantized:4bit", "quantized:8bit"}


@pytest.mark.parametrize("args,needle", [
    (["quantize", "--bits", "3"], "8 or 4 bits"),
    (["quantize", "--bits", "8", "--quant-type", "nf4"], "--quant-type applies to 4-bit"),
    (["quantize", "--bits", "4", "--include", "nothing.here"], "matches no linear"),
    (["quantize", "--bits", "8", "quantize", "--bits", "4"], "already quantized"),
    (["quantize"], "give --bits"),
    (["quantize", "--plan", "/no/such/plan.json"], "does not exist"),
    (["quantize", "--bits", "4", "--max-ppl-increase", "5%"], "--plan auto"),
])
def test_bad_input_cli(cli, args, needle, tmp_path):
    r = cli("run", "--model", "tiny-random-gpt2", "--out", tmp_path / "o", *args)
    assert r.returncode == 2, r.stderr
    errors = [l for l in error_lines(r.stderr) if l.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.stderr, r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(cli, tmp_path):
    r = cli("run", "--model", "tiny-random-gpt2", "--device", "cuda", "quantize", "--bits", "4")
    assert r.returncode == 2
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and "no CUDA GPU" in lines[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda(arch, tmp_path):
    res = run(arch, ("eval", EVAL), ("quantize", {"bits": 4, "embeddings": "8"}), ("eval", EVAL),
              device="cuda")
    a, b = res.records[0]["metrics"]["perplexity"], res.records[2]["metrics"]["perplexity"]
    assert abs(b / a - 1) < 0.03
