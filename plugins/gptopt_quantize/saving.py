"""Marking a quantized model so transformers, PEFT (QLoRA) and ``save_pretrained`` treat it as a bitsandbytes model,
and saving it so plain ``AutoModelForCausalLM.from_pretrained(dir)`` loads it back."""
from __future__ import annotations

import contextlib

import bitsandbytes as bnb
import torch
import torch.nn as nn

from gptopt_core.kit.layertypes import is_weight_layer
from gptopt_core.kit.modules import dequantized_weight
from gptopt_core.kit.sensitivity import replace_module

from .convert import FOUR_BIT, QuantEmbedding4bit, QuantEmbedding8bit, precision_of


def quantized_layers(model):
    return {n: precision_of(m) for n, m in model.named_modules() if precision_of(m) is not None}


def hf_config(model, four_bit_state=None):
    """A ``BitsAndBytesConfig`` describing the model's linear layers of one precision; every other weight layer
    is listed in ``llm_int8_skip_modules``. Returns ``None`` when no bitsandbytes linear layer is left."""
    from transformers import BitsAndBytesConfig

    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or is_weight_layer(m)}
    four = {n: m for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    eight = {n: m for n, m in linears.items() if isinstance(m, bnb.nn.Linear8bitLt)}
    if not four and not eight:
        return None
    chosen = four or eight
    skip = sorted(n for n in linears if n not in chosen)
    meta = getattr(model, "gptopt_bnb", {}) or {}
    s = meta.get("settings", {})
    if four:
        first = next(iter(four.values()))
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=first.weight.quant_type,
                                  bnb_4bit_use_double_quant=bool(first.weight.compress_statistics),
                                  bnb_4bit_compute_dtype=first.compute_dtype or torch.float32,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=s.get("int8_threshold", 6.0),
                              llm_int8_skip_modules=skip)


def mark_model(model, settings: dict) -> None:
    """Make the model look like one transformers loaded with bitsandbytes (``hf_quantizer``,
    ``config.quantization_config``, ``is_loaded_in_4bit/8bit``), which PEFT (QLoRA) and ``save_pretrained`` read."""
    from transformers.quantizers import AutoHfQuantizer

    layers = quantized_layers(model)
    model.gptopt_bnb = {"settings": settings, "layers": layers}
    linear_precisions = {precision_of(m) for m in model.modules()
                         if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    model.is_loaded_in_4bit = any(p in FOUR_BIT for p in linear_precisions)
    model.is_loaded_in_8bit = "int8" in linear_precisions
    cfg = hf_config(model)
    if cfg is not None:
        model.config.quantization_config = cfg
        model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
        model.is_quantized = True
        model.quantization_method = cfg.quant_method


@contextlib.contextmanager
def plain_stand_ins(model):
    """Temporarily swap the modules one ``BitsAndBytesConfig`` cannot describe (8-bit layers in a 4-bit model,
    quantized embeddings, a head tied to them) for plain modules holding their de-quantized weights."""
    four = any(isinstance(m, bnb.nn.Linear4bit) and not getattr(m, "tied_to_embedding", False)
               for m in model.modules())
    layout_emb = model.get_input_embeddings()
    swapped = []
    emb_params = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, (QuantEmbedding8bit, QuantEmbedding4bit)):
            new = nn.Embedding(module.num_embeddings, module.embedding_dim, padding_idx=module.padding_idx,
                               device="meta")
            new.weight = nn.Parameter(module.dequantized_weight().to(module.dtype), requires_grad=False)
            emb_params[id(module)] = new.weight
            swapped.append((name, module, new))
    by_name = {n: new for n, _, new in swapped}
    for name, module in list(model.named_modules()):
        tied = getattr(module, "tied_to_embedding", False)
        mixed = four and isinstance(module, bnb.nn.Linear8bitLt)
        if not (tied or mixed):
            continue
        if tied and id(layout_emb) in emb_params:
            weight = emb_params[id(layout_emb)]
        else:
            weight = nn.Parameter(dequantized_weight(module), requires_grad=False)
        src = getattr(module, "source_cls", nn.Linear)
        if src is not nn.Linear and is_conv1d_class(src):
            new = src(weight.shape[0], weight.shape[1])
            new.weight = nn.Parameter(weight.t().contiguous(), requires_grad=False)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
            new.weight = weight
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        swapped.append((name, module, new))
        by_name[name] = new
    for name, _, new in swapped:
        replace_module(model, name, new)
    try:
        yield
    finally:
        for name, old, _ in swapped:
            replace_module(model, name, old)


def is_conv1d_class(cls) -> bool:
    return cls.__name__ == "Conv1D"


def save_quantized(model, path) -> None:
    """``save_pretrained`` with a ``quantization_config`` that plain ``from_pretrained(dir)`` loads back."""
    from transformers.quantizers import AutoHfQuantizer

    with plain_stand_ins(model):
        cfg = hf_config(model)
        saved = (getattr(model.config, "quantization_config", None), getattr(model, "hf_quantizer", None))
        if cfg is not None:
            model.config.quantization_config = cfg
            model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=True)
        else:  # only embeddings were quantized: they are saved de-quantized, as a plain model
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
        try:
            model.save_pretrained(str(path), safe_serialization=True)
        finally:
            if saved[0] is not None:
                model.config.quantization_config = saved[0]
            model.hf_quantizer = saved[1]
