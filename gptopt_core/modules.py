"""Finding the weight matrices of a model: ``nn.Linear`` and GPT-2's transposed ``Conv1D`` alike."""
from __future__ import annotations

import fnmatch


def is_conv1d(module) -> bool:
    """transformers' GPT-2 ``Conv1D``: ``weight`` is stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_weight_layer(module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the layers steps compress)."""
    import torch.nn as nn

    return isinstance(module, nn.Linear) or is_conv1d(module)


def matches(name: str, patterns) -> bool:
    """Glob match on the qualified module name; a bare pattern also matches any name ending in it."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns)


def weight_modules(model, include=None, exclude=None, with_head: bool = False):
    """``[(qualified_name, module)]`` of linear / Conv1D layers in model order.

    The output head (the module returned by ``get_output_embeddings()``) is left out unless ``with_head``
    or it is matched by ``include``. ``include``/``exclude`` are glob patterns on qualified names.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
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
        found.append((name, module))
    return found


def weight_matrix(module):
    """The weight as an (out_features, in_features) view, whatever the layer type (no copy)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def apply_masks(model, masks) -> None:
    """Zero the weights whose mask is False. ``masks``: qualified name → bool tensor shaped like ``weight``."""
    import torch

    modules = dict(model.named_modules())
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
