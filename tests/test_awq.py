"""quantize --awq: activation-aware scales searched on calibration text and folded into the op before.

Folding is exact before quantization on every family AWQ knows (random scales; the folded float model's logits equal
the original's), the search never ends above round-to-nearest and beats it where input channels carry outliers, and
``--awq`` works with rtn, gptq and signround from every door; bitsandbytes refuses it in one line."""
import pytest
import torch

from gptopt_core import GptoptError, architecture_table, find_blocks, make_context, weight_matrix, weight_modules
from gptopt_core.kit.models import tiny_model
from gptopt_quantize.awq_fold import FAMILY_PAIRS, family_pairs, fold_scales, source_rows
from gptopt_quantize.step import QuantizeStep

FAMILIES = [f"tiny-random-{a.name}" for a in architecture_table().values() if a.model_type in FAMILY_PAIRS]
CALIB = dict(calib_blocks=8, calib_seq_len=32)


def _logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _random_scales(model, pairs, seed=0):
    """``[(block, pair, scales, rows)]``: a random scale in [0.5, 2] per ``prev`` row (channels sharing a row share
    it), for every pair of every block."""
    gen = torch.Generator().manual_seed(seed)
    _, blocks = find_blocks(model)
    out = []
    for block in blocks:
        for pair in pairs:
            width = weight_matrix(block.get_submodule(pair.layers[0])).shape[1]
            rows = source_rows(pair, model.config, width, "cpu")
            per_row = 2 ** (torch.rand(int(rows.max()) + 1, generator=gen) * 2 - 1)
            out.append((block, pair, per_row[rows], rows))
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_folded_scales_leave_the_float_model_unchanged(name):
    model, _ = tiny_model(name)
    arch, pairs = family_pairs(model)
    before = _logits(model)
    layers = {n: weight_matrix(m).detach().clone() for n, m in weight_modules(model)}
    plan = _random_scales(model, pairs)
    for block, pair, s, rows in plan:
        fold_scales(block, pair, s, rows, arch.norm)
    after = _logits(model)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max())), \
        float((after - before).abs().max())
    # the scales are really there: each scaled layer's weight is its columns times the product of its scales
    names = {id(m): n for n, m in model.named_modules()}
    expect = {n: w.clone() for n, w in layers.items()}
    for block, pair, s, rows in plan:
        for rel in pair.layers:
            expect[names[id(block.get_submodule(rel))]] *= s[None, :]
        prev = block.get_submodule(pair.prev)
        if names[id(prev)] in expect:
            expect[names[id(prev)]][rows] /= s[:, None]
    for n, m in weight_modules(model):
        assert torch.allclose(weight_matrix(m), expect[n], rtol=1e-5, atol=1e-7), n
    # and an unfolded copy (layers scaled, the op before left as it was) is far off: the tolerance can fail
    model2, _ = tiny_model(name)
    blocks2 = find_blocks(model2)[1]
    for block, pair, s, rows in plan:
        block2 = blocks2[list(find_blocks(model)[1]).index(block)]
        for rel in pair.layers:
            weight_matrix(block2.get_submodule(rel)).data.mul_(s[None, :])
    assert not torch.allclose(_logits(model2), before, rtol=1e-2, atol=1e-2 * float(before.abs().max()))


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-phi3"])
def test_searched_scales_fold_exactly_through_the_engine(name):
    """The whole search on the calibration engine, no rounding after it: logits unchanged, scales not all 1."""
    from gptopt_quantize.awq import awq_scale
    from gptopt_quantize.grid import targets

    ctx = make_context(name)
    before = _logits(ctx.model)
    w0 = {n: weight_matrix(m).detach().clone() for n, m in weight_modules(ctx.model)}
    step = QuantizeStep(method="rtn", bits=4, group_size=16, awq=True, **CALIB)
    got = awq_scale(ctx, step.params, targets(ctx.model, step.params), (4, 16, True, "minmax"), (8, 32))
    after = _logits(ctx.model)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))
    assert got["error"] <= got["error_rtn"] and got["pairs"] and not got["skipped"]
    assert any(v["alpha"] > 0 for v in got["pairs"].values())
    assert any(not torch.equal(weight_matrix(m), w0[n]) for n, m in weight_modules(ctx.model))


def _plant_outliers(model, factor=30.0, channels=(3, 17, 40)):
    """Equivalent model whose norms put a few input channels of q/k/v and gate/up far above the rest (norm weight
    times ``factor``, the layers' columns divided by it): the activation outliers AWQ is for."""
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for norm, layers in (("input_layernorm", ("q_proj", "k_proj", "v_proj")),
                                 ("post_attention_layernorm", ("gate_proj", "up_proj"))):
                block.get_submodule(norm).weight[list(channels)] *= factor
                parent = block.self_attn if "q_proj" in layers else block.mlp
                for rel in layers:
                    getattr(parent, rel).weight[:, list(channels)] /= factor


