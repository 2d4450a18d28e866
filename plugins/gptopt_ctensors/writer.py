"""Write a model's integer grids (packed, with fp16 scales) and pruning masks (bitmask / 2:4) as compressed-tensors.

The integers come from :func:`gptopt_core.kit.grids.grid_codes` (never re-rounded) and are packed by compressed-tensors'
own ``pack_to_int32``; bitmasks by its ``pack_bitmasks``. Layers neither on a grid nor sparse are written as they
are held (float32 for gptopt's models). See :mod:`.layout` for the conventions.
"""
from __future__ import annotations

import json

from gptopt_core import GptoptError
from gptopt_core.kit.activations import input_quant_of
from gptopt_core.kit.grids import grid_codes, grid_layers
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import weight_matrix

from . import layout, moe
from .packing import packed_codes


def sparse_masks(ctx, model, gridded: set) -> dict:
    """``{name: bool mask (out, in)}`` of the pruned layers not on a grid (from ``ctx.state["masks"]``)."""

    masks = (getattr(ctx, "state", None) or {}).get("masks") or {}
    modules = dict(model.named_modules())
    out = {}
    for name, mask in masks.items():
        module = modules.get(name)
        if module is None or name in gridded or getattr(module, "weight", None) is None:
            continue
        mask = mask.detach().to("cpu", dtype=__import__("torch").bool)
        if tuple(mask.shape) != tuple(module.weight.shape):
            continue
        out[name] = mask.t().contiguous() if is_conv1d(module) else mask
    return out


def packed_tensors(name, module, grid, kind: str = "pack") -> dict:
    """The tensors of one grid layer in its kind's layout (:mod:`.layout`): ``weight_packed`` / ``weight_shape``
    (``pack``, ``block``) or an int8 ``weight`` (``naive``), fp16 ``weight_scale``, and ``weight_zero_point`` when
    asymmetric (packed along the output dimension for ``pack``, int8 otherwise)."""
    return packed_codes(name, grid_codes(module).cpu(), grid, kind)


def bitmask_tensors(name, weight, mask, two_four: bool) -> dict:
    """compressed-tensors' bitmask layout (``shape``, ``compressed``, ``bitmask``, and ``row_offsets`` for the
    unstructured ``sparse-bitmask``; ``compressed`` is ``(out, in/2)`` for ``sparse-24-bitmask``)."""
    import torch
    from compressed_tensors.utils.helpers import pack_bitmasks

    weight = weight.detach().cpu()
    values = weight[mask]
    if two_four:
        return {f"{name}.shape": torch.tensor(list(weight.shape)).reshape(-1, 1),
                f"{name}.compressed": values.reshape(weight.shape[0], weight.shape[1] // 2).contiguous(),
                f"{name}.bitmask": pack_bitmasks(mask)}
    counts = mask.sum(dim=1)
    return {f"{name}.shape": torch.tensor(list(weight.shape)), f"{name}.compressed": values.contiguous(),
            f"{name}.bitmask": pack_bitmasks(mask), f"{name}.row_offsets": torch.cumsum(counts, 0) - counts}


def write(ctx, model, path) -> dict:
    """Write ``model`` into ``path``: config.json (with ``quantization_config``), model.safetensors,
    generation_config.json. Returns a summary (layers packed / sparse, formats)."""
    from safetensors.torch import save_file

    grids = grid_layers(model)
    gridded = {n for n, _, _ in grids}
    # with grids, zeros stay inside the packed codes (transformers and vLLM read it all) and no sparsity config is
    # written, as compressed-tensors 0.20's own ModelCompressor writes none (vLLM 0.24 refuses any sparsity config
    # with targets, even format "dense"); without grids the pruned layers are written as bitmasks
    compress_sparse = not grids
    masked = sparse_masks(ctx, model, set())
    sparse = masked if compress_sparse else {}
    qconfig = layout.quantization_config(model, grids)
    sconfig = layout.sparsity_config(model, sparse)
    blocks = moe.file_blocks(model) if qconfig is not None else []
    tensors: dict = {}
    replaced = set()
    experts = moe.add_experts(model, blocks, qconfig, tensors, replaced) if blocks else None
    plain = layout.plain_transformers(qconfig, len(sparse))
    if experts:  # transformers fuses per-expert tensors only after de-quantizing them
        plain["dequantize"] = True
    modules = dict(model.named_modules())
    tied = layout.tied_head(model)

    state = model.state_dict()
    for name, module, grid in grids:
        kind = layout.kind_of(model, module, grid)
        tensors.update(packed_tensors(name, module, grid, kind))
        replaced.add(f"{name}.weight")
        if tied and name == tied[1]:  # the tied head's own scale (and zero point); its int8 weight is this one
            for suffix in ("weight_scale", "weight_zero_point"):
                if f"{name}.{suffix}" in tensors:
                    tensors[f"{tied[0]}.{suffix}"] = tensors[f"{name}.{suffix}"].clone()
    if compress_sparse:
        two_four = sconfig.format == "sparse-24-bitmask"
        for name, mask in sparse.items():
            weight = weight_matrix(modules[name])
            if bool((weight.detach().cpu()[~mask] != 0).any()):
                raise GptoptError(f"save --format compressed-tensors: {name} has non-zero weights outside its pruning "
                                  "mask (changed after prune); prune again or save --format safetensors")
            tensors.update(bitmask_tensors(name, weight, mask, two_four))
            replaced.add(f"{name}.weight")
    add_plain_tensors(model, state, replaced, tensors)
    for old, new in (experts or {}).get("renamed", {}).items():
        tensors[new] = tensors.pop(old)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    write_configs(model, path, layout.config_dict(qconfig, sconfig, plain["dequantize"]))
    return {"packed_layers": len(grids), "sparse_layers": len(sparse),
            "sparsity_format": sconfig.format if sconfig is not None else None,
            "zeros_in_codes": 0 if compress_sparse else len(set(masked) & gridded),
            "schemes": sorted({g.describe() + (f"+{input_quant_of(m).describe()} (W8A8, int-quantized)"
                                               if input_quant_of(m) is not None else "") for _, m, g in grids}),
            "conv1d": any(is_conv1d(m) for _, m, _ in grids), "asymmetric": any(not g.symmetric for _, _, g in grids),
            "plain_dequantize": plain["dequantize"], "plain_unread": plain["unread"],
            "moe_experts": experts["experts"] if experts else 0, "moe_scheme": experts["scheme"] if experts else None,
            "moe_rounded": experts["rounded"] if experts else 0}


def add_plain_tensors(model, state: dict, replaced: set, tensors: dict) -> None:
    """Every state-dict tensor not written packed or sparse, as it is; a tensor sharing storage with one already
    written is written again (cloned), except a head tied to the embedding, which transformers ties on load."""
    tie = bool(getattr(model.config, "tie_word_embeddings", False))
    seen: dict = {(state[k].data_ptr(), state[k].numel()): k for k in replaced if k in state}
    for key, value in state.items():
        if key in replaced or key in tensors:
            continue
        ptr = (value.data_ptr(), value.numel())
        if ptr in seen:
            if tie:
                continue  # a head tied to the embedding: transformers ties it again on load
            value = value.clone()
        seen[ptr] = key
        tensors[key] = value.detach().cpu().contiguous()


def write_configs(model, path, quantization_config: dict) -> None:
    """config.json with ``quantization_config``, and generation_config.json where the model has one."""
    model.config.save_pretrained(str(path))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.save_pretrained(str(path))
