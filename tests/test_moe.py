"""Mixture-of-experts families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE, OLMoE) through calibration,
quantization, pruning and GGUF / llama.cpp.

The tiny MoE models have peaked routing (router logits of standard deviation ~4: each token puts ~96 % of its router
mass on its top 2 of 4 experts), so a wrong expert order or router layout changes the predictions. transformers holds
the experts fused (3-D parameters); ``gptopt_core.expert_linears`` shows each as two linear layers that see exactly
the tokens the router sends them.
"""
import json

import numpy as np
import pytest
import torch

from gptopt_core import (GptoptError, architecture_table, check_architecture, expert_layers, expert_linears, grid_layers,
                         grid_of, model_bytes, on_grid, sparsity, tiny_model, weight_matrix, weight_modules)
from gptopt_core.matrix import CELLS as MATRIX, supported

from test_families import (FAST, PPL_RATIO, RECIPES, _with_target, check_bnb, check_cpu_fast, check_eval, check_gguf,
                           check_grids, check_l1, check_prune, check_saved, check_saved_roundtrip, check_trained, run,
                           two_of_four)

MOE = {f"tiny-random-{a.name}": a for a in architecture_table().values() if a.moe is not None}
#: every cell of the family matrix on every MoE family
CELLS = [(name, cell) for name in MOE for cell in MATRIX]
#: the matrix's chains, but LoRA adapts the experts too (``--experts include``: peft's LoRA on fused parameters has
#: no dropout)
MOE_RECIPES = {**{c: steps for c, (steps, _) in RECIPES.items()},
               "lora + merge": [("lora", {"r": 4, "merge": True, "lr": 1e-2, "experts": "include", "dropout": 0.0,
                                          **FAST}), ("eval", RECIPES["lora + merge"][0][1][1])],
               "save compressed-tensors": RECIPES["quantize rtn int4"][0] + RECIPES["save compressed-tensors"][0][1:]}
#: cells whose chain is the start of another cell's chain, checked on that chain's run (run once per family, for
#: the suite's time): the records they check come first in it and the steps after them (export, llamacpp, save of
#: a model on its grids) leave the model as it is
SHARED = {"eval": "export gguf f32 + llamacpp", "quantize gptq int4": "gptq int4 -> export gguf q4_0 + llamacpp",
          "quantize rtn int4": "save compressed-tensors"}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(pydoc_data.topics.topics.values())[:12000])
    return str(path)


