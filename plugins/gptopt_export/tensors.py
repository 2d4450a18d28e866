"""Which tensors a GGUF file holds for a Hugging Face model, under llama.cpp's names and layouts.

Driven by the architecture table (``gptopt_core.architecture_of``): tensor names come from gguf-py's
``TensorNameMap`` for the family's llama.cpp architecture (the mapping ``convert_hf_to_gguf.py`` itself uses), and
the family's :class:`gptopt_core.GgufLayout` says what differs from a plain copy: Llama's q/k rows permuted for
llama.cpp's rotary layout, GPT-NeoX's per-head fused qkv reordered to ``[q; k; v]``, Gemma's norms shifted by one,
GPT-2's tied head written out. GPT-2's Conv1D weights are transposed to ``(out, in)``. Each weight is described by
a :class:`Source`: its float values as torch computes with them and, where the chain left one, the integer grid or
the bitsandbytes layer they came from, so the type chooser can write grids without re-rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gptopt_core import GptoptError
from gptopt_core.architectures import architecture_of, unsupported as unsupported_architecture

@dataclass
class Source:
    """One tensor to write: ``values`` float32 torch tensor in the HF orientation after the llama.cpp layout
    (``(out, in)`` for weights), and where the values came from."""

    name: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    values: Any  # torch.Tensor float32
    origin: str  # "float" | "grid" | "bnb-int8" | "bnb-nf4" | "bnb-fp4" | "grid-changed"
    grid: Any = None  # gptopt_core.kit.grids.WeightGrid (rows permuted like values) when origin == "grid"
    codes: Any = None  # int32 (out, in) codes on ``grid``
    role: str = "weight"  # "weight" | "embedding" | "head" | "norm" | "bias" | "position" | "router"
    hf_name: str = ""
    float_dtype: str = "float32"  # the dtype the layer computed in (auto keeps float layers there)
    module: Any = None  # the torch module the weight belongs to (imatrix: statistics by module -> GGUF name)


def family(model, plugins=None):
    """The model's row of the architecture table, when it says how llama.cpp writes it; a one-line
    :class:`GptoptError` naming the exportable families otherwise."""
    from gptopt_core.architectures import architecture_table

    found = architecture_of(model, plugins)
    if found is None:
        raise unsupported_architecture(model, "export --format gguf", plugins)
    if found.gguf is None:
        exportable = ", ".join(sorted(k for k, a in architecture_table(plugins).items() if a.gguf is not None))
        raise GptoptError(f"export --format gguf: llama.cpp has no architecture for '{found.model_type}' models "
                          f"(its row in the architecture table has no GGUF layout); exportable: {exportable}")
    return found


def architecture(model, plugins=None) -> str:
    """llama.cpp's architecture name for ``model`` (e.g. ``llama``, ``qwen3``, ``gptneox``)."""
    return family(model, plugins).gguf.arch


def unmerged_adapter(model) -> bool:
    """Whether PEFT adapter layers are still in the model (``lora`` without ``--merge``)."""
    if type(model).__name__.startswith("Peft"):
        return True
    return any(hasattr(m, "lora_A") for m in model.modules())


