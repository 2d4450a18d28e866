"""prune: masks, scores and patterns on the tiny GPT-2 (Conv1D) and Llama (nn.Linear) models."""
import json

import pytest
import torch
from conftest import error_lines, run_gptopt

from gptopt_core import ParamsError, Params, Pipeline, PlanError, Step, hookimpl
from gptopt_core.kit.modules import weight_matrix, weight_modules
from gptopt_core.kit.testing import make_context, register_plugin
from gptopt_prune import PruneStep
from gptopt_prune.pruning import keep_global, keep_layer, keep_nm, keep_rows

MODELS = ["tiny-random-gpt2", "tiny-random-llama"]


@pytest.fixture(scope="module")
def contexts():
    return {m: make_context(model=m) for m in MODELS}


DENSE: dict = {}  # tiny model name -> its dense weights, kept the first time fresh() sees it


def fresh(contexts, name):
    """The tiny model's context with dense weights again and no masks."""
    ctx = contexts[name]
    if name not in DENSE:
        DENSE[name] = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ctx.model.load_state_dict(DENSE[name])
    ctx.state.clear()
    return ctx


def prune(ctx, **params):
    step = PruneStep(**params)
    step.preflight(ctx)
    return step.apply(ctx)


# -- selection primitives -----------------------------------------------------------------------------
def test_keep_nm_is_exact_per_group_and_keeps_the_largest():
    score = torch.rand(16, 32)
    keep = keep_nm(score, 2, 4, "x")
    groups = keep.reshape(16, 8, 4)
    assert (groups.sum(-1) == 2).all()
    s = score.reshape(16, 8, 4)
    kept_min = torch.where(groups, s, torch.inf).amin(-1)
    dropped_max = torch.where(~groups, s, -torch.inf).amax(-1)
    assert (kept_min > dropped_max).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.77])
def test_keep_rows_and_layer_drop_exactly_the_requested_count(sparsity):
    score = torch.rand(7, 33)
    k = round(sparsity * score.numel())
    rows = keep_rows(score, sparsity)
    assert int((~rows).sum()) == k
    per_row = (~rows).sum(1)
    assert int(per_row.max() - per_row.min()) <= 1  # compared within each row
    for r in range(7):  # within a row, every dropped score is below every kept one
        if 0 < per_row[r] < 33:
            assert score[r][~rows[r]].max() < score[r][rows[r]].min()
    layer = keep_layer(score, sparsity)
    assert int((~layer).sum()) == k
    if 0 < k < score.numel():
        assert score[~layer].max() < score[layer].min()


def test_keep_global_is_exact_over_all_layers_even_with_ties():
    a, b = torch.zeros(10, 10), torch.rand(5, 20)  # 100 tied zeros
    keeps = keep_global([a, b], 0.3)
    assert sum(int((~k).sum()) for k in keeps) == 60
    assert int((~keeps[1]).sum()) == 0  # all drops come from the zeros


# -- parameters and plan ------------------------------------------------------------------------------
@pytest.mark.parametrize("params, message", [
    (dict(sparsity=1.0), "sparsity: Input should be less than 1"),
    (dict(sparsity=-0.1), "sparsity: Input should be greater than or equal to 0"),
    (dict(pattern="5:4"), "not a valid N:M pattern"),
    (dict(pattern="2-4"), "neither 'unstructured' nor N:M"),
    (dict(pattern="2:4", sparsity=0.3), "contradicts --pattern 2:4"),
    (dict(pattern="2:4", scope="global"), "--scope global does not apply"),
    (dict(method="wanda"), "give --sparsity"),
    (dict(sparsity=0.5, method="obs"), "method: Input should be"),
    (dict(sparsity=0.5, calib_samples=0), "calib_samples"),
])
def test_bad_params_are_refused_with_the_reason(params, message):
    with pytest.raises(ParamsError, match="prune: ") as info:
        Pipeline(model="tiny-random-gpt2").add("prune", **params)
    assert message in str(info.value)