def router_counts(model, batches) -> dict:
    """``{block: [tokens per expert]}`` from the routers' own top-k on ``batches`` (independent of the views)."""
    counts, hooks = {}, []
    for i, block in enumerate(model.model.layers):
        n = block.mlp.experts.gate_up_proj.shape[0]
        counts[str(i)] = [0] * n

        def hook(module, args, out, i=str(i), n=n):
            for e, c in enumerate(torch.bincount(out[2].flatten(), minlength=n).tolist()):
                counts[i][e] += c
        hooks.append(block.mlp.gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            for b in batches:
                model(b)
    finally:
        for h in hooks:
            h.remove()
    return counts


@pytest.mark.parametrize("name", list(MOE))
def test_the_row_describes_the_model_and_routing_is_peaked(name):
    arch = MOE[name]
    model, tok = tiny_model(name)
    check_architecture(model, arch)
    ids = torch.tensor([tok("def f(x): return x * 2  # routing of a few tokens")["input_ids"]])
    mass = []
    hook = model.model.layers[0].mlp.gate.register_forward_hook(
        lambda m, a, out: mass.append(torch.softmax(out[0].float(), -1).topk(2, -1).values.sum(-1).mean()))
    with torch.inference_mode():
        want = model(ids).logits
        hook.remove()
        with expert_linears(model):
            got = model(ids).logits
            names = {n for n, _ in expert_layers(model)}
            assert names == {f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in range(4)
                             for p in ("gate_up_proj", "down_proj")}
            layer = model.get_submodule("model.layers.1.mlp.experts.3.down_proj")
            assert layer.weight.data_ptr() == model.model.layers[1].mlp.experts.down_proj[3].data_ptr()  # a view
        assert "0" not in dict(model.model.layers[0].mlp.experts.named_children())  # unhooked after
    assert float(mass[0]) > 0.9
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def without_gates(arch):
    """The row with a linear MoE gate (Qwen2-MoE's shared-expert gate) out of its groups: steps keep it float."""
    import dataclasses

    gate = arch.moe.shared_gate
    return dataclasses.replace(arch, groups=tuple(tuple(n for n in g if n != gate) for g in arch.groups))


def check_gates_float(res, arch):
    """Routers (and Qwen2-MoE's shared-expert gate) stay float, dense, plain parameters (no bitsandbytes)."""
    for block in res.model.model.layers:
        for rel in (arch.moe.router, arch.moe.shared_gate):
            if rel:
                gate = block.get_submodule(rel)
                assert grid_of(gate) is None and not bool((gate.weight == 0).any()), rel
                assert type(gate.weight) is torch.nn.Parameter and gate.weight.dtype == torch.float32, rel


_FLOAT: dict = {}


def float_model(arch):
    """The family's float tiny model, built once per module (the checks only read it)."""
    if arch.name not in _FLOAT:
        _FLOAT[arch.name] = tiny_model(f"tiny-random-{arch.name}")[0]
    return _FLOAT[arch.name]


def float_experts(arch) -> dict:
    return {n: m.weight for n, m in expert_layers(float_model(arch))}


def check_fused(res, arch):
    """The experts are still the family's fused module (3-D parameters of the float model's shapes, no peft
    wrapper left)."""
    want = {(p, tuple(getattr(e, p).shape)) for e in (b.get_submodule(arch.moe.experts) for b in
            float_model(arch).model.layers) for p in ("gate_up_proj", "down_proj")}
    for block in res.model.model.layers:
        experts = block.get_submodule(arch.moe.experts)
        assert {(p, tuple(t.shape)) for p, t in experts._parameters.items()} == want and not hasattr(experts,
                                                                                                    "base_layer")


def check_moe_bnb(res, arch):
    """bitsandbytes quantizes the linear layers (attention, shared expert); the fused experts stay float and
    unchanged, routers float, and the step says so."""
    check_bnb(res, without_gates(arch))
    check_gates_float(res, arch)
    before = float_experts(arch)
    assert all(torch.equal(m.weight, before[n]) for n, m in expert_layers(res.model))
    m = res.records[0]["metrics"]
    assert m["experts"].startswith("float (bitsandbytes") and m["router"].startswith("float"), m


def check_moe_trained(what):
    """Trained (LoRA merged / fine-tuned) like a dense family, every expert's weights changed in the fused layout,
    routers float, and the step's metrics say what it did to the experts."""
    def check(res, arch):
        check_trained(res, without_gates(arch))
        check_fused(res, arch)
        before = float_experts(arch)
        assert all(not torch.equal(m.weight, before[n]) for n, m in expert_layers(res.model))
        assert res.records[0]["metrics"]["experts"].startswith(what), res.records[0]["metrics"]
    return check


def check_moe_l1(res, arch):
    """The stated rule: l1 regularizes the linear layers (attention, shared expert), not the experts; the finetune
    after it trains the experts (changed, fused, no zeros)."""
    check_l1(res, without_gates(arch))
    check_fused(res, arch)
    before = float_experts(arch)
    for name, layer in expert_layers(res.model):
        assert not torch.equal(layer.weight, before[name]) and not bool((layer.weight == 0).any()), name
    assert res.records[0]["metrics"]["experts"].startswith("not L1-regularized")


def check_moe_cpu_fast(res, arch):
    """bf16 casts the whole model: experts and routers compute in bf16, as the step says."""
    check_cpu_fast(res, without_gates(arch))
    for block in res.model.model.layers:
        experts = block.get_submodule(arch.moe.experts)
        assert experts.gate_up_proj.dtype == experts.down_proj.dtype == torch.bfloat16
        assert block.get_submodule(arch.moe.router).weight.dtype == torch.bfloat16
    m = res.records[0]["metrics"]
    assert m["experts"] == "bfloat16 (cast with the model)" and m["router"].startswith("bfloat16"), m


def check_moe_compressed(res, arch, out):
    """Per-expert packed layers in the file (vLLM's MoE layout), routers ignored (float); plain transformers
    reloads it at the same logits."""
    from safetensors import safe_open

    check_saved(res, arch, out)
    with safe_open(str(next(out.glob("*.safetensors"))), "pt") as f:
        keys = set(f.keys())
    hub = "block_sparse_moe" if arch.model_type == "mixtral" else "mlp"
    leaves = ("w1", "w3", "w2") if arch.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    assert {f"model.layers.{i}.{hub}.experts.{e}.{leaf}.weight_packed" for i in range(2) for e in range(4)
            for leaf in leaves} <= keys
    assert f"model.layers.0.{hub}.gate.weight" in keys  # the router, float
    qconfig = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"model.layers.0.{hub}.gate" in qconfig["ignore"]


def test_views_write_back_and_follow_the_fused_parameters():
    """A step that replaces an expert layer's weight has it copied into the fused parameter on exit; a fused
    parameter the model replaced (a dtype or device move) wins over the old view; the view keeps its grid."""
    model, _ = tiny_model("tiny-random-mixtral")
    experts = model.model.layers[0].mlp.experts
    name = "model.layers.0.mlp.experts.1.down_proj"
    dict(expert_layers(model))[name].gptopt_grid = "marker"
    with expert_linears(model):
        layer = model.get_submodule(name)
        layer.weight = torch.nn.Parameter(torch.zeros_like(layer.weight))
    assert bool((experts.down_proj[1] == 0).all()) and bool((experts.down_proj[0] != 0).any())
    weights = sum(m.weight.numel() for _, m in weight_modules(model)) + sum(
        e.gate_up_proj.numel() + e.down_proj.numel() for e in (b.mlp.experts for b in model.model.layers))
    assert sparsity(model) == 64 * 64 / weights  # the experts count in the one sparsity measure
    new = torch.randn_like(experts.down_proj)
    experts.down_proj = torch.nn.Parameter(new.clone())
    view = dict(expert_layers(model))[name]
    assert torch.equal(experts.down_proj, new) and view.weight.data_ptr() == experts.down_proj[1].data_ptr()
    assert view.gptopt_grid == "marker"


def check_experts_on_grids(res, arch):
    check_grids(res, without_gates(arch))
    check_gates_float(res, arch)
    # the one size measure counts each expert as its packed grid (the fused parameter holds de-quantized floats)
    float_bytes = model_bytes(float_model(arch))
    packed = [(m, g) for _, m, g in grid_layers(res.model)] + [(m, grid_of(m)) for _, m in expert_layers(res.model)]
    saved = sum(m.weight.numel() * 4 - g.stored_bytes(*m.weight.shape) for m, g in packed)
    assert model_bytes(res.model) == float_bytes - saved
    assert len(packed) == len(without_gates(arch).linear_layers) * 2 + 16
    layers = expert_layers(res.model)
    assert len(layers) == 16 and all(on_grid(m, grid_of(m)) for _, m in layers)
    if res.records[0]["params"]["method"] == "gptq":
        check_coverage(res)


def check_coverage(res):
    """Each expert's calibration saw exactly the tokens the router sends it: the counts in the step's metrics are
    the routers' own top-k on the calibration batches, run on the compressed model (in sequential calibration a
    block's router reads what the compressed blocks before it and its compressed attention compute)."""
    from gptopt_core import calibration_batches

    m = res.records[0]["metrics"]
    p = res.records[0]["params"]
    n, seq = (p["calib_blocks"], p["calib_seq_len"]) if "calib_blocks" in p else (p["calib_samples"],
                                                                                   p["calib_seq_len"])
    batches = calibration_batches(res.ctx, n, seq)
    k = res.model.config.num_experts_per_tok
    assert {b: sum(c) for b, c in m["expert_tokens"].items()} == {"0": n * seq * k, "1": n * seq * k}
    assert m["expert_tokens"] == router_counts(res.model, batches)
    assert m["router"].startswith("float") and m["min_expert_tokens"] == 16
    assert m["experts_below_min"] == [f"{b}.{e}" for b, c in m["expert_tokens"].items() for e, t in enumerate(c)
                                      if t < 16]


def check_experts_pruned(pattern):
    def check(res, arch):
        check_prune(pattern)(res, without_gates(arch))
        for name, layer in expert_layers(res.model):
            assert abs(float((weight_matrix(layer) == 0).float().mean()) - 0.5) < 0.02, name
            assert pattern != "2:4" or two_of_four(weight_matrix(layer)), name
        check_gates_float(res, arch)  # routers (and Qwen2-MoE's shared-expert gate) stay dense and float
        if res.records[0]["params"]["method"] == "sparsegpt":  # sequential, like GPTQ
            check_coverage(res)
    return check


def check_merged_gguf(type_name):
    """llama.cpp's perplexity within the dense families' tolerance of torch's; every merged expert tensor is one
    ``type_name`` tensor whose de-quantization (gguf-py) is exactly the experts' torch weights; routers f32."""
    def check(res, arch, out):
        from gguf import GGUFReader, quants

        from gptopt_export.tensors import sources

        measured = res.records[-1]["metrics"]
        assert abs(measured["perplexity_vs_last_eval"] - 1) <= PPL_RATIO[type_name], measured
        want = {s.name: s.values.numpy() for s in sources(res.model)}
        merged = 0
        for t in GGUFReader(str(out)).tensors:
            if "_exps" in t.name:
                assert t.tensor_type.name == type_name.upper() and want[t.name].shape[0] == 4, t.name
                values = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want[t.name].shape)
                assert np.array_equal(values, want[t.name]), t.name
                merged += 1
            if "ffn_gate_inp" in t.name:
                assert t.tensor_type.name == "F32", t.name
        assert merged == 3 * 2
        if res.records[0]["params"].get("method") == "gptq":
            check_coverage(res)
    return check


