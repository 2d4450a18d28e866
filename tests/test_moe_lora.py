"""lora / finetune on tiny mixture-of-experts models (tests/moe_models.py): LoRA over the fused expert parameters
(peft target_parameters), the router never a default target, unmerged save + peft reload and merge at the same
logits with the expert layout kept, finetune with the experts frozen, and the one-line refusals."""
import pytest
import torch
from moe_models import save_tiny_moe

from gptopt_core import GptoptError, ParamsError, Pipeline
from gptopt_core.kit.testing import make_context
from gptopt_transfer.step import LoraStep, resolve_targets

FAST = dict(steps=2, seq_len=32, batch_size=2, eval_every=0)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save_tiny_moe(root / f, f) for f in ("qwen2_moe", "mixtral")}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_over_experts_saves_reloads_and_merges_keeping_the_expert_layout(moe_dirs, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    src = moe_dirs["qwen2_moe"]
    original = AutoModelForCausalLM.from_pretrained(str(src)).state_dict()
    res = (Pipeline(model=str(src), quiet=True, device="cpu")
           .add("lora", experts="include", dropout=0.0, lr=5e-2, r=4, **FAST)
           .add("save", to=str(tmp_path / "adapter-run")).run())
    m = res.records[0]["metrics"]
    assert m["lora_expert_parameters"] == 4  # gate_up_proj and down_proj of both MoE layers
    assert m["lora_targets"] == 2 * (4 + 3)  # attention q/k/v/o and the shared expert's MLP; no shared_expert_gate
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    model = res.model.eval()
    with_adapter = logits(model, ids)
    # the base saved plain (nested parameter wrappers swapped out), the adapter beside it: plain peft reloads both
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "adapter-run"))
    assert set(base.state_dict()) == set(original)
    reloaded = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter-run" / "adapter")).eval()
    torch.testing.assert_close(logits(reloaded, ids), with_adapter, rtol=0, atol=1e-6)
    # merge: the fused expert tensors absorb their updates, same shapes and names, the routers untouched
    merged = LoraStep._merged(model, None, {}).eval()
    state = merged.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in original.items()}
    for k in original:
        if k.endswith("experts.gate_up_proj") or k.endswith("experts.down_proj"):
            assert not torch.equal(state[k], original[k]), k
        if k.endswith("mlp.gate.weight") or k.endswith("shared_expert_gate.weight") or "norm" in k:
            assert torch.equal(state[k], original[k]), k
    merged_logits = logits(merged, ids)
    torch.testing.assert_close(merged_logits, with_adapter, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(str(tmp_path / "merged"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert torch.equal(logits(again, ids), merged_logits)


def test_router_is_not_an_auto_target_but_a_pattern_may_name_it(moe_dirs):
    ctx = make_context(model=str(moe_dirs["qwen2_moe"]))
    auto, _ = resolve_targets(ctx.model, ["auto"])
    assert auto and not any(n.endswith("gate") for n in auto)
    named, _ = resolve_targets(ctx.model, ["*shared_expert_gate"])
    assert named == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]


def test_finetune_with_experts_excluded_leaves_them_as_they_were(moe_dirs):
    ctx = make_context(model=str(moe_dirs["mixtral"]))
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    step = ctx.plugins.step_class("finetune")(experts="exclude", lr=1e-2, **FAST)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    after = ctx.model.state_dict()
    assert metrics["frozen_expert_parameters"] == 4
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not any("experts" in k for k in changed)
    assert any(k.endswith("mlp.gate.weight") for k in changed)  # full finetune trains the router


def test_expert_options_refuse_in_one_line(moe_dirs):
    with pytest.raises(ParamsError, match="--experts include: peft's LoRA on fused expert parameters has no "
                                          "dropout; add --dropout 0"):
        Pipeline(model="tiny-random-llama").add("lora", experts="include")
    dense = make_context(model="tiny-random-llama")
    with pytest.raises(GptoptError, match="lora --experts include: the model has no fused expert parameters"):
        LoraStep(experts="include", dropout=0.0, **FAST).preflight(dense)
    with pytest.raises(GptoptError, match="finetune --experts exclude: the model has no fused expert parameters"):
        dense.plugins.step_class("finetune")(experts="exclude", **FAST).preflight(dense)