def test_awq_lowers_the_rounding_error_where_inputs_have_outlier_channels():
    """RTN int4 g32 with and without AWQ on a tiny Llama with planted outlier input channels: AWQ's logits are
    closer to the float model's on the calibration text, and the search reports the lower layer error."""
    errors, reported = {}, None
    for awq in (False, True):
        ctx = make_context("tiny-random-llama")
        _plant_outliers(ctx.model)
        ids = torch.cat(ctx.calibration_blocks(8, 32))
        with torch.no_grad():
            ref = ctx.model(input_ids=ids).logits
        extra = dict(awq=True, **CALIB) if awq else {}
        metrics = QuantizeStep(method="rtn", bits=4, group_size=32, **extra).apply(ctx)
        with torch.no_grad():
            errors[awq] = float(((ctx.model(input_ids=ids).logits - ref) ** 2).mean())
        if awq:
            reported = metrics["awq"]
    assert errors[True] < 0.7 * errors[False], errors
    assert reported["error"] < 0.7 * reported["error_rtn"], reported
    assert reported["pairs_improved"] >= 4 and reported["calib_tokens"] == 256


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("signround", {"iters": 2})])
def test_awq_runs_before_every_grid_method(method, extra):
    from gptopt_core import on_grid

    ctx = make_context("tiny-random-qwen2")
    step = QuantizeStep(method=method, bits=4, group_size=32, awq=True, **CALIB, **extra)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    assert metrics["awq"]["grid_points"] == 20 and len(metrics["awq"]["pairs"]) == 8
    assert all(on_grid(m) for _, m in weight_modules(ctx.model))


def test_awq_options_are_checked():
    from gptopt_core import ParamsError

    for bad, msg in ((dict(method="bnb", bits=4, awq=True), "--awq applies to --method rtn/gptq/signround, not "
                                                             "bitsandbytes"),
                     (dict(method="rtn", bits=8, awq=True, activations=8), "--awq searches weight-only scales"),
                     (dict(method="rtn", bits=4, calib_blocks=8), "unless with --awq")):
        with pytest.raises(ParamsError, match=msg):
            QuantizeStep.validate(bad)
    assert QuantizeStep(method="rtn", bits=4, awq=True).params.calibration() == (64, 128)
    assert QuantizeStep(method="rtn", bits=4, awq=True, calib_blocks=8).params.calibration() == (8, 128)


def test_a_family_without_fold_pairs_is_refused_in_one_line(monkeypatch):
    import gptopt_quantize.awq_fold as fold

    ctx = make_context("tiny-random-gpt2")
    monkeypatch.delitem(fold.FAMILY_PAIRS, "gpt2")
    with pytest.raises(GptoptError, match="no scale/fold pairs are known for architecture 'gpt2'") as info:
        QuantizeStep(method="rtn", bits=4, group_size=32, awq=True).preflight(ctx)
    assert "\n" not in str(info.value)


def test_awq_from_the_command_line_and_its_recipe(cli, tmp_path):
    """CLI run -> run.json carries --awq and its metrics; the recorded recipe replays to the same alphas (Python);
    with bitsandbytes the CLI refuses --awq in one line, exit 2."""
    import json

    from conftest import error_lines

    from gptopt_core import Pipeline

    out = tmp_path / "run"
    got = cli("run", "--model", "tiny-random-llama", "--out", out, "quantize", "--method", "rtn", "--bits", "4",
              "--group-size", "32", "--awq", "--calib-blocks", "8", "--calib-seq-len", "32")
    assert got.returncode == 0, got.stderr
    step = json.loads((out / "run.json").read_text())["steps"][0]
    assert step["params"]["awq"] is True and len(step["metrics"]["awq"]["pairs"]) == 8
    replay = Pipeline.from_recipe(out / "run.json", quiet=True).run()
    alphas = {k: v["alpha"] for k, v in replay.records[0]["metrics"]["awq"]["pairs"].items()}
    assert alphas == {k: v["alpha"] for k, v in step["metrics"]["awq"]["pairs"].items()}
    bad = cli("run", "--model", "tiny-random-llama", "quantize", "--bits", "4", "--awq")
    assert bad.returncode == 2 and len(error_lines(bad.stderr)) == 1 and "--awq applies to --method" in bad.stderr


def test_clip_search_lowers_the_layer_error_and_leaves_q_k_alone():
    """--awq-clip: the clipped layers' rounding error never rises and falls somewhere; q/k are left as --awq
    alone leaves them; without --awq it is refused."""
    from gptopt_core import ParamsError
    from gptopt_quantize.awq import awq_scale
    from gptopt_quantize.grid import targets

    weights = {}
    for clip in (False, True):
        ctx = make_context("tiny-random-llama")
        _plant_outliers(ctx.model)
        step = QuantizeStep(method="rtn", bits=4, group_size=32, awq=True, awq_clip=clip or None, **CALIB)
        got = awq_scale(ctx, step.params, targets(ctx.model, step.params), (4, 32, True, "minmax"), (8, 32))
        weights[clip] = {n: weight_matrix(m).detach().clone() for n, m in weight_modules(ctx.model)}
    layers = got["clip"]["layers"]
    assert len(layers) == 2 * 5 and not any(n.endswith(("q_proj", "k_proj")) for n in layers)
    assert all(v["error"] <= v["error_rtn"] for v in layers.values())
    assert got["clip"]["error"] < 0.99 * got["clip"]["error_rtn"], got["clip"]
    for name, w in weights[True].items():  # block 0 (the later blocks calibrate on the clipped ones' outputs)
        if ".layers.0." in name:
            assert torch.equal(w, weights[False][name]) == (name not in layers), name
    with pytest.raises(ParamsError, match="add --awq or drop --awq-clip"):
        QuantizeStep.validate(dict(method="rtn", bits=4, awq_clip=True))
