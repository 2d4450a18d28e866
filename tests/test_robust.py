"""The robust step: λ·‖∇_W L‖₁ during training (exact double backward, finite difference), its composition
with l1, prune and lora, resume, the three doors and bad input."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import error_lines, run_gptopt

from gptopt_core import Pipeline, hookimpl
from gptopt_core.errors import GptoptError
from gptopt_core.plugins import get_plugins

TRAIN = dict(steps=3, lr=1e-3, batch_size=2, seq_len=32, warmup_steps=0)


def _run(model, *steps, **kw):
    pipe = Pipeline(model=model, data="builtin:pydoc", seed=0, device="cpu", quiet=True, **kw)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def _rec(result, name):
    return next(r for r in result.records if r["name"] == name)


class Mlp(torch.nn.Module):
    """Two linear layers with a smooth non-linearity (its Hessian is not constant), float64."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(5, 7).double()
        self.b = torch.nn.Linear(7, 3).double()

    def loss(self, x, y):
        return ((self.b(torch.tanh(self.a(x))) - y) ** 2).mean()


def _grads(model, total):
    params = [q for q in model.parameters()]
    return torch.cat([g.flatten() for g in torch.autograd.grad(total, params)])


# -- the term itself ----------------------------------------------------------------------------------------
def test_exact_penalty_gradient_matches_the_closed_form():
    """L = ½‖X Wᵀ − Y‖²: ∇_W L = G = RᵀX (R = X Wᵀ − Y), so d‖G‖₁/dW = sign(G)·XᵀX."""
    from gptopt_l1.gradpenalty import exact_term

    torch.manual_seed(1)
    X, Y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = 0.5 * ((X @ W.t() - Y) ** 2).sum()
    term, value = exact_term(loss, [W])
    G = ((X @ W.t() - Y).t() @ X).detach()
    assert value == pytest.approx(float(G.abs().sum()), rel=1e-12)
    term.backward()
    assert torch.allclose(W.grad, torch.sign(G) @ (X.t() @ X), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("r, tol", [(1e-6, 1e-4), (1e-3, 5e-2)])
def test_exact_and_finite_difference_agree(r, tol):
    """The fd form's gradient approaches the exact one as r → 0 (first order: relative error O(r))."""
    from gptopt_l1.gradpenalty import exact_term, fd_term

    torch.manual_seed(2)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    net = Mlp()
    weights = [net.a.weight, net.b.weight]
    exact, value = exact_term(net.loss(x, y), weights)
    ge = _grads(net, exact)
    before = [w.detach().clone() for w in net.parameters()]
    fd, fd_value = fd_term(lambda: net.loss(x, y), net.loss(x, y), weights, list(net.parameters()), r)
    gf = _grads(net, fd)
    assert fd_value == pytest.approx(value, rel=1e-12)  # ‖g‖₁ itself is exact in both modes
    assert float(fd.detach()) == pytest.approx(value, rel=tol)  # (L(W + r·sign g) − L)/r ≈ ‖g‖₁
    assert float((gf - ge).norm() / ge.norm()) < tol
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # the weights are restored bit for bit


def test_zero_gradient_is_safe_in_both_modes():
    """A zero gradient (an input that is always 0, and a loss at its minimum) gives finite gradients, no NaN."""
    from gptopt_l1.gradpenalty import exact_term, fd_term

    X = torch.randn(6, 4, dtype=torch.float64)
    X[:, 2] = 0  # column 2 of the weight's gradient is exactly 0
    W = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    for Y in (torch.randn(6, 3, dtype=torch.float64), (X @ W.t()).detach()):  # the second: G = 0 everywhere
        for mode in ("exact", "fd"):
            def loss():
                return 0.5 * ((X @ W.t() - Y) ** 2).sum()

            term = exact_term(loss(), [W])[0] if mode == "exact" else fd_term(loss, loss(), [W], [W], 1e-4)[0]
            (grad,) = torch.autograd.grad(term, [W])
            assert torch.isfinite(grad).all() and torch.isfinite(term), mode
            assert torch.all(grad[:, 2] == 0) or mode == "fd"


# -- in training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plain_finetune():
    return _run("tiny-random-llama", ("finetune", TRAIN))


@pytest.mark.parametrize("mode", ["exact", "fd"])
def test_finetune_with_the_penalty_trains_differently_and_reports_it(mode, plain_finetune):
    plain = plain_finetune
    res = _run("tiny-random-llama", ("robust", {"weight": 0.05, "mode": mode}), ("finetune", TRAIN))
    m, p = _rec(res, "finetune")["metrics"], _rec(plain, "finetune")["metrics"]
    assert m["robust_mode"] == mode and m["robust_layers"] == _rec(res, "robust")["metrics"]["robust_target_layers"]
    assert m["robust_grad_l1_first"] > 0 and m["robust_history"][-1]["step"] == 3
    # the first step's CE is the same (same weights, same batch); the loss adds λ·‖g‖₁
    assert m["ce_history"][0] == pytest.approx(p["loss_history"][0], abs=1e-5)
    assert m["loss_history"][0] == pytest.approx(m["ce_history"][0] + 0.05 * m["robust_grad_l1_first"], rel=0.05)
    assert m["loss_history"][1:] != p["loss_history"][1:]  # and it changed the training
    # exact trains with eager attention (fused SDPA has no double backward); the model's setting comes back
    assert res.model.config._attn_implementation == plain.model.config._attn_implementation == "sdpa"


def test_composes_with_l1_and_prune_before_and_after():
    res = _run("tiny-random-llama", ("prune", {"method": "magnitude", "sparsity": 0.3}),
               ("robust", {"weight": 0.05}), ("l1", {"weight": 5.0, "mode": "penalty"}),
               ("finetune", TRAIN), ("prune", {"method": "magnitude", "sparsity": 0.5}), ("eval", {"max_tokens": 256, "block_size": 64}))
    m = _rec(res, "finetune")["metrics"]
    assert m["robust_mode"] == "fd" and m["l1_mode_used"] == "penalty"
    assert m["masked_sparsity_kept"]  # the earlier masks held under both penalties
    assert res.records[-1]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.02)