CHECKS = {"eval": check_eval, "quantize bnb int8": check_moe_bnb, "quantize bnb nf4": check_moe_bnb,
          "quantize rtn int4": check_experts_on_grids, "quantize gptq int4": check_experts_on_grids,
          "prune magnitude": check_experts_pruned(""), "prune magnitude 2:4": check_experts_pruned("2:4"),
          "prune wanda": check_experts_pruned(""), "prune wanda 2:4": check_experts_pruned("2:4"),
          "prune sparsegpt": check_experts_pruned(""), "prune sparsegpt 2:4": check_experts_pruned("2:4"),
          "lora + merge": check_moe_trained("LoRA on the fused expert weights (--experts include), merged"),
          "finetune": check_moe_trained("trained in their fused layout"), "l1 + finetune": check_moe_l1,
          "cpu-fast": check_moe_cpu_fast, "save safetensors": check_saved_roundtrip,
          "save compressed-tensors": check_moe_compressed, "export gguf f32 + llamacpp": check_gguf("f32"),
          "rtn int8 -> export gguf q8_0 + llamacpp": check_merged_gguf("q8_0"),
          "gptq int4 -> export gguf q4_0 + llamacpp": check_merged_gguf("q4_0")}


def test_every_matrix_cell_has_a_moe_check():
    assert sorted(CHECKS) == sorted(MATRIX) == sorted(MOE_RECIPES)  # every registered cell, whatever its order


