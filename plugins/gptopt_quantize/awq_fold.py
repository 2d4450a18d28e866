"""Where AWQ's per-channel scales can be folded, per family, and the fold itself (exact before quantization).

A :class:`Pair` names, relative to a transformer block, the op whose output feeds some linear layers (``prev``: a
norm, or a linear layer's output rows) and those layers. Scaling the layers' input channels by ``s`` (weight columns
times ``s``) and dividing ``prev``'s output by ``s`` leaves the block's function unchanged:

* a norm: its weight (and bias) divided by ``s``; Gemma's RMSNorm scales by ``1 + w``, so ``w <- (1 + w) / s - 1``;
* a linear layer: the output rows that feed the layers (weight rows and bias) divided by ``s``. Attention: the value
  rows feed the output projection through the attention weights, which are linear in the values; with grouped-query
  attention one value row feeds ``heads / kv_heads`` input channels of the output projection, so those channels
  share one scale (their activation means are averaged: ``Pair.src`` maps each input channel to its value row);
* up -> down through ``act(gate) * up`` (linear in ``up``) and OPT's ``fc1 -> relu -> fc2`` (``relu(x / s) =
  relu(x) / s`` for ``s > 0``).

These per-family facts (norm module names, the value rows of fused projections) are not in the core architecture
table; they live here. Skipped, one line each: GPT-2's ``c_fc -> c_proj`` and GPT-NeoX's ``dense_h_to_4h ->
dense_4h_to_h`` (GELU between them is not scale-equivariant); OPT's ``fc1 -> fc2`` unless its activation is ReLU,
and OPT's norm pairs when the norm comes after the block (``do_layer_norm_before=False``: the norm's output is also
the residual stream).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from gptopt_core import GptoptError
from gptopt_core.architectures import architecture_of, architecture_table
from gptopt_core.kit.layertypes import is_weight_layer
from gptopt_core.kit.modules import weight_matrix


@dataclass(frozen=True)
class Pair:
    """``prev`` (relative to the block) feeds ``layers``; ``src(config) -> [prev row per input channel]`` or
    ``None`` (channel ``i`` comes from row ``i``)."""

    prev: str
    layers: tuple
    src: Optional[Callable] = None

    def key(self, block_name: str) -> str:
        return f"{block_name}.{self.prev}->{'|'.join(n.rsplit('.', 1)[-1] for n in self.layers)}"


def _dims(cfg):
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return heads, kv, head_dim


def _value_rows(offset: Callable = lambda cfg: 0, stride: Callable = None):
    """``src`` of an output projection fed by value rows starting at ``offset(cfg)``; a kv head's rows at
    ``offset + kv * stride(cfg)`` (contiguous heads: ``stride = head_dim``), repeated for the heads sharing it."""
    def src(cfg):
        heads, kv, d = _dims(cfg)
        step = stride(cfg) if stride else d
        rep = heads // kv
        return [offset(cfg) + (h // rep) * step + j for h in range(heads) for j in range(d)]
    return src


def _shifted(offset: Callable, width: Callable):
    def src(cfg):
        return [offset(cfg) + i for i in range(width(cfg))]
    return src


LLAMA_PAIRS = (Pair("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               Pair("self_attn.v_proj", ("self_attn.o_proj",), _value_rows()),
               Pair("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
               Pair("mlp.up_proj", ("mlp.down_proj",)))
GEMMA2_PAIRS = LLAMA_PAIRS[:2] + (Pair("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
                                  LLAMA_PAIRS[3])
PHI3_PAIRS = (Pair("input_layernorm", ("self_attn.qkv_proj",)),
              Pair("self_attn.qkv_proj", ("self_attn.o_proj",),
                   _value_rows(lambda cfg: (_dims(cfg)[0] + _dims(cfg)[1]) * _dims(cfg)[2])),
              Pair("post_attention_layernorm", ("mlp.gate_up_proj",)),
              Pair("mlp.gate_up_proj", ("mlp.down_proj",),
                   _shifted(lambda cfg: cfg.intermediate_size, lambda cfg: cfg.intermediate_size)))
NEOX_PAIRS = (Pair("input_layernorm", ("attention.query_key_value",)),
              Pair("attention.query_key_value", ("attention.dense",),
                   _value_rows(lambda cfg: 2 * _dims(cfg)[2], lambda cfg: 3 * _dims(cfg)[2])),
              Pair("post_attention_layernorm", ("mlp.dense_h_to_4h",)))
OPT_NORM_PAIRS = (Pair("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                  Pair("final_layer_norm", ("fc1",)))
OPT_LINEAR_PAIRS = (Pair("self_attn.v_proj", ("self_attn.out_proj",), _value_rows()),)
GPT2_PAIRS = (Pair("ln_1", ("attn.c_attn",)),
              Pair("attn.c_attn", ("attn.c_proj",), _value_rows(lambda cfg: 2 * cfg.hidden_size)),
              Pair("ln_2", ("mlp.c_fc",)))


def _opt_pairs(cfg) -> tuple:
    pairs = OPT_LINEAR_PAIRS
    if getattr(cfg, "activation_function", None) == "relu":
        pairs = pairs + (Pair("fc1", ("fc2",)),)
    if getattr(cfg, "do_layer_norm_before", True):
        pairs = OPT_NORM_PAIRS + pairs
    return pairs


#: model_type -> (config -> pairs). Kept here, not in the architecture table (module names of norms and fused rows
#: are facts only AWQ needs); a family not listed is refused by ``quantize --awq`` in one line.
FAMILY_PAIRS = {
    "llama": lambda cfg: LLAMA_PAIRS, "mistral": lambda cfg: LLAMA_PAIRS, "qwen2": lambda cfg: LLAMA_PAIRS,
    "qwen3": lambda cfg: LLAMA_PAIRS, "gemma": lambda cfg: LLAMA_PAIRS, "gemma2": lambda cfg: GEMMA2_PAIRS,
    "gemma3_text": lambda cfg: GEMMA2_PAIRS, "phi3": lambda cfg: PHI3_PAIRS, "gpt_neox": lambda cfg: NEOX_PAIRS,
    "opt": _opt_pairs, "gpt2": lambda cfg: GPT2_PAIRS,
}


def family_pairs(model) -> tuple:
    """``(architecture row, pairs)`` for ``model``; :class:`GptoptError` (one line) for a family AWQ cannot scale."""
    arch = architecture_of(model)
    if arch is None or arch.model_type not in FAMILY_PAIRS:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        known = ", ".join(sorted(k for k in FAMILY_PAIRS if k in architecture_table()))
        raise GptoptError(f"quantize --awq: no scale/fold pairs are known for architecture '{kind}' (known: {known})")
    return arch, FAMILY_PAIRS[arch.model_type](model.config)


def source_rows(pair: Pair, config, width: int, device):
    """LongTensor ``(width,)``: the ``prev`` output row feeding each of the layers' ``width`` input channels."""
    import torch

    rows = list(range(width)) if pair.src is None else pair.src(config)
    if len(rows) != width:
        raise GptoptError(f"quantize --awq: {pair.prev} -> {', '.join(pair.layers)}: {len(rows)} source rows for "
                          f"{width} input channels (the config does not describe this block's shapes)")
    return torch.tensor(rows, dtype=torch.long, device=device)


def fold_scales(block, pair: Pair, scales, rows, norm: str) -> None:
    """Multiply ``pair.layers``' input channels by ``scales`` ``(in,)`` and divide ``pair.prev``'s output rows
    ``rows`` by them (see the module docstring); channels sharing a row must share a scale."""
    import torch

    modules = dict(block.named_modules())
    prev = modules[pair.prev]
    s = scales.detach().float()
    with torch.no_grad():
        if is_weight_layer(prev):
            w = weight_matrix(prev)
            w[rows] = (w[rows].float() / s.to(w.device)[:, None]).to(w.dtype)
        elif norm == "rmsnorm(1+w)":
            w = prev.weight
            w[rows] = ((1 + w[rows].float()) / s.to(w.device) - 1).to(w.dtype)
        else:
            w = prev.weight
            w[rows] = (w[rows].float() / s.to(w.device)).to(w.dtype)
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias[rows] = (bias[rows].float() / s.to(bias.device)).to(bias.dtype)
        for name in pair.layers:
            w = weight_matrix(modules[name])
            w.mul_(s.to(w.device, w.dtype)[None, :])
