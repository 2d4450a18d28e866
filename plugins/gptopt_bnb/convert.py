"""Module conversion with bitsandbytes: Linear/Conv1D → Linear8bitLt / Linear4bit, Embedding → 8/4-bit embeddings,
model marking (so transformers, PEFT and ``save_pretrained`` treat it as a bitsandbytes model), and saving."""
from __future__ import annotations

import contextlib
import copy
import logging

import bitsandbytes as bnb
import torch
import torch.nn as nn
import torch.nn.functional as F

from gptopt_core import (GptoptError, get_module, is_conv1d, is_weight_layer, model_bytes, replace_module,
                         weight_matrix, weight_modules)

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


# -- what to quantize ---------------------------------------------------------------------------------------------
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


def layer_candidates(model, params) -> list[str]:
    """Qualified names of the linear / Conv1D layers selected by --include/--exclude."""
    found = weight_modules(model, params.include or None, params.exclude or None)
    if params.include and not found:
        raise GptoptError(f"quantize: --include {' '.join(params.include)} matches no linear/Conv1D layer; "
                          f"layer names look like '{weight_modules(model)[0][0]}'")
    if not found:
        raise GptoptError("quantize: no linear/Conv1D layer is left to quantize (check --include/--exclude)")
    return [n for n, _ in found]


def embedding_plan(model, layout, precision: str) -> dict:
    """Plan entries for the embeddings (all nn.Embedding) and the output head at ``precision``."""
    plan = {n: precision for n in layout["embeddings"]}
    if layout["head"]:
        plan[layout["head"]] = precision
    return plan


def check_plan_names(model, plan: dict) -> None:
    modules = dict(model.named_modules())
    for name in plan:
        module = modules.get(name)
        if module is None:
            close = [n for n in modules if n.endswith(name.split(".")[-1])][:1]
            raise GptoptError(f"quantize: the plan names module '{name}', which this model does not have"
                              + (f" (e.g. '{close[0]}')" if close else ""))
        if not (is_weight_layer(module) or is_embedding(module)):
            raise GptoptError(f"quantize: plan module '{name}' is a {type(module).__name__}, not a linear, Conv1D "
                              "or embedding layer")


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


# -- marking the model and saving ---------------------------------------------------------------------------------
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
            weight = nn.Parameter(dequantized_linear_weight(module), requires_grad=False)
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


def dequantized_linear_weight(module):
    if isinstance(module, bnb.nn.Linear8bitLt):
        cb = module.weight.data if module.weight.data.dtype == torch.int8 else module.state.CB
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return cb.float() * (scb.float().view(-1, 1) / 127.0)
    return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()


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


# -- the step -------------------------------------------------------------------------------------------------------
def resolve_plan(ctx, step) -> tuple[dict, dict | None]:
    """The per-module precision map to apply, and the planner's report (for --plan auto)."""
    p, s = step.params, step.settings()
    model = ctx.model
    layout = model_layout(model)
    if isinstance(p.plan, dict):
        check_plan_names(model, p.plan)
        return dict(p.plan), None
    emb_prec = None if p.embeddings == "keep" else ("int8" if p.embeddings == "8" else s["quant_type"])
    layers = layer_candidates(model, p)
    if p.plan == "auto":
        from .planner import auto_plan

        return auto_plan(ctx, step, layers, layout, emb_prec)
    prec = "int8" if p.bits == 8 else s["quant_type"]
    plan = {n: prec for n in layers}
    if emb_prec:
        plan.update(embedding_plan(model, layout, emb_prec))
    return plan, None


def quantize_model(ctx, step) -> dict:
    import time

    p, s = step.params, step.settings()
    model = ctx.model
    if getattr(model, "gptopt_bnb", None) is not None or quantized_layers(model):
        raise GptoptError("quantize: the model is already quantized; quantize once, with every option in one step")
    if p.plan is None and p.embeddings == "4" and model.get_input_embeddings().weight.shape[1] % s["block_size"]:
        ctx.log("  note: embedding width is not a multiple of the block size; 4-bit embeddings de-quantize whole")
    before = model_bytes(model)
    plan, report = resolve_plan(ctx, step)
    start = time.perf_counter()
    device = ctx.device
    with torch.no_grad():
        done = apply_plan(model, plan, s, device)
    seconds = time.perf_counter() - start
    mark_model(model, s)
    layers = quantized_layers(model)
    ctx.state["quantized"] = dict(layers)
    step.result_precisions = {bits_of(v) for v in layers.values()}
    # record the resolved plan in the recipe: a replay applies it without measuring again
    full_plan = {n: plan.get(n, "keep") for n in plan}
    if p.plan is not None:
        step.params = step.Params(**{**step.params.model_dump(
            exclude={"plan", "max_ppl_increase", "embeddings", "include", "exclude"}),
                                     "plan": full_plan})
        if ctx.records and ctx.records[-1].get("name") == step.name:
            ctx.records[-1]["params"] = step.params_dict()
    counts = {}
    for v in done.values():
        counts[v] = counts.get(v, 0) + 1
    metrics = {"quantized_modules": len(done), "precisions": counts, "bytes_before": before,
               "convert_seconds": round(seconds, 3)}
    if report is not None:
        metrics["plan"] = report
    ctx.log(f"  quantized {len(done)} modules: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return metrics