def test_fractions_take_percent_from_every_door():
    """One percent type everywhere: ``prune --sparsity 50%`` as ``quantize --max-ppl-increase 5%``."""
    assert PruneStep(sparsity="50%").params.sparsity == 0.5 == PruneStep(sparsity="0.5").params.sparsity
    assert PruneStep(method="sparsegpt", sparsity=0.5, dampening="1%").params.dampening == 0.01
    with pytest.raises(ParamsError, match="sparsity: Input should be less than 1"):
        PruneStep(sparsity="100%")
    proc = run_gptopt("run", "--model", "tiny-random-gpt2", "prune", "--sparsity", "half")
    assert proc.returncode == 2 and "like 10% or 0.1" in proc.stderr
    from gptopt_core import get_plugins

    for step, option in [("l1", {"weight": 1, "sparsity": "30%", "warmup_fraction": "25%"}),
                         ("bench", {"target_cv": "5%"}), ("quantize", {"method": "gptq", "bits": 4, "dampening": "1%"})]:
        params = get_plugins().step_class(step)(**option).params
        assert all(getattr(params, k) == pytest.approx(float(v[:-1]) / 100) for k, v in option.items()
                   if str(v).endswith("%")), step


def test_n_m_implies_its_sparsity():
    assert PruneStep(pattern="2:4").params.target_sparsity == 0.5
    assert PruneStep(pattern="2:4", sparsity=0.5).params.target_sparsity == 0.5
    assert PruneStep(pattern="1:4").params.target_sparsity == 0.75


class _Quantize(Step):
    """fake 4-bit quantizer (plan checks only)"""
    name = "fakequant"

    class Params(Params):
        bits: int = 4

    provides = frozenset({"quantized:4bit"})


class _Quantize8(_Quantize):
    name = "fakequant8"
    provides = frozenset({"quantized:8bit"})


class _FakePlugin:
    @hookimpl
    def gptopt_register_steps(self, register):
        register(_Quantize)
        register(_Quantize8)


def test_prune_after_quantize_is_refused_before_anything_loads():
    with register_plugin(_FakePlugin(), "fake-quant"):
        for step in ("fakequant", "fakequant8"):
            pipe = Pipeline(model="no/such-model-anywhere").add(step).add("prune", sparsity=0.5)
            with pytest.raises(PlanError, match="put prune before quantize"):
                pipe.validate()
        pipe = Pipeline(model="tiny-random-gpt2").add("prune", sparsity=0.5).add("fakequant")
        pipe.validate()  # prune then quantize is fine


# -- masks on both layer types ------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_magnitude_masks_are_model_facts_shaped_like_the_stored_weight(contexts, model):
    ctx = fresh(contexts, model)
    dense = {n: m.weight.detach().clone() for n, m in weight_modules(ctx.model)}
    head = ctx.model.get_output_embeddings().weight.detach().clone()
    metrics = prune(ctx, method="magnitude", sparsity=0.4)
    masks = ctx.state["masks"]
    assert set(masks) == set(dense)  # lm_head left alone by default
    assert torch.equal(ctx.model.get_output_embeddings().weight, head)
    for name, module in weight_modules(ctx.model):
        keep = masks[name]
        assert keep.dtype == torch.bool and keep.shape == module.weight.shape  # Conv1D: (in, out)
        assert torch.equal(module.weight != 0, keep)
        assert torch.equal(module.weight[keep], dense[name][keep])
        w = dense[name].abs()
        assert w[~keep].max() <= w[keep].min()  # the smallest |w| of the layer went
        assert metrics["layer_sparsity"][name] == pytest.approx(0.4, abs=0.5 / w.numel())
    assert metrics["pruned_sparsity"] == pytest.approx(0.4, abs=1e-4)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "taylor"])
def test_n_m_groups_run_along_the_input_dimension(contexts, model, method):
    ctx = fresh(contexts, model)
    prune(ctx, method=method, pattern="2:4", calib_samples=4, calib_seq_len=32)
    for name, module in weight_modules(ctx.model):
        w = weight_matrix(module)  # (out, in) whatever the layer type
        nonzero = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (nonzero == 2).all(), name


def _reference_wanda_norms(ctx, samples, seq_len):
    """One-shot reference: hooks on every layer during full forwards of the dense model."""
    sums, handles = {}, []
    for name, module in weight_modules(ctx.model):
        def hook(mod, inputs, out, name=name):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
        handles.append(module.register_forward_hook(hook))
    blocks = ctx.calibration_blocks(samples, seq_len)
    with torch.no_grad():
        for i in range(0, len(blocks), 8):
            ctx.model(input_ids=torch.cat(blocks[i:i + 8]), use_cache=False)
    for h in handles:
        h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


