"""A mixture of experts in GGUF: llama.cpp's merged expert tensors, from transformers' fused parameters.

llama.cpp's converter stacks the experts of a block into three 3-D tensors, ``ffn_gate_exps`` / ``ffn_up_exps``
``(E, I, H)`` and ``ffn_down_exps`` ``(E, H, I)`` (numpy order; one GGML type per tensor), and writes the router
``ffn_gate_inp`` (and Qwen2-MoE's ``ffn_gate_inp_shexp``) in f32. transformers holds ``gate_up_proj`` ``(E, 2I, H)``
(gate rows, then up rows) and ``down_proj`` ``(E, H, I)``: the gate and up tensors are its row halves.

Each expert's integer grid (left by rtn / gptq on :func:`gptopt_core.expert_layers`' views) goes with its rows:
when every expert of a merged tensor is on the same kind of grid, the merged tensor is a grid tensor (its rows the
experts' rows in order) and ``--type auto`` writes it from the codes, exactly as a dense layer's.
"""
from __future__ import annotations

from gptopt_core import GptoptError
from gptopt_core.kit.experts import expert_layers, moe_blocks
from gptopt_core.kit.grids import WeightGrid, grid_of, on_grid


def _merged_grid(layers, rows: slice):
    """``(grid, codes)`` of the experts' rows ``rows`` stacked, when each expert is on one same-kind grid."""
    import torch

    grids = [grid_of(m) for m in layers]
    if any(g is None for g in grids) or not all(on_grid(m, g) for m, g in zip(layers, grids)):
        return None, None, "float" if all(g is None for g in grids) else "grid-changed"
    kinds = {(g.bits, g.group_size, g.symmetric) for g in grids}
    if len(kinds) != 1:
        return None, None, "grid-changed"
    bits, group, symmetric = kinds.pop()
    scale = torch.cat([g.scale[rows] for g in grids])
    zero = None if symmetric else torch.cat([g.zero[rows] for g in grids])
    codes = torch.cat([g.codes(m.weight.detach().float())[rows] for m, g in zip(layers, grids)])
    return WeightGrid(bits=bits, group_size=group, symmetric=symmetric, scale=scale, zero=zero), codes, "grid"


def _source(Source, name, layers, rows: slice, hf_name: str):
    import torch

    values = torch.stack([m.weight.detach().float()[rows] for m in layers])
    grid, codes, origin = _merged_grid(layers, rows)
    dtype = str(layers[0].weight.dtype).replace("torch.", "")
    return Source(name, values.contiguous(), origin, grid, codes, "weight", hf_name, dtype)


def expert_sources(model, arch, names, Source) -> dict:
    """``{id(fused parameter): [Source]}``: each MoE block's ``gate_up_proj`` as the merged gate and up tensors,
    its ``down_proj`` as the merged down tensor, under gguf-py's names (``names``: its ``TensorNameMap``;
    ``Source``: :class:`gptopt_export.tensors.Source`, given by its caller)."""
    views = dict(expert_layers(model))
    out = {}
    for i, qualified, experts, _ in moe_blocks(model, arch):
        n, width = experts.gate_up_proj.shape[0], experts.down_proj.shape[2]
        gate_up = [views[f"{qualified}.{e}.gate_up_proj"] for e in range(n)]
        down = [views[f"{qualified}.{e}.down_proj"] for e in range(n)]
        gguf_names = {}
        for part in ("gate_proj", "up_proj", "down_proj"):
            hf = f"{arch.blocks}.{i}.mlp.experts.{part}"
            gguf_names[part] = names.get_name(hf, try_suffixes=(".weight",))
            if gguf_names[part] is None:
                raise GptoptError(f"export --format gguf: the experts of '{qualified}' have no merged tensor in "
                                  f"llama.cpp's '{arch.gguf.arch}' architecture (gguf-py's tensor map)")
        out[id(experts.gate_up_proj)] = [
            _source(Source, gguf_names["gate_proj"] + ".weight", gate_up, slice(0, width), f"{qualified}.gate_up_proj"),
            _source(Source, gguf_names["up_proj"] + ".weight", gate_up, slice(width, 2 * width), f"{qualified}.gate_up_proj")]
        out[id(experts.down_proj)] = [_source(Source, gguf_names["down_proj"] + ".weight", down, slice(None),
                                              f"{qualified}.down_proj")]
    return out
