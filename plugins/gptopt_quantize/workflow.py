"""The quantize workflow with bitsandbytes: which modules get which precision (all, --include/--exclude, embeddings,
a given plan, or ``--plan auto``'s search in :mod:`.planner`), then converting them (:mod:`.convert`), marking the
model (:mod:`.saving`) and recording the resolved plan in the recipe."""
from __future__ import annotations

import time

import torch

from gptopt_core import GptoptError
from gptopt_core.kit.layertypes import is_weight_layer
from gptopt_core.kit.metrics import model_bytes
from gptopt_core.kit.modules import weight_modules

from .convert import apply_plan, bits_of, is_embedding, model_layout
from .planner import auto_plan
from .saving import mark_model, quantized_layers


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
        return auto_plan(ctx, step, layers, layout, emb_prec)
    prec = "int8" if p.bits == 8 else s["quant_type"]
    plan = {n: prec for n in layers}
    if emb_prec:
        plan.update(embedding_plan(model, layout, emb_prec))
    return plan, None


def quantize_model(ctx, step) -> dict:
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