def test_lora_penalises_the_frozen_base_weights_gradient_through_probes():
    """GPT-2 (Conv1D): the base stays bit-identical, the adapters train differently from plain lora."""
    lora = dict(TRAIN, merge=False)

    def adapters(result_model):
        return {n: q.detach().clone() for n, q in result_model.named_parameters() if "lora_" in n}

    pipe = Pipeline(model="tiny-random-gpt2", data="builtin:pydoc", seed=0, device="cpu", quiet=True)
    pipe.add("robust", weight=0.5, mode="exact").add("lora", **lora)
    res = pipe.run()
    plain = Pipeline(model="tiny-random-gpt2", data="builtin:pydoc", seed=0, device="cpu", quiet=True)
    plain.add("lora", **lora)
    base = plain.run()
    m = _rec(res, "lora")["metrics"]
    assert m["robust_layers"] > 0 and m["robust_grad_l1_first"] > 0
    a, b = adapters(res.model), adapters(base.model)
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    frozen = {n: q for n, q in res.model.named_parameters() if "lora_" not in n}
    frozen_plain = dict(base.model.named_parameters())
    assert all(torch.equal(q, frozen_plain[n]) for n, q in frozen.items())
    assert all(q.grad is None for q in frozen.values())
    assert base.records  # ran


class StopAt:
    def __init__(self, n):
        self.n = n

    @hookimpl
    def gptopt_after_optimizer_step(self, ctx, model, step):
        if step == self.n:
            raise KeyboardInterrupt


EV = {"max_tokens": 256, "block_size": 64}


