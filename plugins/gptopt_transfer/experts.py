"""Experts of mixture-of-experts models as training targets (``lora --experts``, ``finetune --experts``).

transformers 5 holds a MoE layer's experts fused: ``mlp.experts.gate_up_proj`` (E, 2*I, hidden) and
``mlp.experts.down_proj`` (E, hidden, I) are 3-D ``nn.Parameter`` s of one module, not ``nn.Linear`` s, so PEFT's
``target_modules`` cannot adapt them; peft (0.17 on) adapts such parameters with ``target_parameters`` (its
``ParamWrapper``: one low-rank update per expert, merged back into the fused tensor by ``merge_and_unload``). The
router (``mlp.gate``, a Qwen2-MoE ``shared_expert_gate``) is never a target unless named explicitly.
"""
from __future__ import annotations

#: leaf names of routing layers: left out of ``--target-modules auto`` (a pattern naming them still targets them)
ROUTER_LEAVES = ("gate", "router", "shared_expert_gate")


def expert_parameters(model) -> list[str]:
    """Qualified names (on the base model) of the fused expert parameters: 3-D parameters held directly by a module
    whose leaf name is ``experts``, first dimension the expert count."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = []
    for mod_name, module in base.named_modules():
        if mod_name.rsplit(".", 1)[-1] != "experts":
            continue
        for p_name, p in module.named_parameters(recurse=False):
            if p.dim() == 3:
                names.append(f"{mod_name}.{p_name}")
    return names


def is_router(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTER_LEAVES
