"""Mixture-of-experts layers in compressed-tensors: one packed linear layer per expert, as vLLM reads MoE checkpoints.

transformers 5 holds a MoE layer's experts fused (``mlp.experts.gate_up_proj`` (E, 2*I, hidden), ``down_proj``
(E, hidden, I)); checkpoints on the hub, llm-compressor's MoE output and vLLM's weight loaders keep one linear layer
per expert: Mixtral ``model.layers.L.block_sparse_moe.experts.J.w1`` (gate) / ``w3`` (up) / ``w2`` (down) with the
router at ``block_sparse_moe.gate``; Qwen2-MoE, Qwen3-MoE, OLMoE ``model.layers.L.mlp.experts.J.gate_proj`` /
``up_proj`` / ``down_proj`` with the router at ``mlp.gate``. transformers' loader fuses that layout back
(``conversion_mapping``), after its compressed-tensors quantizer de-quantized each expert (``dequantize: true``).

``quantize --method rtn|gptq`` puts each expert on an integer grid through :func:`gptopt_core.expert_layers`' views;
the writer packs those codes as they are (never re-rounded). An expert left float (bitsandbytes, a step that does
not see experts) is rounded to the linear layers' scheme here, round-to-nearest per output row and group
(:func:`gptopt_core.fit_grid`), in the model too (the model in memory computes what the file holds), and ``save``
says so. The routers stay float and are listed in ``ignore``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gptopt_core import GptoptError
from gptopt_core.kit.experts import expert_layers, moe_layers
from gptopt_core.kit.grids import WeightGrid, fit_grid, grid_of, on_grid

#: per-expert linear names (gate, up, down) by model type; every other family uses transformers' Qwen-style names
LEAVES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_LEAVES = ("gate_proj", "up_proj", "down_proj")
#: model type -> (block suffix in memory, block suffix in the file)
BLOCK_RENAMES = {"mixtral": (".mlp", ".block_sparse_moe")}


@dataclass(eq=False)
class ExpertBlock:
    name: str  # the MoE block in the model (model.layers.0.mlp)
    hub: str  # the same block in the file (Mixtral: model.layers.0.block_sparse_moe)
    experts: Any
    leaves: tuple

    def expert_modules(self) -> list:
        return [f"{self.hub}.experts.{j}.{leaf}" for j in range(self.experts.gate_up_proj.shape[0])
                for leaf in self.leaves]


def file_blocks(model) -> list[ExpertBlock]:
    """The model's MoE blocks (:func:`gptopt_core.moe_layers`, the architecture table's) with their names in the
    file; one-line refusal for fused expert tensors other than ``gate_up_proj`` / ``down_proj``."""
    kind = getattr(model.config, "model_type", "")
    rename = BLOCK_RENAMES.get(kind)
    out = []
    for block in moe_layers(model):
        name, experts = block.name, block.experts
        extra = sorted(n for n, _ in experts.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj"))
        if extra or getattr(experts, "is_transposed", False):
            raise GptoptError(f"save --format compressed-tensors: {name}.experts holds {', '.join(extra) or 'transposed'}"
                              " expert tensors; the per-expert layout is written for gate_up_proj / down_proj only "
                              "(Mixtral, Qwen2/3-MoE, OLMoE); save --format safetensors")
        hub = name[: -len(rename[0])] + rename[1] if rename and name.endswith(rename[0]) else name
        out.append(ExpertBlock(name, hub, experts, LEAVES.get(kind, DEFAULT_LEAVES)))
    return out


def expert_scheme(qconfig):
    """The one packed group / channel scheme of ``qconfig`` the experts are written with (its config group)."""
    groups = list(qconfig.config_groups.values()) if qconfig is not None else []
    if len(groups) != 1 or groups[0].format != "pack-quantized" or groups[0].weights.strategy not in ("group",
                                                                                                      "channel"):
        raise GptoptError("save --format compressed-tensors: a mixture-of-experts model's experts are written on the "
                          "linear layers' scheme, so they need one packed int scheme (quantize --method rtn|gptq with "
                          "one --bits / --group-size, no W8A8, no GPT-2 layers); save --format safetensors")
    return groups[0]


def _view_grid(view, args, gs):
    """The grid quantize left on an expert's view, when it is the scheme the file is written with and the weight is
    still on it; else None."""
    grid = grid_of(view) if view is not None else None
    if grid is None or (grid.bits, grid.group_size, grid.symmetric) != (args.num_bits, gs, bool(args.symmetric)):
        return None
    return grid if on_grid(view, grid) else None


def _rows(grid, rows: slice):
    return WeightGrid(grid.bits, grid.group_size, grid.symmetric, grid.scale[rows],
                      None if grid.zero is None else grid.zero[rows])


def _expert_codes(w, grid, args, gs):
    """``(grid, codes)`` of one expert matrix ``w``: on ``grid`` (quantize's) as it is, else rounded here in place."""
    import torch

    if grid is not None:
        return grid, grid.codes(w.detach().float()), False
    grid = fit_grid(w.detach().float(), args.num_bits, gs, bool(args.symmetric))
    codes = grid.codes(w.detach().float())
    with torch.no_grad():
        w.copy_(grid.dequantize(codes).to(w.dtype))
    return grid, codes, True


def add_experts(model, blocks, qconfig, tensors: dict, replaced: set) -> dict:
    """Per-expert packed tensors into ``tensors`` (the fused keys into ``replaced``), routers added to
    ``qconfig.ignore``; an expert quantize left float is rounded in the model too. Returns ``{"renamed": {old key:
    new key}, "experts": count, "rounded": experts rounded here, "scheme": describe}``."""
    from .packing import packed_codes

    group = expert_scheme(qconfig)
    args = group.weights
    gs = args.group_size if args.strategy == "group" else None
    views = dict(expert_layers(model))
    renamed, scheme, rounded = {}, None, set()
    for block in blocks:
        gu, down = block.experts.gate_up_proj, block.experts.down_proj
        inter = gu.shape[1] // 2
        for j in range(gu.shape[0]):
            gu_grid = _view_grid(views.get(f"{block.name}.experts.{j}.gate_up_proj"), args, gs)
            down_grid = _view_grid(views.get(f"{block.name}.experts.{j}.down_proj"), args, gs)
            parts = ((gu[j, :inter], gu_grid and _rows(gu_grid, slice(None, inter))),
                     (gu[j, inter:], gu_grid and _rows(gu_grid, slice(inter, None))), (down[j], down_grid))
            for leaf, (w, grid) in zip(block.leaves, parts):
                if gs and w.shape[1] % gs:
                    raise GptoptError(f"save --format compressed-tensors: group size {gs} does not divide the "
                                      f"input width {w.shape[1]} of {block.name}.experts ({leaf}); quantize with "
                                      "another --group-size or channel")
                grid, codes, fitted = _expert_codes(w, grid, args, gs)
                if fitted:
                    rounded.add((block.name, j))
                tensors.update(packed_codes(f"{block.hub}.experts.{j}.{leaf}", codes.cpu(), grid))
                scheme = grid.describe()
        replaced |= {f"{block.name}.experts.gate_up_proj", f"{block.name}.experts.down_proj"}
        if block.hub != block.name:
            renamed[f"{block.name}.gate.weight"] = f"{block.hub}.gate.weight"
    routers = {f"{b.hub}.gate" for b in blocks}
    if list(group.targets) != ["Linear"]:
        group.targets = sorted(set(group.targets) | {m for b in blocks for m in b.expert_modules()})
    qconfig.ignore = sorted(set(qconfig.ignore or []) | routers)
    return {"renamed": renamed, "experts": sum(b.experts.gate_up_proj.shape[0] for b in blocks),
            "rounded": len(rounded), "scheme": scheme}


def fuse_experts(model, tensors: dict, qconfig, grid_from) -> int:
    """The reader's side: per-expert packed tensors of ``tensors`` (popped) de-quantized and fused into the model's
    ``gate_up_proj`` / ``down_proj`` keys, the router renamed to the model's name; returns the experts read.
    ``grid_from(tensors, name, args)`` decodes one packed layer (:func:`.reader._grid_from`)."""
    import re

    import torch

    blocks = {b.hub: b for b in file_blocks(model)}
    pattern = re.compile(r"^(?P<hub>.+)\.experts\.(?P<j>\d+)\.(?P<leaf>\w+)\.weight_scale$")
    found: dict = {}
    for key in [k for k in tensors if pattern.match(k)]:
        m = pattern.match(key)
        block = blocks.get(m["hub"])
        if block is None or m["leaf"] not in block.leaves:
            continue
        if qconfig is None or len(qconfig.config_groups) != 1:
            raise ValueError(f"{key}: per-expert tensors are read with one config group, not "
                             f"{len(qconfig.config_groups) if qconfig is not None else 0}")
        name = key[: -len(".weight_scale")]
        grid, codes = grid_from(tensors, name, next(iter(qconfig.config_groups.values())).weights)
        found.setdefault(block.hub, {})[(int(m["j"]), m["leaf"])] = grid.dequantize(codes).float()
    for hub, mats in found.items():
        block = blocks[hub]
        total = block.experts.gate_up_proj.shape[0]
        g, u, d = block.leaves
        missing = [f"{hub}.experts.{j}.{leaf}" for j in range(total) for leaf in block.leaves if (j, leaf) not in mats]
        if missing:
            raise ValueError(f"missing expert tensors: {', '.join(missing[:3])}")
        tensors[f"{block.name}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([mats[(j, g)], mats[(j, u)]]) for j in range(total)])
        tensors[f"{block.name}.experts.down_proj"] = torch.stack([mats[(j, d)] for j in range(total)])
        if hub != block.name and f"{hub}.gate.weight" in tensors:
            tensors[f"{block.name}.gate.weight"] = tensors.pop(f"{hub}.gate.weight")
    return sum(len(m) for m in found.values()) // 3
