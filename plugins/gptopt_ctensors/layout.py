"""What a model holds, in compressed-tensors' terms: config groups (one per integer-grid scheme), the ignore list,
the sparsity config; validated by compressed-tensors' own pydantic models.

Conventions (compressed-tensors' ``pack-quantized`` format, as llm-compressor writes it for W4A16 / W8A16):

* codes are signed, ``q in [-2**(b-1), 2**(b-1) - 1]``, packed ``32 / b`` per int32 along the input dimension;
* ``w = (q - zero_point) * scale`` with a signed ``zero_point`` (absent when symmetric);
* gptopt's asymmetric grids keep unsigned codes ``u`` and zero ``z`` in ``[0, 2**b - 1]``: ``q = u - 2**(b-1)``,
  ``zero_point = z - 2**(b-1)`` gives the same ``(q - zero_point) * scale``, exactly;
* every tensor is in ``nn.Linear``'s ``(out, in)`` orientation (GPT-2's ``Conv1D`` weights are transposed to it).
"""
from __future__ import annotations

FORMAT = "pack-quantized"


def scheme_key(grid) -> tuple:
    return (grid.bits, grid.group_size, grid.symmetric)


def weight_args(grid) -> dict:
    """The ``weights`` entry of a config group for ``grid`` (compressed-tensors ``QuantizationArgs`` fields)."""
    args = {"num_bits": grid.bits, "type": "int", "symmetric": bool(grid.symmetric),
            "strategy": "group" if grid.group_size else "channel", "dynamic": False}
    if grid.group_size:
        args["group_size"] = grid.group_size
    return args


def targets_for(model, names: set) -> tuple[list, list]:
    """``(targets, ignore)`` naming exactly the modules ``names``: ``["Linear"]`` minus an ignore list when they
    are all ``nn.Linear`` and cover most of them (llm-compressor's layout, e.g. ``ignore: ["lm_head"]``),
    else the module names themselves."""
    import torch.nn as nn

    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    if names and names <= linears:
        ignore = sorted(linears - names)
        if len(ignore) < len(names):
            return ["Linear"], ignore
    return sorted(names), []


def quantization_config(model, grid_layers):
    """compressed-tensors ``QuantizationConfig`` for ``[(name, module, grid)]`` (``None`` when empty)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    if not grid_layers:
        return None
    by_scheme: dict = {}
    for name, _, grid in grid_layers:
        by_scheme.setdefault(scheme_key(grid), []).append((name, grid))
    groups, ignore = {}, []
    for i, members in enumerate(sorted(by_scheme.values(), key=lambda ms: -len(ms))):
        targets, ign = targets_for(model, {n for n, _ in members}) if len(by_scheme) == 1 else \
            (sorted(n for n, _ in members), [])
        ignore += ign
        groups[f"group_{i}"] = {"targets": targets, "weights": weight_args(members[0][1]),
                                "input_activations": None, "output_activations": None, "format": FORMAT}
    if len(by_scheme) > 1:  # mixed schemes: every other Linear is named in ignore, as llm-compressor does
        import torch.nn as nn

        gridded = {n for n, _, _ in grid_layers}
        ignore = sorted(n for n, m in model.named_modules() if type(m) is nn.Linear and n not in gridded)
    return QuantizationConfig.model_validate({
        "config_groups": groups, "format": FORMAT, "quantization_status": QuantizationStatus.COMPRESSED,
        "ignore": sorted(set(ignore)), "kv_cache_scheme": None})


def sparsity_config(model, sparse: dict, compressed: bool):
    """compressed-tensors ``SparsityCompressionConfig`` for ``{name: mask (out, in)}``: ``sparse-24-bitmask``
    when every mask is 2:4 along the input dimension, else ``sparse-bitmask``; ``dense`` (structure recorded,
    zeros stored in place) when not ``compressed``."""
    from compressed_tensors.config import SparsityCompressionConfig

    if not sparse:
        return None
    two_four = all(is_two_four(mask) for mask in sparse.values())
    kept = sum(int(m.sum()) for m in sparse.values())
    total = sum(m.numel() for m in sparse.values())
    targets, ignore = targets_for(model, set(sparse))
    fmt = ("sparse-24-bitmask" if two_four else "sparse-bitmask") if compressed else "dense"
    return SparsityCompressionConfig.load_from_registry(
        fmt, targets=targets, ignore=ignore, global_sparsity=round(1 - kept / total, 6),
        sparsity_structure="2:4" if two_four else "unstructured")


def is_two_four(mask) -> bool:
    """Exactly 2 kept of every 4 consecutive inputs (``mask``: bool ``(out, in)``)."""
    if mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())


def config_dict(qconfig, sconfig) -> dict:
    """The ``quantization_config`` entry of config.json, laid out as compressed-tensors' ``ModelCompressor``
    writes it (``version``, ``quant_method``, ``sparsity_config``, ``transform_config``, then the quantization
    config's own fields)."""
    import compressed_tensors

    out = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
           "sparsity_config": sconfig.model_dump() if sconfig is not None else {}, "transform_config": {}}
    if qconfig is not None:
        out.update(qconfig.model_dump(exclude=["quant_method"]))
    return out