_RUNS: dict = {}


def run_cell(name, cell, text, folder):
    """``(result, output path)`` of ``cell``'s chain on ``name``, run once per module (``SHARED`` cells reuse the
    longer chain they start)."""
    chain = SHARED.get(cell, cell)
    assert MOE_RECIPES[chain][:len(MOE_RECIPES[cell])] == MOE_RECIPES[cell]  # a shared cell's chain starts it
    if (name, chain) not in _RUNS:
        out = folder / f"{name}-{len(_RUNS)}" / ("m.gguf" if "export" in chain else "m")
        out.parent.mkdir(parents=True)
        _RUNS[(name, chain)] = (run(name, text, _with_target(MOE_RECIPES[chain], out)), out)
    return _RUNS[(name, chain)]


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    yield tmp_path_factory.mktemp("runs")
    _RUNS.clear()


@pytest.mark.parametrize("name,cell", CELLS)
def test_moe_family_matrix(name, cell, text, runs_dir):
    arch = MOE[name]
    why = supported(arch, cell)
    if why is not None:  # the family cannot run this cell: one line, nothing written
        out = runs_dir / "refused" / "m"
        with pytest.raises(GptoptError) as info:
            run(name, text, _with_target(MOE_RECIPES[cell], out))
        assert "\n" not in str(info.value) and arch.model_type in str(info.value) and not out.exists()
        return
    res, out = run_cell(name, cell, text, runs_dir)
    check = CHECKS[cell]
    if "out" in check.__code__.co_varnames[:check.__code__.co_argcount]:
        check(res, arch, out)
    else:
        check(res, arch)
    if cell == "quantize rtn int4":  # no calibration: no coverage, nothing below the minimum
        assert "expert_tokens" not in res.records[0]["metrics"] and res.records[0]["metrics"]["moe_blocks"] == 2


