"""Finding the weight matrices of a model: ``nn.Linear`` and GPT-2's transposed ``Conv1D`` alike."""
from __future__ import annotations

import fnmatch


from .layertypes import is_conv1d, is_weight_layer  # noqa: F401  (a leaf: architectures reads it too)


def matches(name: str, patterns) -> bool:
    """Glob match on the qualified module name; a bare pattern also matches any name ending in it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def weight_modules(model, include=None, exclude=None, with_head: bool = False):
    """``[(qualified_name, module)]`` of linear / Conv1D layers in model order.

    The output head (the module returned by ``get_output_embeddings()``) is left out unless ``with_head``
    or it is matched by ``include``; so is a MoE router or shared-expert gate that is a linear layer (Qwen2-MoE's
    ``shared_expert_gate``) unless ``include`` names it: every step keeps routers float by default.
    ``include``/``exclude`` are glob patterns on qualified names.
    """
    from .experts import router_ids

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    routers = router_ids(model)
    found = []
    for name, module in model.named_modules():
        if not is_weight_layer(module):
            continue
        if include and not matches(name, include):
            continue
        if exclude and matches(name, exclude):
            continue
        if module is head and not (with_head or include):
            continue
        if id(module) in routers and not (include and matches(name, include)):
            continue  # a MoE router or shared-expert gate (Qwen2-MoE's is a linear layer): float unless named
        found.append((name, module))
    return found


def weight_matrix(module):
    """The weight as an (out_features, in_features) view, whatever the layer type (no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def apply_masks(model, masks) -> None:
    """Zero the weights whose mask is False. ``masks``: qualified name → bool tensor shaped like ``weight``."""
    import torch

    from .experts import expert_layers

    modules = {**dict(expert_layers(model)), **dict(model.named_modules())}  # a MoE's experts by their view names
    with torch.no_grad():
        for name, keep in masks.items():
            module = modules.get(name)
            if module is None:
                # PEFT wraps names (base_model.model.<name>); match by suffix
                module = next((m for n, m in modules.items() if n.endswith("." + name) and hasattr(m, "weight")), None)
            if module is None:
                continue
            weight = module.weight
            weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))


def dequantized_weight(module):
    """The float32 ``(out_features, in_features)`` weight of a bitsandbytes layer (``Linear8bitLt``,
    ``Linear4bit``, or an embedding / layer with its own ``dequantized_weight()`` method), through bitsandbytes' own
    functions: what exporters and savers write for a layer they cannot keep packed."""
    own = getattr(module, "dequantized_weight", None)
    if callable(own):
        return own().float()
    import bitsandbytes as bnb
    import torch

    weight = module.weight
    if getattr(weight, "quant_state", None) is not None:  # nf4 / fp4
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    codes = weight.data if weight.data.dtype == torch.int8 else module.state.CB
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return bnb.functional.int8_vectorwise_dequant(codes, scb).float()


def mask_targets(model, masks: dict) -> list:
    """``[(weight_parameter, bool_mask)]`` for the masks whose weights are being trained.

    Mask names are those of the plain model (``model.named_modules()``); in a PEFT-wrapped model the module
    is found by name suffix and its base layer's weight is used. Frozen weights (e.g. a LoRA base) are left
    out: they cannot move during training.
    """
    from .experts import expert_layers

    modules = {**dict(expert_layers(model)), **dict(model.named_modules())}  # a MoE's experts by their view names
    out = []
    for name, keep in (masks or {}).items():
        module = modules.get(name)
        if module is None:
            module = next((m for n, m in modules.items() if n.endswith("." + name) and hasattr(m, "weight")), None)
        if module is None:
            continue
        base = getattr(module, "base_layer", module)
        weight = base.weight
        if weight.requires_grad and tuple(weight.shape) == tuple(keep.shape):
            out.append((weight, keep.to(device=weight.device)))
    return out
