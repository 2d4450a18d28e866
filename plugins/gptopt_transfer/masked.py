"""Sparsity-aware LoRA training: the adapters learn the update the merge will keep.

``lora --merge`` on a pruned model re-applies the pruning masks after the merge, so the saved weight is
``W + M ⊙ s·BA`` (M: the keep mask). Plain PEFT trains with the dense update ``W + s·BA`` instead, so the
adapters spend capacity on pruned positions that the merge then throws away, and the merged model is not the
model that was trained. :func:`mask_lora_updates` makes each adapted layer with a mask compute with exactly the
weight the merge produces, so the merged, re-masked model computes what the training step last evaluated.

Imported only inside the lora step (it imports torch).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def mask_lora_updates(peft_model, masks: dict) -> list[str]:
    """Patch the forward of every PEFT LoRA layer whose base layer has a pruning mask; returns their names.

    ``masks``: ``{module name in the base model: bool keep mask in the weight's stored orientation}``
    (``ctx.state["masks"]``). Layers without a mask, or whose mask does not fit the weight, keep PEFT's forward.
    """
    base = peft_model.get_base_model()
    patched = []
    for name, module in base.named_modules():
        keep = masks.get(name)
        if keep is None or not (hasattr(module, "base_layer") and hasattr(module, "lora_A")):
            continue
        weight = module.base_layer.weight
        if tuple(keep.shape) != tuple(weight.shape) or weight.dtype not in (torch.float32, torch.float16,
                                                                            torch.bfloat16):
            continue
        module._gptopt_keep = keep.to(device=weight.device, dtype=weight.dtype)
        module.forward = types.MethodType(_masked_forward, module)
        patched.append(name)
    return patched


def masked_delta(layer):
    """``M ⊙ Σ_active s·B·A`` in the base weight's stored orientation (differentiable in A and B)."""
    delta = None
    for adapter in layer.active_adapters:
        if adapter not in layer.lora_A:
            continue
        d = layer.get_delta_weight(adapter)
        delta = d if delta is None else delta + d
    return None if delta is None else delta * layer._gptopt_keep


def _masked_forward(self, x, *args, **kwargs):
    if self.disable_adapters or self.merged:
        return type(self).forward(self, x, *args, **kwargs)
    delta = masked_delta(self)
    base = self.base_layer
    if delta is None:
        return base(x, *args, **kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    dropout = self.lora_dropout[active[0]]
    if self.training and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
        # PEFT's semantics: dropout on the adapter's input only, so the update runs as its own (dense) matmul
        out_in = delta.t() if self.fan_in_fan_out else delta
        return base(x, *args, **kwargs) + F.linear(dropout(x.to(delta.dtype)), out_in).to(x.dtype)
    # one matmul with the weight the merge will produce
    weight = base.weight + delta.to(base.weight.dtype)
    return torch.func.functional_call(base, {"weight": weight}, (x, *args), kwargs)


def masks_hold(model, masks) -> bool:
    """True when every pruned (mask False) weight is exactly zero."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        module = modules.get(name)
        if module is None:
            continue
        w = getattr(module, "base_layer", module).weight
        if w.shape != keep.shape:
            continue
        with torch.no_grad():
            if bool((w[~keep.to(w.device)] != 0).any()):
                return False
    return True