def test_an_expert_below_min_expert_tokens_is_quantized_round_to_nearest(text, tmp_path):
    """The stated rule: an expert whose calibration saw fewer than --min-expert-tokens gets an identity Hessian, so
    GPTQ on it is round-to-nearest on the same grid (exactly RTN's weights); it is listed, never skipped."""
    from gptopt_core import fit_grid

    gptq = RECIPES["quantize gptq int4"][0][0][1]
    few = {**gptq, "calib_blocks": 1, "min_expert_tokens": 10 ** 6}
    res = run("tiny-random-mixtral", text, [("quantize", few)], out=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["steps"][0]["metrics"]["expert_tokens"] == res.records[0]["metrics"]["expert_tokens"]
    m = res.records[0]["metrics"]
    assert m["experts_below_min"] == [f"{b}.{e}" for b in range(2) for e in range(4)]
    assert sum(map(sum, m["expert_tokens"].values())) == 2 * 32 * 2  # still calibrated and counted
    want = {}  # round-to-nearest of the float experts on the same grid (min-max, 4 bits, groups of 32, symmetric)
    for name, layer in expert_layers(tiny_model("tiny-random-mixtral")[0]):
        grid = fit_grid(layer.weight.detach(), 4, 32, True)
        want[name] = grid.dequantize(grid.codes(layer.weight))
    for name, layer in expert_layers(res.model):
        assert torch.equal(layer.weight, want[name]), name
    normal = run("tiny-random-mixtral", text, [("quantize", {**gptq, "calib_blocks": 1})])
    assert not all(torch.equal(layer.weight, want[n]) for n, layer in expert_layers(normal.model))


# -- llama.cpp against torch, with experts that matter ------------------------------------------------------------
SEQ = 64
_MODELS: dict = {}


def moe_model(name):
    """``(model, tokenizer, ids, torch logits)``: the tiny model (peaked routing) with its experts' outputs scaled
    20x (random init makes them small beside the residual, so a wrong expert would hardly show) and its final norm
    scaled so logits have a standard deviation of 3, as tests/test_attention_numerics.py does for dense families."""
    if name not in _MODELS:
        arch = MOE[name]
        model, tok = tiny_model(name)
        ids = torch.randint(0, len(tok) - 1, (1, SEQ), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            for block in model.get_submodule(arch.blocks):
                block.get_submodule(arch.moe.experts).down_proj.mul_(20.0)
            spread = float(model(ids).logits.std())
            model.get_submodule(arch.final_norm).weight.mul_(3.0 / spread)
            want = model(ids).logits[0].float().numpy()
        _MODELS[name] = (model, tok, ids, want)
    return _MODELS[name]


def llamacpp_difference(name, path) -> float:
    from gptopt_export.gguf_writer import write_gguf
    from gptopt_export.llamacpp import next_token_logits

    model, tok, ids, want = moe_model(name)
    write_gguf(model, tok, path, "f32", name="moe")
    got = np.asarray(next_token_logits(path, ids[0].tolist(), threads=2, f32_cache=True), dtype=np.float32)
    return float(np.abs(got - want).max())


#: max |logit difference| llama.cpp vs torch at every position (the dense SiLU families' tolerance)
TOLERANCE = 2e-3


@pytest.mark.parametrize("name", list(MOE))
def test_llamacpp_logits_match_torch_with_peaked_routing(name, tmp_path):
    assert llamacpp_difference(name, tmp_path / "m.gguf") <= TOLERANCE


def _edited_sources(edit):
    import gptopt_export.tensors as tensors

    original = tensors.sources

    def sources(model, plugins=None):
        return edit(original(model, plugins))
    return sources


def _swap_experts(srcs):
    for s in srcs:
        if "_exps" in s.name and s.name.startswith("blk.0."):
            s.values = s.values[[1, 0, 2, 3]]
    return srcs


def _swap_gate_up(srcs):
    for s in srcs:
        if "ffn_gate_exps" in s.name or "ffn_up_exps" in s.name:
            s.name = s.name.replace("gate_exps", "@").replace("up_exps", "gate_exps").replace("@", "up_exps")
    return srcs


def _rotate_router(srcs):
    for s in srcs:
        if s.name.endswith("ffn_gate_inp.weight"):
            s.values = s.values.roll(1, 0)
    return srcs


@pytest.mark.parametrize("fault", [_swap_experts, _swap_gate_up, _rotate_router],
                         ids=["experts swapped", "gate and up swapped", "router rows rotated"])
def test_planted_moe_faults_fail_the_check(fault, monkeypatch, tmp_path):
    import gptopt_export.tensors as tensors

    monkeypatch.setattr(tensors, "sources", _edited_sources(fault))
    assert llamacpp_difference("tiny-random-mixtral", tmp_path / "m.gguf") > 100 * TOLERANCE


def test_the_cli_refuses_what_llamacpp_computes_differently_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """The console entry point (run in process, its global settings restored after) exits 2 with one error line."""
    import signal
    import warnings

    from gptopt_core.cli import TERMINATING, main
    from gptopt_core.kit.models import byte_tokenizer

    model, _ = tiny_model("tiny-random-qwen3-moe")
    model.config.norm_topk_prob = False
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    handlers = {n: signal.getsignal(getattr(signal, n)) for n in TERMINATING}
    try:
        with pytest.raises(SystemExit) as info:
            main(["run", "--model", str(tmp_path / "m"), "export", "--to", str(tmp_path / "m.gguf")])
    finally:
        for n, h in handlers.items():
            signal.signal(getattr(signal, n), h)
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("Error")]
    assert info.value.code == 2 and len(errors) == 1 and "Traceback" not in stderr, stderr
    assert "Qwen3-MoE with norm_topk_prob=False" in errors[0] and not (tmp_path / "m.gguf").exists()


def test_training_after_a_prune_keeps_the_experts_zeros(text):
    """prune records masks under the expert layers' names; the training loop keeps those zeros in the fused
    weights (without it Adam's first step refills every pruned expert weight)."""
    res = run("tiny-random-mixtral", text, [("prune", {"method": "magnitude", "sparsity": 0.5}),
                                            ("finetune", RECIPES["finetune"][0][0][1])])
    before = dict(expert_layers(tiny_model("tiny-random-mixtral")[0]))
    for name, layer in expert_layers(res.model):
        assert abs(float((weight_matrix(layer) == 0).float().mean()) - 0.5) < 0.02, name
        assert not torch.equal(layer.weight, before[name].weight), name  # trained


@pytest.mark.parametrize("step", [("quantize", {"method": "gptq", "bits": 4, "offload": "disk"}),
                                  ("prune", {"method": "sparsegpt", "sparsity": 0.5, "offload": "cpu"})])
def test_offloading_a_mixture_of_experts_is_refused_in_one_line(step, text):
    with pytest.raises(GptoptError, match=f"{step[0]} --offload .*: not supported on a mixture of experts") as info:
        run("tiny-random-mixtral", text, [step])
    assert "\n" not in str(info.value)


def test_what_llamacpp_computes_differently_is_refused_in_one_line():
    from gptopt_export.gguf_writer import check_model

    for name, change, words in (("tiny-random-qwen2-moe", {"norm_topk_prob": True}, "never renormalizes"),
                                ("tiny-random-qwen3-moe", {"norm_topk_prob": False}, "always renormalizes"),
                                ("tiny-random-olmoe", {"num_key_value_heads": 2}, "grouped-query"),
                                ("tiny-random-qwen2-moe", {"mlp_only_layers": [1]}, "dense blocks")):
        model, _ = tiny_model(name)
        check_model(model)
        for key, value in change.items():
            setattr(model.config, key, value)
        with pytest.raises(GptoptError, match=words) as info:
            check_model(model)
        assert "\n" not in str(info.value) and str(info.value).startswith("export --format gguf: ")


def test_a_mixtral_pruned_to_half_its_experts_reloads_in_transformers_and_runs_in_llamacpp(tmp_path):
    """The issue's check: prune-experts to half of tiny Mixtral's experts (experts made to matter: outputs x20, logits
    spread to std 3), saved, reloaded by plain transformers at the same logits, exported and run in llama.cpp at
    torch's logits on every position."""
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.testing import make_context
    from gptopt_export.gguf_writer import write_gguf
    from gptopt_export.llamacpp import next_token_logits

    arch = MOE["tiny-random-mixtral"]
    ctx = make_context(model="tiny-random-mixtral")
    model = ctx.model
    ids = torch.randint(0, len(ctx.tokenizer) - 1, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for block in model.get_submodule(arch.blocks):
            block.get_submodule(arch.moe.experts).down_proj.mul_(20.0)
        model.get_submodule(arch.final_norm).weight.mul_(3.0 / float(model(ids).logits.std()))
    before = model.config.num_local_experts
    metrics = ctx.plugins.step_class("prune-experts")(keep_fraction=0.5, calib_samples=4, calib_seq_len=64).apply(ctx)
    assert metrics["experts_after"] == before // 2 == model.config.num_local_experts
    ctx.plugins.step_class("save")(to=str(tmp_path / "pruned")).apply(ctx)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert reloaded.config.num_local_experts == before // 2
    assert reloaded.model.layers[0].mlp.experts.gate_up_proj.shape[0] == before // 2
    with torch.inference_mode():
        want = model(ids).logits[0].float()
        assert torch.equal(reloaded(ids).logits[0].float(), want)
    write_gguf(reloaded, ctx.tokenizer, tmp_path / "pruned.gguf", "f32", name="moe")
    got = np.asarray(next_token_logits(tmp_path / "pruned.gguf", ids[0].tolist(), threads=2, f32_cache=True),
                     dtype=np.float32)
    assert float(np.abs(got - want.numpy()).max()) <= TOLERANCE


def test_prune_experts_is_lossy_for_the_kl_base(text, tmp_path, monkeypatch):
    """--kl-base auto takes its base before prune-experts, as before quantize or prune: the eval after it reports
    the KL of the pruned model against the model with all its experts."""
    monkeypatch.setenv("GPTOPT_CACHE", str(tmp_path / "cache"))
    res = run("tiny-random-mixtral", text, [("prune-experts", {"keep": 2, "calib_samples": 2, "calib_seq_len": 32}),
                                            ("eval", {"block_size": 64, "max_tokens": 256})])
    m = res.records[-1]["metrics"]
    assert m["kl_base"] == "model before the first lossy step" and m["kl_mean"] > 0 and m["same_top1"] < 100


@pytest.mark.parametrize("name,params", [("tiny-random-qwen2-moe", RECIPES["quantize rtn int4"][0][0][1]),
                                         ("tiny-random-mixtral", {**RECIPES["quantize gptq int4"][0][0][1],
                                                                  "calib_blocks": 1})],
                         ids=["rtn qwen2-moe", "gptq mixtral"])
def test_router_include_quantizes_the_routers_and_says_so(name, params, text, tmp_path):
    """quantize --router include: every router (and Qwen2-MoE's shared-expert gate) on the step's 4-bit grid
    (RTN: exactly round-to-nearest of the float weight), the rest as without it, and run.json's metrics say so."""
    from gptopt_core import fit_grid

    arch = MOE[name]
    res = run(name, text, [("quantize", {**params, "bits": 4, "router": "include"})], out=tmp_path / "run")
    m = json.loads((tmp_path / "run" / "run.json").read_text())["steps"][0]["metrics"]
    assert m["router"].startswith("quantized like the linear layers (--router include")
    float_model = tiny_model(name)[0]
    for i, block in enumerate(res.model.model.layers):
        for rel in (arch.moe.router, arch.moe.shared_gate):
            if not rel:
                continue
            w, w0 = block.get_submodule(rel).weight, float_model.model.layers[i].get_submodule(rel).weight
            # 4 bits in groups of 32: at most 16 values per row and group (the float weight has 32)
            assert max(len(torch.unique(g)) for g in w.detach().reshape(-1, 32)) <= 16, rel
            if params["method"] == "rtn":
                grid = fit_grid(w0.detach(), 4, 32, True)
                assert torch.equal(w, grid.dequantize(grid.codes(w0))), rel
    assert all(on_grid(m_, grid_of(m_)) for _, m_ in expert_layers(res.model))  # experts as without it
    assert "gptopt_linear" not in dict(res.model.named_modules()).get(f"model.layers.0.{arch.moe.router}")._modules


def test_router_include_is_refused_for_bitsandbytes_in_one_line():
    from gptopt_core import ParamsError, get_plugins

    with pytest.raises(ParamsError, match="--router applies to --method rtn/gptq/signround, not bitsandbytes") as info:
        get_plugins().step_class("quantize")(bits=4, router="include")
    assert "\n" not in str(info.value)
