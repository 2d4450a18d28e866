"""prune-experts (REAP) on tiny mixture-of-experts models built here (tests/moe_models.py): scores against an
independent computation, the dropped experts are the lowest, the pruned layer computes what the family's routing
over the kept experts computes, save → plain transformers reload at the same logits, and the one-line refusals."""
import pytest
import torch
from conftest import error_lines, run_gptopt
from moe_models import save_tiny_moe

from gptopt_core import GptoptError, ParamsError, Pipeline, calibration_batches
from gptopt_core.kit.testing import make_context
from gptopt_prune import PruneExpertsStep

CALIB = {"calib_samples": 4, "calib_seq_len": 64}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save_tiny_moe(root / f, f) for f in ("mixtral", "qwen3_moe", "olmoe")}


def expert_out(experts, j, x):
    """Expert j's output from the fused weights, written out (gate/up halves of gate_up_proj, SiLU, down)."""
    gate, up = (x @ experts.gate_up_proj[j].t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ experts.down_proj[j].t()


def route(gate_weight, x, top_k, renorm):
    probs = torch.softmax(x @ gate_weight.t(), dim=-1, dtype=torch.float)
    w, idx = probs.topk(top_k, dim=-1)
    return (w / w.sum(-1, keepdim=True) if renorm else w), idx


def independent_scores(model, batches, renorm):
    """REAP scores from the MoE blocks' inputs, with routing and experts recomputed from the weights."""
    inputs, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.register_forward_hook(
            lambda m, a, o, i=i: inputs.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]))))
    with torch.no_grad():
        for b in batches:
            model(input_ids=b, use_cache=False)
        for h in handles:
            h.remove()
        out = {}
        for i, layer in enumerate(model.model.layers):
            x = torch.cat(inputs[i])
            moe = layer.mlp
            w, idx = route(moe.gate.weight, x, moe.gate.top_k, renorm)
            scores = []
            for j in range(moe.gate.weight.shape[0]):
                rows, slot = torch.where(idx == j)
                norms = expert_out(moe.experts, j, x[rows]).norm(dim=-1)
                scores.append(float((w[rows, slot] * norms).mean()) if rows.numel() else 0.0)
            out[i] = scores
    return out


def test_prune_experts_halves_a_tiny_mixtral_dropping_the_lowest_reap_scores(moe_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    ctx = make_context(model=str(moe_dirs["mixtral"]))
    model = ctx.model
    original = {k: v.clone() for k, v in model.state_dict().items()}
    expected = independent_scores(model, calibration_batches(ctx, CALIB["calib_samples"], CALIB["calib_seq_len"]),
                                  renorm=True)
    step = PruneExpertsStep(keep_fraction=0.5, **CALIB)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    assert metrics["experts_before"] == 8 and metrics["experts_after"] == 4 and model.config.num_local_experts == 4
    for i in range(2):
        got = metrics["layers"][f"model.layers.{i}.mlp"]
        assert got["scores"] == pytest.approx(expected[i], rel=1e-4, abs=1e-7)
        low = sorted(range(8), key=lambda j: expected[i][j])[:4]
        assert got["dropped"] == sorted(low) and got["kept"] == sorted(set(range(8)) - set(low))
        assert sum(got["tokens"]) == 2 * CALIB["calib_samples"] * CALIB["calib_seq_len"]  # top-2 of every token
        kept = torch.tensor(got["kept"])
        pre = f"model.layers.{i}.mlp."
        for name in ("gate.weight", "experts.gate_up_proj", "experts.down_proj"):
            assert torch.equal(model.state_dict()[pre + name], original[pre + name][kept])
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = model(ids).logits
    ctx.plugins.step_class("save")(to=str(tmp_path / "pruned")).apply(ctx)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned")).eval()
    assert reloaded.config.num_local_experts == 4
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, mine)


@pytest.mark.parametrize("family,renorm", [("mixtral", True), ("qwen3_moe", True), ("olmoe", False)])
def test_pruned_layer_routes_over_the_kept_experts_as_the_family_does(moe_dirs, family, renorm):
    ctx = make_context(model=str(moe_dirs[family]))
    moe = ctx.model.model.layers[1].mlp
    gate0, gu0, down0 = (moe.gate.weight.clone(), moe.experts.gate_up_proj.clone(),
                         moe.experts.down_proj.clone())
    metrics = PruneExpertsStep(keep=3, mode="drop", **CALIB).apply(ctx)
    kept = metrics["layers"]["model.layers.1.mlp"]["kept"]
    assert ("renormalized to sum 1" in metrics["routing"]) == renorm
    x = torch.randn(200, 64, generator=torch.Generator().manual_seed(2))
    w, idx = route(gate0[kept], x, 2, renorm)
    want = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(2):
            j = kept[int(idx[t, k])]
            gate, up = (x[t] @ gu0[j].t()).chunk(2)
            want[t] += w[t, k] * ((torch.nn.functional.silu(gate) * up) @ down0[j].t())
    with torch.no_grad():
        got = moe(x[None])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_merge_folds_each_dropped_expert_into_its_most_similar_kept_one_by_routed_mass(moe_dirs):
    ctx = make_context(model=str(moe_dirs["olmoe"]))
    experts = ctx.model.model.layers[0].mlp.experts
    gu0, down0 = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    metrics = PruneExpertsStep(keep=4, mode="merge", **CALIB).apply(ctx)
    got = metrics["layers"]["model.layers.0.mlp"]
    kept, mass = got["kept"], torch.tensor(got["routed_mass"], dtype=torch.float64)
    into = {int(d): k for d, k in got["merged_into"].items()}
    assert sorted(into) == got["dropped"]
    flat = torch.nn.functional.normalize(torch.cat([gu0.reshape(8, -1), down0.reshape(8, -1)], 1), dim=1)
    for d, k in into.items():
        assert k == kept[int((flat[kept] @ flat[d]).argmax())]
    for pos, k in enumerate(kept):
        members = [k] + [d for d, t in into.items() if t == k]
        w = (mass[members] / mass[members].sum()).float()
        torch.testing.assert_close(experts.gate_up_proj[pos], (gu0[members] * w[:, None, None]).sum(0))
        torch.testing.assert_close(experts.down_proj[pos], (down0[members] * w[:, None, None]).sum(0))


def test_prune_experts_refuses_in_one_line(moe_dirs):
    ctx = make_context(model=str(moe_dirs["mixtral"]))
    with pytest.raises(GptoptError, match=r"fewer experts than the router picks per token \(top-k 2\)"):
        PruneExpertsStep(keep=1, **CALIB).preflight(ctx)
    with pytest.raises(GptoptError, match=r"more experts than the layers hold \(8\)"):
        PruneExpertsStep(keep=9, **CALIB).preflight(ctx)
    with pytest.raises(ParamsError, match="exactly one of --keep"):
        Pipeline(model="tiny-random-llama").add("prune-experts", keep=4, keep_fraction=0.5)
    dense = make_context(model="tiny-random-llama")
    with pytest.raises(GptoptError, match="has no mixture-of-experts layers"):
        PruneExpertsStep(keep=4).preflight(dense)


def test_prune_experts_cli_refusals_exit_2(moe_dirs, tmp_path):
    r = run_gptopt("run", "--model", str(moe_dirs["mixtral"]), "--out", str(tmp_path / "run"),
                   "prune-experts", "--keep-fraction", "10%", "save", "--to", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = [line for line in error_lines(r.stderr) if not line.startswith("Loading weights")]  # transformers' bar
    assert len(lines) == 1 and "--keep-fraction 0.1 (1 of 8) is fewer experts than the router picks" in lines[0]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