def permute_rows(n_rows: int, n_head: int):
    """Row order llama.cpp's converter gives q/k (``LlamaModel.permute``): within each head, the rotary halves
    are interleaved. Returned as an index tensor so values, codes and scales move together."""
    import torch

    idx = torch.arange(n_rows)
    return idx.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def qkv_rows(n_rows: int, n_head: int):
    """Row order of a fused qkv stored per head (``[head, (q, k, v), dim]``, GPT-NeoX) as llama.cpp's converter
    writes it: all q rows, then k, then v (``GPTNeoXModel.modify_tensors``)."""
    import torch

    return torch.arange(n_rows).reshape(n_head, 3, n_rows // n_head // 3).swapaxes(0, 1).reshape(n_rows)


def _bnb_kind(module) -> Optional[str]:
    names = [c.__name__ for c in type(module).__mro__]
    if "Linear8bitLt" in names or "Embedding8bit" in names:
        return "bnb-int8"
    if "Linear4bit" in names or "Embedding4bit" in names:
        return f"bnb-{module.weight.quant_type}"
    return None


def dequantized(module):
    """float32 ``(out, in)`` weight of a bitsandbytes layer: the core's one :func:`gptopt_core.dequantized_weight`."""
    from gptopt_core.kit.modules import dequantized_weight

    return dequantized_weight(module)


def _source(name, module, role, hf_name, rows=None) -> Source:
    """Describe ``module``'s weight (``nn.Linear``, ``Conv1D``, ``nn.Embedding`` or a bitsandbytes layer)."""
    import torch

    from gptopt_core.kit.grids import grid_of, on_grid
    from gptopt_core.kit.modules import weight_matrix

    kind = _bnb_kind(module)
    grid, codes, origin = None, None, "float"
    dtype = str(getattr(module.weight, "dtype", torch.float32)).replace("torch.", "")
    if kind is not None:
        values, origin = dequantized(module), kind
    else:
        values = weight_matrix(module).detach().float()
        attached = grid_of(module)
        if attached is not None:
            if on_grid(module, attached):
                grid, codes, origin = attached, attached.codes(values), "grid"
            else:
                origin = "grid-changed"  # a later step changed the weight: the grid no longer describes it
    if rows is not None:
        values = values[rows]
        if grid is not None:
            from gptopt_core.kit.grids import WeightGrid

            codes = codes[rows]
            grid = WeightGrid(bits=grid.bits, group_size=grid.group_size, symmetric=grid.symmetric,
                              scale=grid.scale[rows], zero=None if grid.zero is None else grid.zero[rows])
    return Source(name, values.contiguous(), origin, grid, codes, role, hf_name, dtype, module)


def _plain(name, tensor, role, hf_name, rows=None) -> Source:
    values = tensor.detach().float()
    if rows is not None:
        values = values[rows]
    return Source(name, values.contiguous(), "float", role=role, hf_name=hf_name,
                  float_dtype=str(tensor.dtype).replace("torch.", ""))


def _tied(model) -> bool:
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and head.weight is emb.weight or (
        head is not None and getattr(head, "tied_to_embedding", False))


def _row_orders(model, arch) -> dict:
    """``{qualified module name: row index}`` for the layers whose rows llama.cpp stores in another order."""
    cfg, layout = model.config, arch.gguf
    out = {}
    n_head = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_head
    blocks = model.get_submodule(arch.blocks)
    for i, block in enumerate(blocks):
        for rel, heads, order in ((layout.permute_qk[:1], n_head, permute_rows),
                                  (layout.permute_qk[1:], n_kv, permute_rows),
                                  ((layout.qkv_per_head,) if layout.qkv_per_head else (), n_head, qkv_rows)):
            for name in rel:
                module = block.get_submodule(name)
                rows = module.out_features if hasattr(module, "out_features") else module.weight.shape[0]
                out[f"{arch.blocks}.{i}.{name}"] = order(rows, n_head=heads)
    return out


def _role(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "embedding"
    if gguf_name == "output.weight":
        return "head"
    if gguf_name.startswith("position_embd"):
        return "position"
    if gguf_name.endswith(".bias"):
        return "bias"
    if ".ffn_gate_inp" in gguf_name:  # a MoE router (and Qwen2-MoE's shared-expert gate): f32, as the converter
        return "router"
    return "norm" if "norm" in gguf_name else "weight"


def _is_layer(module) -> bool:
    import torch.nn as nn

    from gptopt_core.kit.layertypes import is_weight_layer

    return is_weight_layer(module) or isinstance(module, nn.Embedding) or _bnb_kind(module) is not None


def sources(model, plugins=None) -> list[Source]:
    """Every tensor of ``model`` in llama.cpp's names and layouts (see the module docstring), then the tensors the
    family computes from the config (:attr:`gptopt_core.GgufLayout.extra_tensors`)."""
    import gguf
    import torch

    arch = family(model, plugins)
    layout = arch.gguf
    arch_id = {name: key for key, name in gguf.MODEL_ARCH_NAMES.items()}.get(layout.arch)
    if arch_id is None:
        raise GptoptError(f"export --format gguf: gguf-py {gguf.__version__ if hasattr(gguf, '__version__') else ''}"
                          f" does not know llama.cpp architecture '{layout.arch}'; upgrade the gguf package")
    names = gguf.get_tensor_name_map(arch_id, model.config.num_hidden_layers)
    rows = _row_orders(model, arch)
    tied, seen, out = _tied(model), set(), []
    head_module = model.get_output_embeddings()
    from .experts import expert_sources

    # fused experts -> llama.cpp's merged expert tensors
    merged = expert_sources(model, arch, names, Source) if arch.moe is not None else {}
    for mod_name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            if id(param) in merged:
                out.extend(merged[id(param)])
                continue
            if module is head_module and tied and pname == "weight":
                continue  # a head tied to the embedding: llama.cpp reads token_embd (or gets a copy below)
            hf = f"{mod_name}.{pname}" if mod_name else pname
            name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise GptoptError(f"export --format gguf: tensor '{hf}' has no name in llama.cpp's "
                                  f"'{layout.arch}' architecture (gguf-py's tensor map); this exporter cannot "
                                  f"write it")
            role, order = _role(name), rows.get(mod_name)
            if pname == "weight" and role != "position" and _is_layer(module):
                src = _source(name, module, role, mod_name, order)
            else:
                src = _plain(name, param, role, hf, order)
                if layout.norm_shift and role == "norm":
                    src.values = src.values + layout.norm_shift
            out.append(src)
    for name, values in layout.extra_tensors(model.config) if layout.extra_tensors else ():
        out.append(Source(name, torch.tensor(values, dtype=torch.float32), "float", role="rope", hf_name="config"))
    if tied and layout.head == "always":
        emb = next(s for s in out if s.role == "embedding")
        out.append(Source("output.weight", emb.values, emb.origin, emb.grid, emb.codes, "head", "lm_head",
                          emb.float_dtype))
    return out