@pytest.mark.parametrize("model", MODELS)
def test_wanda_block_by_block_matches_a_one_shot_reference(contexts, model):
    ctx = fresh(contexts, model)
    norms = _reference_wanda_norms(ctx, 12, 48)
    dense = {n: weight_matrix(m).detach().clone() for n, m in weight_modules(ctx.model)}
    metrics = prune(ctx, method="wanda", sparsity=0.5, calib_samples=12, calib_seq_len=48, sequential=False)
    assert metrics["wanda_blockwise"] and metrics["calib_tokens"] == 12 * 48
    for name, module in weight_modules(ctx.model):
        score = dense[name].abs() * norms[name][None, :]
        kept = weight_matrix(module) != 0
        assert (kept.sum(1) == score.shape[1] // 2).all()  # compared within each output row
        ref = keep_rows(score, 0.5)
        assert (kept != ref).float().mean() < 0.002, name  # same choice up to float-order near-ties


def test_sequential_wanda_lets_later_blocks_see_the_pruned_earlier_ones(contexts):
    ctx = fresh(contexts, "tiny-random-llama")
    prune(ctx, method="wanda", sparsity=0.5, calib_samples=8, calib_seq_len=64, sequential=False)
    dense_inputs = {k: v.clone() for k, v in ctx.state["masks"].items()}
    ctx = fresh(contexts, "tiny-random-llama")
    metrics = prune(ctx, method="wanda", sparsity=0.5, calib_samples=8, calib_seq_len=64, sequential=True)
    assert metrics["sequential"] is True
    seq = ctx.state["masks"]
    first = [n for n in seq if n.startswith("model.layers.0.")]
    later = [n for n in seq if n.startswith("model.layers.1.")]
    assert all(torch.equal(seq[n], dense_inputs[n]) for n in first)  # block 0 sees the same inputs
    assert any(not torch.equal(seq[n], dense_inputs[n]) for n in later)


def test_taylor_scores_weight_times_gradient(contexts):
    ctx = fresh(contexts, "tiny-random-gpt2")
    model = ctx.model
    batch = torch.cat(ctx.calibration_blocks(3, 40))  # the step puts up to 8 blocks in one backward
    model.zero_grad()
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    acc = {name: (m.weight.detach() * m.weight.grad).abs() for name, m in weight_modules(model)}
    model.zero_grad()
    for p in model.parameters():
        p.grad = None
    prune(ctx, method="taylor", sparsity=0.5, calib_samples=3, calib_seq_len=40)
    for name, module in weight_modules(model):
        keep = ctx.state["masks"][name]
        ref = keep_layer(acc[name], 0.5)
        assert (keep != ref).float().mean() < 0.002, name
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


@pytest.mark.parametrize("model", MODELS)
def test_global_scope_is_exact_over_all_layers_not_each(contexts, model):
    ctx = fresh(contexts, model)
    metrics = prune(ctx, method="magnitude", sparsity=0.5, scope="global")
    total = sum(m.weight.numel() for _, m in weight_modules(ctx.model))
    zeros = sum(int((m.weight == 0).sum()) for _, m in weight_modules(ctx.model))
    assert zeros == round(0.5 * total)
    assert len(set(metrics["layer_sparsity"].values())) > 1


def test_pruning_twice_merges_the_masks(contexts):
    ctx = fresh(contexts, "tiny-random-gpt2")
    prune(ctx, method="magnitude", sparsity=0.3)
    first = {k: v.clone() for k, v in ctx.state["masks"].items()}
    prune(ctx, method="wanda", sparsity=0.5, calib_samples=4, calib_seq_len=32)
    for name, module in weight_modules(ctx.model):
        keep = ctx.state["masks"][name]
        assert not (keep & ~first[name]).any()  # what the first prune removed stays removed
        assert torch.equal(keep, module.weight != 0)
        assert int((~keep).sum()) == module.weight.numel() // 2


@pytest.mark.parametrize("model, include", [("tiny-random-llama", ["lm_head"]), ("tiny-random-llama",
                                            ["embed_tokens"]), ("tiny-random-gpt2", ["lm_head", "*.mlp.*"])])
def test_head_and_embeddings_only_when_included(contexts, model, include):
    ctx = fresh(contexts, model)
    metrics = prune(ctx, method="magnitude", sparsity=0.5, include=include)
    names = set(metrics["layer_sparsity"])
    modules = dict(ctx.model.named_modules())
    for name in names:
        assert int((modules[name].weight == 0).sum()) == modules[name].weight.numel() // 2
        assert ctx.state["masks"][name].shape == modules[name].weight.shape
    if include == ["embed_tokens"]:
        assert names == {"model.embed_tokens"}
    elif model == "tiny-random-gpt2":  # lm_head is tied to wte: pruned once, as the head
        assert "lm_head" in names and "transformer.wte" not in names
        assert (ctx.model.transformer.wte.weight == 0).float().mean() == 0.5
        assert all(".mlp." in n for n in names - {"lm_head"}) and len(names) == 5
    else:
        assert names == {"lm_head"}


def test_preflight_errors_name_the_problem(contexts):
    ctx = fresh(contexts, "tiny-random-llama")
    with pytest.raises(Exception, match="--include 'nothing_here' matches no linear"):
        PruneStep(sparsity=0.5, include=["nothing_here"]).preflight(ctx)
    with pytest.raises(Exception, match="cannot score embedding"):
        PruneStep(sparsity=0.5, include=["embed_tokens"]).preflight(ctx)
    with pytest.raises(Exception, match="not a multiple of M=256"):
        PruneStep(pattern="2:256").preflight(ctx)
    with pytest.raises(Exception, match="no layer left"):
        PruneStep(sparsity=0.5, exclude=["*"]).preflight(ctx)
    assert ctx.state == {}


# -- through the pipeline, save and reload ------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_save_then_plain_from_pretrained_gives_the_same_zeros(tmp_path, model):
    from transformers import AutoModelForCausalLM

    result = (Pipeline(model=model, seed=1, device="cpu", out=tmp_path / "run", quiet=True)
              .add("prune", method="wanda", pattern="4:8", calib_samples=4, calib_seq_len=32)
              .add("save", to=str(tmp_path / "saved")).run())
    assert "masks" in result.ctx.facts
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    before = dict(weight_modules(result.model))
    for name, module in weight_modules(reloaded):
        assert torch.equal(module.weight == 0, before[name].weight == 0), name
        assert torch.equal(module.weight == 0, ~result.ctx.state["masks"][name])
    record = json.loads((tmp_path / "run" / "run.json").read_text())["steps"][0]
    assert record["metrics"]["pruned_sparsity"] == 0.5 and record["metrics"]["sparsity"] == 0.5
    assert set(record["metrics"]["layer_sparsity"]) == set(before)
    assert record["facts"] == ["masks"]


# -- the CLI, as a user meets it ----------------------------------------------------------------------
def test_cli_prune_reports_per_layer_sparsity(tmp_path):
    proc = run_gptopt("run", "--model", "tiny-random-gpt2", "--out", tmp_path / "o", "-q", "prune", "--method",
                      "magnitude", "--sparsity", "0.25", "--exclude", "*.attn.*", "eval", "--max-tokens", "300",
                      "--block-size", "64")
    assert proc.returncode == 0, proc.stderr
    steps = json.loads((tmp_path / "o" / "run.json").read_text())["steps"]
    layers = steps[0]["metrics"]["layer_sparsity"]
    assert set(layers) == {f"transformer.h.{i}.mlp.{n}" for i in (0, 1) for n in ("c_fc", "c_proj")}
    assert all(v == 0.25 for v in layers.values())


@pytest.mark.parametrize("args, expected", [
    (["prune", "--sparsity", "1"], "sparsity: Input should be less than 1"),
    (["prune", "--pattern", "5:4"], "not a valid N:M pattern"),
    (["prune", "--sparsity", "0.5", "--include", "no_such_layer"], "--include 'no_such_layer' matches no"),
    (["--data", "{short}", "prune", "--method", "taylor", "--sparsity", "0.5"], "needs training text"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, args, expected):
    short = tmp_path / "short.txt"
    short.write_text("A short text.\n" * 3)
    args = [a.format(short=short) for a in args]
    proc = run_gptopt("run", "--model", "tiny-random-llama", "--out", tmp_path / "o", *args, "eval")
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, lines
    assert expected in lines[0]
    assert not (tmp_path / "o").exists()  # refused before the chain started
