"""Module conversion with bitsandbytes: Linear/Conv1D → Linear8bitLt / Linear4bit, Embedding → 8/4-bit embeddings,
and applying a per-module precision plan to a model. Marking and saving the result: :mod:`.saving`; the quantize
workflow (which plan, then apply, mark, record): :mod:`.workflow`."""
from __future__ import annotations

import copy
import logging

import bitsandbytes as bnb
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptopt_core.kit.modules import weight_matrix
from gptopt_core.kit.sensitivity import get_module, replace_module

# LLM.int8 casts fp32 activations to fp16 by design; bitsandbytes logs that on every matmul
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FOUR_BIT = ("nf4", "fp4")


# -- embeddings that can be saved (bitsandbytes' raise NotImplementedError in _save_to_state_dict) -------------
class QuantEmbedding8bit(bnb.nn.Embedding8bit):
    """``bnb.nn.Embedding8bit`` that keeps its row scales on the module (robust to a head sharing the weight)
    and writes a state dict (int8 rows + ``SCB``), so ``model.state_dict()`` keeps working."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        destination[prefix + "SCB"] = self.scb if keep_vars else self.scb.detach()

    def forward(self, input):
        rows = F.embedding(input, self.weight.data)
        scale = F.embedding(input, self.scb.view(self.num_embeddings, 1))
        return (rows * (scale / 127.0)).to(self.dtype)

    def dequantized_weight(self):
        return self.weight.data.float() * (self.scb.float().view(-1, 1) / 127.0)


class QuantEmbedding4bit(bnb.nn.Embedding4bit):
    """``bnb.nn.Embedding4bit`` that writes a state dict (packed weight + quant state)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach()
        for k, v in self.weight.quant_state.as_dict(packed=True).items():
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def dequantized_weight(self):
        return bnb.functional.dequantize_4bit(self.weight.data, self.weight.quant_state)


class _ScaledLookup:
    """A scaled token embedding (transformers' ``Gemma*ScaledWordEmbedding``, the architecture table's
    ``embedding_scale``): the quantized lookup times the module's ``embed_scale``, as the float module computes."""

    def forward(self, input):
        out = super().forward(input)
        return out * self.embed_scale.to(out.dtype)


class ScaledQuantEmbedding8bit(_ScaledLookup, QuantEmbedding8bit):
    pass


class ScaledQuantEmbedding4bit(_ScaledLookup, QuantEmbedding4bit):
    pass


def is_embedding(module) -> bool:
    """A float token / position embedding this plugin can quantize: ``nn.Embedding``, or a subclass that only
    scales its output by ``embed_scale`` (Gemma)."""
    return type(module) is nn.Embedding or (isinstance(module, nn.Embedding) and hasattr(module, "embed_scale")
                                            and not isinstance(module, (QuantEmbedding8bit, QuantEmbedding4bit)))


def precision_of(module) -> str | None:
    """"int8", "nf4", "fp4" for a bitsandbytes module, None otherwise."""
    if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Embedding8bit)):
        return "int8"
    if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)):
        return module.weight.quant_type
    return None


def bits_of(precision: str) -> str:
    return "8bit" if precision == "int8" else "4bit"


# -- building quantized modules ---------------------------------------------------------------------------------
def guard_cpu_repack(module, out_features: int, in_features: int, block_size: int) -> None:
    """Keep bitsandbytes' AVX512-BF16 CPU repacking off layers whose shape it cannot repack.

    On CPUs with AVX512-BF16, ``Linear4bit.forward`` repacks the weight for a faster kernel on first use; the
    repacking needs ``out_features % 32 == 0`` and ``in_features % block_size == 0`` and fails inside forward
    otherwise (e.g. a 257-token vocabulary head, or 64-wide inputs with 128-weight blocks). Such layers keep the
    generic kernel; every other layer keeps the fast path.
    """
    if out_features % 32 or in_features % block_size or in_features % 2:
        module.support_avx512bf16_for_cpu = False


def make_linear(module, precision: str, s: dict, device):
    """A bitsandbytes copy of a ``nn.Linear`` or GPT-2 ``Conv1D`` (weight taken as (out, in))."""
    w = weight_matrix(module).detach()
    out_f, in_f = w.shape
    bias = module.bias
    if precision == "int8":
        new = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False,
                                  threshold=s["int8_threshold"], device="meta")
        new.weight = bnb.nn.Int8Params(w.to("cpu").contiguous(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
    elif precision in FOUR_BIT:
        new = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=DTYPES[s["compute_dtype"]],
                                compress_statistics=s["double_quant"], quant_type=precision, device="meta")
        new.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, blocksize=s["block_size"],
                                       compress_statistics=s["double_quant"], quant_type=precision,
                                       module=new).to(device)
        guard_cpu_repack(new, out_f, in_f, s["block_size"])
    else:
        raise ValueError(precision)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
    new.source_cls = type(module)  # transformers' bnb integration reads this (Conv1D orientation)
    new.train(module.training)
    return new


