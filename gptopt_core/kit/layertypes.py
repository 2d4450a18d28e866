"""What kind of weight layer a module is: ``nn.Linear`` or GPT-2's transposed ``Conv1D`` (a leaf module: the
architecture table and the layer finders both read it)."""
from __future__ import annotations


def is_conv1d(module) -> bool:
    """transformers' GPT-2 ``Conv1D``: ``weight`` is stored (in_features, out_features)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_weight_layer(module) -> bool:
    """True for ``nn.Linear`` and transformers' ``Conv1D`` (the layers steps compress)."""
    import torch.nn as nn

    return isinstance(module, nn.Linear) or is_conv1d(module)
