"""Which tensors a GGUF file holds for a Hugging Face model, under llama.cpp's names and layouts.

The names and layouts follow llama.cpp's ``convert_hf_to_gguf.py`` (``LlamaModel``, ``GPT2Model``) and gguf-py's
``TENSOR_NAMES``: Llama's q/k projections have their rows permuted for llama.cpp's rotary layout, GPT-2's Conv1D
weights are transposed to ``(out, in)``, ``c_attn`` stays one fused ``attn_qkv``. Each weight is described by a
:class:`Source`: its float values as torch computes with them and, where the chain left one, the integer grid or
the bitsandbytes layer they came from, so the type chooser can write grids without re-rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from gptopt_core import GptoptError

SUPPORTED = ("llama", "gpt2")


@dataclass
class Source:
    """One tensor to write: ``values`` float32 torch tensor in the HF orientation after the llama.cpp layout
    (``(out, in)`` for weights), and where the values came from."""

    name: str  # GGUF tensor name, e.g. blk.0.attn_q.weight
    values: Any  # torch.Tensor float32
    origin: str  # "float" | "grid" | "bnb-int8" | "bnb-nf4" | "bnb-fp4" | "grid-changed"
    grid: Any = None  # gptopt_core.grids.WeightGrid (rows permuted like values) when origin == "grid"
    codes: Any = None  # int32 (out, in) codes on ``grid``
    role: str = "weight"  # "weight" | "embedding" | "head" | "norm" | "bias" | "position"
    hf_name: str = ""
    float_dtype: str = "float32"  # the dtype the layer computed in (auto keeps float layers there)
    module: Any = None  # the torch module the weight belongs to (imatrix: statistics by module -> GGUF name)


def architecture(model) -> str:
    """``llama`` or ``gpt2``; a :class:`GptoptError` naming the supported ones otherwise."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise GptoptError(f"export --format gguf: architecture '{kind}' is not supported; supported: "
                          f"{', '.join(SUPPORTED)} (Llama-family and GPT-2)")
    return kind


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


def _bnb_kind(module) -> Optional[str]:
    names = [c.__name__ for c in type(module).__mro__]
    if "Linear8bitLt" in names or "Embedding8bit" in names:
        return "bnb-int8"
    if "Linear4bit" in names or "Embedding4bit" in names:
        return f"bnb-{module.weight.quant_type}"
    return None


def dequantized(module):
    """float32 ``(out, in)`` weight of a bitsandbytes layer, through bitsandbytes' own functions."""
    import bitsandbytes as bnb
    import torch

    weight = module.weight
    kind = _bnb_kind(module)
    if kind == "bnb-int8":
        if hasattr(module, "dequantized_weight"):  # 8-bit embedding keeping its own row scales
            return module.dequantized_weight().float()
        codes = weight.data if weight.data.dtype == torch.int8 else module.state.CB
        scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(codes, scb).float()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


def _source(name, module, role, hf_name, rows=None) -> Source:
    """Describe ``module``'s weight (``nn.Linear``, ``Conv1D``, ``nn.Embedding`` or a bitsandbytes layer)."""
    import torch

    from gptopt_core import grid_of, on_grid, weight_matrix

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
            from gptopt_core import WeightGrid

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


def llama_sources(model) -> list[Source]:
    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    base = model.model
    out = [_source("token_embd.weight", base.embed_tokens, "embedding", "model.embed_tokens")]
    for i, layer in enumerate(base.layers):
        p, attn, mlp = f"blk.{i}.", layer.self_attn, layer.mlp
        hf = f"model.layers.{i}."
        q_rows = permute_rows(attn.q_proj.out_features if hasattr(attn.q_proj, "out_features")
                              else attn.q_proj.weight.shape[0], n_head)
        k_rows = permute_rows(attn.k_proj.out_features if hasattr(attn.k_proj, "out_features")
                              else attn.k_proj.weight.shape[0], n_kv)
        out.append(_plain(p + "attn_norm.weight", layer.input_layernorm.weight, "norm", hf + "input_layernorm"))
        for short, module, rows in (("attn_q", attn.q_proj, q_rows), ("attn_k", attn.k_proj, k_rows),
                                    ("attn_v", attn.v_proj, None), ("attn_output", attn.o_proj, None)):
            out.append(_source(p + short + ".weight", module, "weight", hf + "self_attn." + short, rows))
            if getattr(module, "bias", None) is not None:
                out.append(_plain(p + short + ".bias", module.bias, "bias", hf + short, rows))
        out.append(_plain(p + "ffn_norm.weight", layer.post_attention_layernorm.weight, "norm",
                          hf + "post_attention_layernorm"))
        for short, module in (("ffn_gate", mlp.gate_proj), ("ffn_up", mlp.up_proj), ("ffn_down", mlp.down_proj)):
            out.append(_source(p + short + ".weight", module, "weight", hf + "mlp." + short))
            if getattr(module, "bias", None) is not None:
                out.append(_plain(p + short + ".bias", module.bias, "bias", hf + short))
    out.append(_plain("output_norm.weight", base.norm.weight, "norm", "model.norm"))
    if not _tied(model):
        out.append(_source("output.weight", model.lm_head, "head", "lm_head"))
    return out


def gpt2_sources(model) -> list[Source]:
    base = model.transformer
    out = [_source("token_embd.weight", base.wte, "embedding", "transformer.wte"),
           _plain("position_embd.weight", base.wpe.weight, "position", "transformer.wpe")]
    for i, block in enumerate(base.h):
        p, hf = f"blk.{i}.", f"transformer.h.{i}."
        for short, norm in (("attn_norm", block.ln_1), ("ffn_norm", block.ln_2)):
            out.append(_plain(p + short + ".weight", norm.weight, "norm", hf + short))
            out.append(_plain(p + short + ".bias", norm.bias, "bias", hf + short))
        for short, module in (("attn_qkv", block.attn.c_attn), ("attn_output", block.attn.c_proj),
                              ("ffn_up", block.mlp.c_fc), ("ffn_down", block.mlp.c_proj)):
            out.append(_source(p + short + ".weight", module, "weight", hf + short))
            if getattr(module, "bias", None) is not None:
                out.append(_plain(p + short + ".bias", module.bias, "bias", hf + short))
    out.append(_plain("output_norm.weight", base.ln_f.weight, "norm", "transformer.ln_f"))
    out.append(_plain("output_norm.bias", base.ln_f.bias, "bias", "transformer.ln_f"))
    # llama.cpp's converter always writes GPT-2's output matrix (a copy of wte when tied)
    head = model.lm_head
    if _tied(model):
        out.append(Source("output.weight", out[0].values, out[0].origin, out[0].grid, out[0].codes, "head",
                          "lm_head", out[0].float_dtype))
    else:
        out.append(_source("output.weight", head, "head", "lm_head"))
    return out


def sources(model) -> list[Source]:
    """Every tensor of ``model`` in llama.cpp's names and layouts (see the module docstring)."""
    arch = architecture(model)
    return llama_sources(model) if arch == "llama" else gpt2_sources(model)