def make_embedding(module, precision: str, s: dict, device):
    num, dim = module.weight.shape
    w = module.weight.detach()
    scaled = getattr(module, "embed_scale", None)
    if precision == "int8":
        new = (QuantEmbedding8bit if scaled is None else ScaledQuantEmbedding8bit)(num, dim, device="meta")
        new.weight = bnb.nn.Int8Params(w.to("cpu").contiguous(), requires_grad=False,
                                       has_fp16_weights=False).to(device)
        new.scb = new.weight.SCB
    elif precision in FOUR_BIT:
        new = (QuantEmbedding4bit if scaled is None else ScaledQuantEmbedding4bit)(num, dim, quant_type=precision,
                                                                                 device="meta")
        # no double quantization: the 4-bit embedding gathers per-row block scales directly
        new.weight = bnb.nn.Params4bit(w.contiguous(), requires_grad=False, blocksize=s["block_size"],
                                       compress_statistics=False, quant_type=precision, module=new).to(device)
    else:
        raise ValueError(precision)
    new.dtype = w.dtype
    new.padding_idx = module.padding_idx
    if scaled is not None:
        new.register_buffer("embed_scale", scaled.detach().clone().to(device), persistent=False)
    new.train(module.training)
    return new


def make_tied_head(head, embedding, s: dict):
    """An output head that computes with the quantized embedding's storage (tied weights stay tied)."""
    vocab, dim = embedding.weight.shape
    if isinstance(embedding, QuantEmbedding8bit):
        new = bnb.nn.Linear8bitLt(dim, vocab, bias=False, has_fp16_weights=False, threshold=s["int8_threshold"],
                                  device="meta")
        weight = bnb.nn.Int8Params(embedding.weight.data, requires_grad=False, has_fp16_weights=False)
        weight.CB, weight.SCB = embedding.weight.data, embedding.scb
        new.weight = weight
    else:
        qt = embedding.weight.quant_type
        new = bnb.nn.Linear4bit(dim, vocab, bias=False, compute_dtype=DTYPES[s["compute_dtype"]],
                                compress_statistics=False, quant_type=qt, device="meta")
        state = copy.copy(embedding.weight.quant_state)  # the CPU kernel may repack the head's copy in place
        new.weight = bnb.nn.Params4bit(embedding.weight.data, requires_grad=False, quant_state=state,
                                       blocksize=embedding.weight.blocksize, compress_statistics=False,
                                       quant_type=qt, bnb_quantized=True, module=new)
        new.quant_state = state
        guard_cpu_repack(new, vocab, dim, embedding.weight.blocksize)
    if head.bias is not None:
        new.bias = nn.Parameter(head.bias.detach().clone(), requires_grad=False)
    new.source_cls = type(head)
    new.tied_to_embedding = True
    return new


# -- applying a plan ----------------------------------------------------------------------------------------------
def model_layout(model):
    """Names of the embeddings, the output head, and whether the head is tied to the input embedding."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {id(m): n for n, m in model.named_modules()}
    embeddings = [n for n, m in model.named_modules() if is_embedding(m)]
    emb_name = names.get(id(emb))
    head_name = names.get(id(head)) if head is not None else None
    tied = bool(head is not None and emb is not None and head.weight.data_ptr() == emb.weight.data_ptr())
    return {"embeddings": embeddings, "input_embedding": emb_name, "head": head_name, "tied": tied}


def apply_plan(model, plan: dict, s: dict, device) -> dict:
    """Replace every module named in ``plan`` by its quantized form; returns {name: precision} of what changed."""
    layout = model_layout(model)
    done = {}
    emb_name, head_name = layout["input_embedding"], layout["head"]
    order = sorted(plan, key=lambda n: (n != emb_name, n == head_name))  # embedding first, head last
    for name in order:
        precision = plan[name]
        if precision == "keep":
            continue
        module = get_module(model, name)
        if is_embedding(module):
            new = make_embedding(module, precision, s, device)
        elif name == head_name and layout["tied"] and done.get(emb_name) == precision:
            new = make_tied_head(module, get_module(model, emb_name), s)
        else:
            new = make_linear(module, precision, s, device)
        replace_module(model, name, new)
        done[name] = precision
    return done
