"""The core training loop (gptopt_core.kit.training) on the tiny models: data order, accumulation, schedule, masks,
hooks, checkpoint state."""
import math

import pytest
import torch

from gptopt_core import ParamsError, hookimpl
from gptopt_core.kit.testing import make_context, register_plugin
from gptopt_core.kit.training import TrainParams, Trainer, train

FAST = dict(seq_len=32, batch_size=2, lr=1e-3)


@pytest.fixture(scope="module")
def llama_ctx():
    return make_context(model="tiny-random-llama")


def fresh(ctx, name="tiny-random-llama"):
    from gptopt_core.kit.models import tiny_model

    ctx.model = tiny_model(name)[0]
    ctx.state.clear()
    return ctx.model


def test_block_order_is_sharded_identically_across_process_counts(llama_ctx):
    one = Trainer(llama_ctx, None, TrainParams(steps=3, batch_size=4, seq_len=32))
    one.n_blocks = 50
    two = Trainer(llama_ctx, None, TrainParams(steps=3, batch_size=2, seq_len=32))
    two.n_blocks = 50
    two.accelerator = type("A", (), {"num_processes": 2, "process_index": 0})()
    for step in range(30):  # crosses epochs: every block once per epoch
        assert one.block_indices(step, 0) == two.block_indices(step, 0, 0) + two.block_indices(step, 0, 1)
    epoch0 = [i for s in range(13) for i in one.block_indices(s, 0)][:50]
    assert sorted(epoch0) == list(range(50))


def test_grad_accumulation_matches_bigger_batch(llama_ctx):
    _, a = train(llama_ctx, fresh(llama_ctx), TrainParams(steps=3, batch_size=4, grad_accum=1, seq_len=32, lr=1e-3))
    _, b = train(llama_ctx, fresh(llama_ctx), TrainParams(steps=3, batch_size=2, grad_accum=2, seq_len=32, lr=1e-3))
    assert a["global_batch_blocks"] == b["global_batch_blocks"] == 4
    assert a["loss_history"] == pytest.approx(b["loss_history"], abs=1e-4)
    assert a["loss_history"][-1] < a["loss_history"][0]


def test_warmup_cosine_schedule_and_epochs(llama_ctx):
    t = Trainer(llama_ctx, fresh(llama_ctx), TrainParams(steps=10, warmup_steps=2, **FAST))
    t.setup()
    lrs = []
    for _ in range(10):
        lrs.append(t.optimizer.param_groups[0]["lr"])
        t.scheduler.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1e-3)
    assert all(x >= y for x, y in zip(lrs[2:], lrs[3:])) and lrs[-1] < 1e-4
    t.finish()
    e = Trainer(llama_ctx, fresh(llama_ctx), TrainParams(epochs=0.5, **FAST))
    e.setup()
    assert e.total_steps == math.ceil(0.5 * e.n_blocks / 2)
    e.finish()


def test_masks_stay_zero_through_full_training(llama_ctx):
    model = fresh(llama_ctx)
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "layers" in name:
            keep = torch.rand_like(module.weight) > 0.5
            module.weight.data.mul_(keep)
            masks[name] = keep
    llama_ctx.state["masks"] = masks
    model.requires_grad_(True)
    model, m = train(llama_ctx, model, TrainParams(steps=3, weight_decay=0.1, **FAST))
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        w = modules[name].weight
        assert (w[~keep] == 0).all() and (w[keep] != 0).float().mean() > 0.99


def test_hooks_extra_loss_and_after_step_are_called(llama_ctx):
    seen = {"loss": 0, "steps": []}

    class Plugin:
        @hookimpl
        def gptopt_training_loss(self, ctx, model, batch, outputs):
            seen["loss"] += 1
            assert batch["input_ids"].shape == (2, 32) and outputs.logits.shape[:2] == (2, 32)
            return torch.tensor(1.5)

        @hookimpl
        def gptopt_after_optimizer_step(self, ctx, model, step):
            assert ctx.state["trainer"].step == step
            seen["steps"].append(step)

    with register_plugin(Plugin(), "test-training-hooks"):
        _, m = train(llama_ctx, fresh(llama_ctx), TrainParams(steps=2, grad_accum=2, **FAST))
    assert seen == {"loss": 4, "steps": [1, 2]}
    assert m["loss_history"][0] == pytest.approx(m["ce_history"][0] + 1.5, abs=1e-5)
    assert "trainer" not in llama_ctx.state


