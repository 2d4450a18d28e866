"""The one way every number is measured: bytes, parameters, sparsity."""
from __future__ import annotations

from .experts import expert_layers
from .grids import grid_layers, grid_of
from .modules import weight_matrix, weight_modules


def model_bytes(model) -> int:
    """Bytes held by parameters and buffers in memory (packed low-bit storage counts as stored).

    A layer on an integer grid (:mod:`gptopt_core.kit.grids`) counts its weight as the packed codes and scales that
    savers and exporters write, not as the de-quantized copy it computes with."""
    gridded = {}
    for _, module, grid in grid_layers(model):
        out_features, in_features = weight_matrix(module).shape
        gridded[_storage_key(module.weight)] = grid.stored_bytes(out_features, in_features)
    seen, total = set(), _expert_grid_savings(model)
    views = {id(v.weight) for _, v in expert_layers(model)}  # views into fused experts: counted there
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(tensor)
        if key in seen or id(tensor) in views:
            continue  # tied weights count once
        seen.add(key)
        total += gridded[key] if key in gridded else _stored_bytes(tensor)
    for module in model.modules():  # bitsandbytes keeps 4-bit absmax etc. in quant_state, not in buffers
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in _quant_state_tensors(state):
                key = (t.data_ptr(), t.numel())
                if key in seen:
                    continue  # a head tied to a 4-bit embedding shares its block scales
                seen.add(key)
                total += t.numel() * t.element_size()
        scb = getattr(getattr(module, "weight", None), "SCB", None)
        if scb is not None and (scb.data_ptr(), scb.numel()) not in seen:
            total += scb.numel() * scb.element_size()
    for weight, bias in _packed_linears(model):  # torch dynamic int8: weights live outside parameters/buffers
        total += weight.numel() * weight.element_size() + _qparams_bytes(weight)
        if bias is not None:
            total += bias.numel() * bias.element_size()
    return int(total)


def _expert_grid_savings(model) -> int:
    """A MoE expert on an integer grid (:func:`gptopt_core.expert_layers`) lives in its fused parameter: its packed
    bytes minus its float bytes (<= 0), so the fused parameter counts as stored."""
    total = 0
    for _, view in expert_layers(model):
        grid = grid_of(view)
        if grid is not None:
            rows, cols = view.weight.shape
            total += grid.stored_bytes(rows, cols) - view.weight.numel() * view.weight.element_size()
    return total


def _inner_tensors(tensor) -> list:
    """The tensors a wrapper tensor subclass (e.g. torchao's ``Int8Tensor``) stores; ``[]`` for plain tensors."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None:
        return []
    names, _ = flatten()
    return [inner for inner in (getattr(tensor, n, None) for n in names) if inner is not None]


def _stored_bytes(tensor) -> int:
    inner = _inner_tensors(tensor)
    if inner:  # a wrapper's element_size() is its logical dtype's; count what it really holds
        return sum(_stored_bytes(t) for t in inner)
    return tensor.numel() * tensor.element_size()


def _storage_key(tensor):
    inner = _inner_tensors(tensor)
    if inner:  # wrappers report data_ptr() 0: identify them by their first inner tensor
        return _storage_key(inner[0])
    return (tensor.data_ptr(), tensor.numel())


def _packed_linears(model):
    """``(weight, bias)`` of torch's quantized linear layers (``quantize_dynamic``): their packed weights are
    neither parameters nor buffers."""
    for module in model.modules():
        if type(module).__name__ == "LinearPackedParams" and hasattr(module, "_weight_bias"):
            yield module._weight_bias()


def _qparams_bytes(weight) -> int:
    import torch

    if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        return 8 + 8  # scale (double) + zero point (int64)
    return weight.q_per_channel_scales().numel() * 16


def _quant_state_tensors(state):
    import torch

    out = []
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif hasattr(value, "__dict__") and type(value).__name__ == "QuantState":
            out.extend(_quant_state_tensors(value))
    return out


def num_params(model) -> int:
    """Logical parameter count (4-bit packed weights counted as unpacked elements)."""
    seen, total = set(), 0
    for p in model.parameters():
        key = _storage_key(p)
        if key in seen:
            continue
        seen.add(key)
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        n = 1
        if shape is not None:
            for d in shape:
                n *= int(d)
        total += n if shape is not None else p.numel()
    for weight, bias in _packed_linears(model):
        total += weight.numel() + (bias.numel() if bias is not None else 0)
    return int(total)


def sparsity(model) -> float:
    """Fraction of exact zeros in the weights of linear / Conv1D layers (output head excluded), a MoE's experts
    included (:func:`gptopt_core.expert_layers`).

    Packed 4-bit weights are not inspected (they count as dense)."""
    zeros = total = 0
    layers = dict(weight_modules(model))
    layers.update(expert_layers(model))  # inside expert_linears they are named both ways: counted once
    for module in layers.values():
        w = module.weight
        if getattr(w, "quant_state", None) is not None:
            shape = w.quant_state.shape
            total += int(shape[0]) * int(shape[1])
            continue
        if _inner_tensors(w) and hasattr(w, "dequantize"):  # e.g. torchao int8: compare the stored values
            w = w.dequantize()
        total += w.numel()
        zeros += int((w == 0).sum())
    return float(zeros / total) if total else 0.0
