"""The l1 step: proximal zeros, the penalty's gradient, prunable selection, LoRA effective weights, bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gptopt_core import Pipeline, PlanError
from gptopt_core.errors import ParamsError, GptoptError

TRAIN = dict(steps=3, lr=1e-3, batch_size=2, seq_len=32, warmup_steps=0)


def _run(model, *steps):
    pipe = Pipeline(model=model, data="builtin:pydoc", seed=0, device="cpu", quiet=True)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def _rec(result, name):
    return next(r for r in result.records if r["name"] == name)


def _target_weights(model):
    from gptopt_core.kit.modules import weight_modules

    return [m.weight for _, m in weight_modules(model)]


# -- building blocks --------------------------------------------------------------------------------------
def test_soft_threshold_and_selection_rules():
    from gptopt_l1.regularizer import select_lowest, soft_threshold_

    w = torch.tensor([[0.5, -0.05, 0.02], [-0.3, 0.1, -0.01]])
    sel = torch.tensor([[False, True, True], [False, True, True]])
    soft_threshold_(w, 0.04, sel)
    assert torch.allclose(w, torch.tensor([[0.5, -0.01, 0.0], [-0.3, 0.06, 0.0]]))
    score = torch.tensor([[4.0, 1.0, 3.0, 2.0], [0.5, 8.0, 7.0, 6.0]])
    assert select_lowest(score, 0.5, "layer").tolist() == [[False, True, True, True], [True, False, False, False]]
    assert select_lowest(score, 0.5, "row").tolist() == [[False, True, False, True], [True, False, False, True]]
    assert select_lowest(score, 0.5, "nm:2:4").tolist() == [[False, True, False, True], [True, False, False, True]]
    assert int(select_lowest(torch.rand(8, 16), 0.25, "layer").sum()) == 32


def test_penalty_gradient_matches_autograd_plain_layer():
    from gptopt_l1.regularizer import Layer, l1_sum

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    sel = torch.rand(5, 6) < 0.5
    layer = Layer("lin", lin, lora=False, conv1d=False, sel=sel)
    lam = 0.7
    (lam * l1_sum([layer])).backward()
    expected = lam * torch.sign(lin.weight.detach()) * sel
    assert torch.allclose(lin.weight.grad, expected)
    assert lin.bias.grad is None  # only weights are regularized
    # the value: λ·Σ_selected |w|
    assert torch.isclose(lam * l1_sum([layer]), lam * lin.weight.detach().abs()[sel].sum())


@pytest.mark.parametrize("conv1d", [False, True])
def test_penalty_on_lora_effective_weight(conv1d):
    """Under LoRA the term is λ·Σ|W + s·BA|: its value, its orientation (Conv1D) and its gradient on A and B."""
    import peft
    from transformers.pytorch_utils import Conv1D

    from gptopt_l1.regularizer import Layer, l1_sum

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Conv1D(5, 6) if conv1d else torch.nn.Linear(6, 5)  # in 6, out 5

        def forward(self, x):
            return self.proj(x)

    net = Net()
    with torch.no_grad():
        net.proj.weight.normal_(0, 0.1)
    model = peft.get_peft_model(net, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"],
                                                     fan_in_fan_out=conv1d, lora_dropout=0.0))
    module = model.base_model.model.proj
    with torch.no_grad():
        module.lora_B["default"].weight.normal_(0, 0.3)
    layer = Layer("proj", module, lora=True, conv1d=conv1d)
    assert layer.trainable()
    x = torch.randn(3, 6)
    w_eff = layer.effective().detach()
    out = x @ w_eff + module.base_layer.bias if conv1d else x @ w_eff.t() + module.base_layer.bias
    assert torch.allclose(model(x), out, atol=1e-6)  # the effective weight is the one the layer computes with

    sel = torch.rand(w_eff.shape) < 0.6
    layer.sel = sel
    lam = 1.3
    (lam * l1_sum([layer])).backward()
    A, B = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
    s = module.scaling["default"]
    g = lam * torch.sign(w_eff) * sel  # dL/dW_eff, stored orientation
    g_view = g.t() if conv1d else g  # (out, in)
    assert torch.allclose(B.grad, s * g_view @ A.detach().t(), atol=1e-5)
    assert torch.allclose(A.grad, s * B.detach().t() @ g_view, atol=1e-5)
    assert module.base_layer.weight.grad is None  # the frozen base gets nothing


# -- during training --------------------------------------------------------------------------------------
def test_proximal_makes_exact_zeros_and_reports_them():
    res = _run("tiny-random-llama", ("l1", {"weight": 20.0, "select": "all"}), ("finetune", TRAIN))
    m = _rec(res, "finetune")["metrics"]
    weights = _target_weights(res.model)
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros > 0.05
    assert m["l1_zero_fraction"] == pytest.approx(zeros, abs=1e-6)
    assert m["l1_small_fraction"] >= m["l1_zero_fraction"]
    assert m["l1_mode_used"] == "proximal"
    assert m["l1_history"][-1]["step"] == 3
    # control: the same finetune without l1 makes no zeros
    ctl = _run("tiny-random-llama", ("finetune", TRAIN))
    assert sum(int((w == 0).sum()) for w in _target_weights(ctl.model)) == 0
    assert "l1_zero_fraction" not in _rec(ctl, "finetune")["metrics"]


def test_prunable_selection_makes_the_later_prune_free_and_keeps_earlier_masks():
    """prune 30% → l1 (prunable, strong) → finetune → prune 50%: the selected half reaches zero during training,
    so the prune removes nothing that is not already zero; the earlier mask stays zero throughout."""
    res = _run("tiny-random-gpt2", ("prune", {"method": "magnitude", "sparsity": 0.3}),
               ("l1", {"weight": 200.0}),
               ("finetune", {**TRAIN, "eval_every": 3, "eval_tokens": 64}),
               ("eval", {"block_size": 64, "max_tokens": 256}),
               ("prune", {"method": "magnitude", "sparsity": 0.5}),
               ("eval", {"block_size": 64, "max_tokens": 256}))
    l1 = _rec(res, "l1")["metrics"]
    assert l1["l1_select"] == "prunable" and l1["l1_sparsity_target"] == 0.5
    ft = _rec(res, "finetune")["metrics"]
    assert ft["l1_selected_zero_fraction"] == 1.0
    assert ft["l1_zero_fraction"] == pytest.approx(0.5, abs=0.01)
    assert ft["masked_sparsity_kept"] is True
    assert ft["eval_history"][-1]["l1_zero_fraction"] == ft["l1_zero_fraction"]  # per eval point, in run.json
    evals = [r["metrics"]["perplexity"] for r in res.records if r["name"] == "eval"]
    assert evals[0] == pytest.approx(evals[1], rel=1e-5)  # the prune changed nothing
    assert [r for r in res.records if r["name"] == "prune"][-1]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_penalty_mode_adds_lambda_sum_abs_to_the_loss():
    lam = 1e-3
    res = _run("tiny-random-llama", ("l1", {"weight": lam, "mode": "penalty", "select": "all"}),
               ("finetune", {**TRAIN, "steps": 1}))
    m = _rec(res, "finetune")["metrics"]
    from gptopt_core.kit.models import tiny_model

    fresh = tiny_model("tiny-random-llama")[0]
    expected = lam * sum(float(w.abs().sum()) for w in _target_weights(fresh))
    assert m["loss_history"][0] - m["ce_history"][0] == pytest.approx(expected, rel=1e-3)
    assert m["l1_mode_used"] == "penalty"


def test_lora_uses_the_penalty_on_effective_weights():
    res = _run("tiny-random-gpt2", ("l1", {"weight": 1e-3, "targets": ["*mlp*"]}),
               ("lora", {**TRAIN, "steps": 2, "merge": True}))
    m = _rec(res, "lora")["metrics"]
    assert m["l1_mode_used"] == "penalty"  # proximal is impossible on a frozen base: documented fallback
    assert m["l1_layers_regularized"] == 4  # c_fc and c_proj of the 2 blocks' MLPs
    assert all(a > b for a, b in zip(m["loss_history"], m["ce_history"]))


def test_l1_acts_on_the_next_training_step_only():
    res = _run("tiny-random-llama", ("l1", {"weight": 20.0, "select": "all"}), ("finetune", {**TRAIN, "steps": 1}),
               ("finetune", {**TRAIN, "steps": 1}))
    first, second = [r["metrics"] for r in res.records if r["name"] == "finetune"]
    assert "l1_zero_fraction" in first and "l1_zero_fraction" not in second
    assert "l1" not in res.ctx.state and "l1_runtime" not in res.ctx.state


# -- bad input ---------------------------------------------------------------------------------------------
def test_plan_errors_in_python():
    with pytest.raises(ParamsError, match="weight"):
        Pipeline(model="tiny-random-gpt2").add("l1", weight=-1.0)
    with pytest.raises(PlanError, match="training step after it"):
        Pipeline(model="tiny-random-gpt2").add("l1", weight=1.0).add("eval").validate()
    with pytest.raises(PlanError, match="--sparsity"):
        Pipeline(model="tiny-random-gpt2").add("l1", weight=1.0, select="prunable").add("finetune").validate()
    with pytest.raises(GptoptError, match="matches no linear"):
        _run("tiny-random-gpt2", ("l1", {"weight": 1.0, "targets": ["*nothing*"]}), ("finetune", TRAIN))


def _cli(*args, tmp_path):
    from pathlib import Path

    exe = Path(sys.executable).parent / "gptopt"
    return subprocess.run([str(exe), *args], capture_output=True, text=True,
                          cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize("args, expect", [
    (["l1", "--weight", "-2", "finetune"], "weight"),
    (["l1", "--weight", "2", "eval"], "put a training step after it"),
    (["l1", "--weight", "2", "--mode", "lasso", "finetune"], "mode"),
])
def test_cli_bad_input_one_line_exit_2_before_the_model_loads(tmp_path, args, expect):
    # a model that does not exist: had it been loaded first, the error would be about the model
    proc = _cli("run", "--model", str(tmp_path / "no-such-model"), "--out", "out", *args, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert "no-such-model" not in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_targets_matching_nothing_fails_before_any_step_runs(tmp_path):
    proc = _cli("run", "--model", "tiny-random-gpt2", "--out", "out", "l1", "--weight", "2", "--targets", "*q_proj*",
                "finetune", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "--targets '*q_proj*' matches no linear" in lines[0], proc.stderr
    assert "c_attn" in lines[0]  # says what the layers are called
    assert not (tmp_path / "out" / "run.json").exists() or json.loads(
        (tmp_path / "out" / "run.json").read_text())["steps"] == []