def test_checkpoint_state_resumes_exactly(llama_ctx):
    params = TrainParams(steps=4, **FAST)
    straight, ms = train(llama_ctx, fresh(llama_ctx), params)
    first = Trainer(llama_ctx, fresh(llama_ctx), params)
    first.setup()
    for _ in range(2):
        first.train_step()
    state = first.state_dict()
    weights = {k: v.clone() for k, v in first.model.state_dict().items()}
    first.finish()
    model = fresh(llama_ctx)
    model.load_state_dict(weights)
    resumed = Trainer(llama_ctx, model, params)
    resumed.load_state_dict(state)
    mr = resumed.run()
    assert mr["loss_history"] == pytest.approx(ms["loss_history"], abs=1e-5)
    for (k, a), b in zip(straight.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k


def test_eval_every_gradient_checkpointing_bf16(llama_ctx):
    model, m = train(llama_ctx, fresh(llama_ctx), TrainParams(steps=2, eval_every=1, eval_tokens=200,
                                                              gradient_checkpointing=True, precision="bf16", **FAST))
    assert [e["step"] for e in m["eval_history"]] == [1, 2] and m["precision"] == "bf16"
    assert not model.training
    assert model.config.use_cache is not False


def test_precision_changes_between_runs_in_one_process_without_touching_accelerates_state(llama_ctx):
    """accelerate allows one mixed precision per process; the loop applies each run's own (autocast) instead."""
    from accelerate.state import AcceleratorState

    params = dict(steps=1, eval_every=1, eval_tokens=100, **FAST)
    runs = [train(llama_ctx, fresh(llama_ctx), TrainParams(precision=prec, **params))[1]
            for prec in ("bf16", "fp32", "bf16")]
    assert runs[0]["loss_history"] == runs[2]["loss_history"]  # bf16 again after fp32: the same run
    assert runs[0]["eval_history"] == runs[2]["eval_history"]
    assert runs[0]["loss_history"] != runs[1]["loss_history"]  # bf16 autocast really ran
    assert [r["precision"] for r in runs] == ["bf16", "no", "bf16"]
    assert AcceleratorState().mixed_precision == "no"


def test_no_code_reaches_into_accelerates_private_state():
    import re

    from conftest import ROOT as root

    pattern = re.compile(r"(AcceleratorState|PartialState|GradientState)\._|_shared_state|_reset_state")
    hits = [f"{p.relative_to(root)}:{i}" for top in ("gptopt_core", "plugins") for p in (root / top).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_fp16_scales_gradients_and_checkpoints_the_scale(llama_ctx, monkeypatch):
    """fp16 needs a CUDA GPU from the command line; here the CPU's fp16 autocast drives the same scaler path."""
    import gptopt_core.kit.training as training

    monkeypatch.setattr(training, "resolve_precision", lambda precision, device: "fp16")
    trainer = Trainer(llama_ctx, fresh(llama_ctx), TrainParams(steps=2, **FAST))
    m = trainer.run()
    assert trainer.scaler is not None and all(math.isfinite(x) for x in m["loss_history"])
    state = trainer.state_dict()["grad_scaler"]
    assert state["scale"] > 1 and state["_growth_tracker"] == 2  # two unskipped steps at the scaled loss


def test_params_validation():
    with pytest.raises(Exception, match="not both"):
        TrainParams(steps=2, epochs=1)
    with pytest.raises(Exception, match="temperature"):  # distillation belongs to the transfer plugin's params
        TrainParams(temperature=2.0)
    with pytest.raises(Exception):
        TrainParams(steps=0)