def _resumable(out, resume=False):
    pipe = Pipeline(model="tiny-random-llama", seed=1, device="cpu", out=out, quiet=True, resume=resume)
    return (pipe.add("robust", weight=0.05, mode="fd")
            .add("finetune", steps=6, batch_size=2, seq_len=32, lr=1e-3, checkpoint_every=3).add("eval", **EV))


def test_interrupted_then_resumed_matches_an_uninterrupted_run(tmp_path):
    whole = _resumable(tmp_path / "whole").run()
    plugins = get_plugins()
    plugins.register(StopAt(4), "stop-at-4")
    try:
        with pytest.raises(KeyboardInterrupt):
            _resumable(tmp_path / "cut").run()
    finally:
        plugins.unregister("stop-at-4")
    assert (tmp_path / "cut/checkpoints/step02-finetune/00000003").is_dir()
    resumed = _resumable(tmp_path / "cut", resume=True).run()
    assert resumed.records[2]["metrics"]["perplexity"] == pytest.approx(whole.records[2]["metrics"]["perplexity"],
                                                                        abs=1e-4)
    assert resumed.records[1]["metrics"]["loss_history"] == whole.records[1]["metrics"]["loss_history"]


# -- the three doors and bad input ------------------------------------------------------------------------------
def test_cli_recipe_and_python_build_the_same_step(tmp_path):
    chain = {"weight": 0.01, "mode": "exact", "schedule": "linear-warmup", "warmup_fraction": 0.25,
             "targets": ["*mlp*"]}
    ft = {"steps": 1, "batch_size": 1, "seq_len": 16}
    cli = run_gptopt("run", "--model", "tiny-random-llama", "--out", tmp_path / "cli", "--quiet", "robust",
                     "--weight", "0.01", "--mode", "exact", "--schedule", "linear-warmup", "--warmup-fraction", "25%",
                     "--targets", "*mlp*", "finetune", "--steps", "1", "--batch-size", "1", "--seq-len", "16")
    assert cli.returncode == 0, cli.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tiny-random-llama", "steps": [{"robust": chain}, {"finetune": ft}]}))
    rec = run_gptopt("run", "--recipe", recipe, "--out", tmp_path / "rec", "--quiet")
    assert rec.returncode == 0, rec.stderr
    Pipeline(model="tiny-random-llama", out=tmp_path / "py", quiet=True).add("robust", **chain).add(
        "finetune", **ft).run()
    runs = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("cli", "rec", "py")]
    assert runs[0]["recipe"] == runs[1]["recipe"] == runs[2]["recipe"]
    ms = [r["steps"][1]["metrics"] for r in runs]
    assert ms[0]["robust_layers"] == 2 * 3  # 2 layers × gate/up/down
    assert ms[0]["loss_history"] == ms[1]["loss_history"] == ms[2]["loss_history"]


@pytest.mark.parametrize("args, expect", [
    (["robust", "--weight", "-1", "finetune"], "weight"),
    (["robust", "--weight", "1", "--mode", "sam", "finetune"], "mode"),
    (["robust", "--weight", "1", "--fd-step", "0", "finetune"], "fd_step"),
    (["robust", "--weight", "1", "eval"], "put a training step after it"),
    (["robust", "--weight", "1", "finetune", "--gradient-checkpointing"], "--gradient-checkpointing"),
    (["quantize", "--bits", "4", "robust", "--weight", "1", "lora"], "bitsandbytes 4-bit"),
])
def test_cli_bad_input_one_line_exit_2_before_the_model_loads(tmp_path, args, expect):
    proc = run_gptopt("run", "--model", str(tmp_path / "no-such-model"), "--out", tmp_path / "out", *args)
    assert proc.returncode == 2, proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and expect in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()


def test_targets_matching_nothing_fail_before_any_step_runs():
    with pytest.raises(GptoptError, match=r"robust: --targets '\*q_proj\*' matches no linear.*c_attn"):
        _run("tiny-random-gpt2", ("eval", {"max_tokens": 128, "block_size": 64}),
             ("robust", {"weight": 1, "targets": ["*q_proj*"]}), ("finetune", TRAIN))
