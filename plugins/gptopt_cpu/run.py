"""What ``cpu-fast`` does when it runs: one format (with the guard), or ``auto``'s measured choice."""
from __future__ import annotations

import copy
import gc

import torch

from gptopt_core import GptoptError
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.metrics import model_bytes

from .convert import BF16_BASED, INT8_FORMATS, compile_model, convert_model, float_dtype, torchao_problem
from .guard import guard_plan
from .report import table_lines
from .timing import interleaved


def convert_with_guard(ctx, model, fmt: str, params, guard: bool, blocks=None) -> tuple[dict, dict]:
    """Convert ``model`` in place to ``fmt``; returns (conversion record, metrics)."""
    keep = list(params.keep)
    metrics = {}
    if fmt in BF16_BASED:
        model.to(float_dtype(fmt))  # the guard measures (and kept layers stay) in the format's float dtype
    if fmt in INT8_FORMATS and guard:
        if blocks is None:
            blocks = ctx.calibration_blocks(params.calib_blocks, params.calib_seq_len)
        info = guard_plan(model, fmt, blocks, params.guard_budget, keep=keep, progress=ctx.progress,
                          log=ctx.log)
        keep += info["keep"]
        metrics.update(guard_kept_layers=len(info["keep"]), calib_ppl_ratio=info["calib_ppl_ratio"],
                       plain_calib_ppl_ratio=info["plain_calib_ppl_ratio"])
        if info.get("sensitivity"):
            metrics["guard_most_sensitive"] = list(info["sensitivity"])[:5]
    converted = convert_model(model, fmt, keep=keep if fmt in INT8_FORMATS else ())
    record = {"format": fmt, "converted": sorted(converted), "keep": sorted(set(keep)) if fmt in INT8_FORMATS else []}
    model.gptopt_cpu = record
    metrics.update(format=fmt, converted_layers=len(converted), kept_layers=record["keep"])
    return record, metrics


def moe_dtypes(model) -> dict:
    """What the conversion did to a mixture of experts (``{}`` for a dense model): bf16 casts the fused expert
    weights and routers with the model; the int8 formats convert linear layers only, so experts and routers stay
    float32."""
    from gptopt_core.kit.experts import moe_effect, moe_layers

    blocks = moe_layers(model)
    if not blocks:
        return {}
    experts = str(blocks[0].experts.gate_up_proj.dtype).replace("torch.", "")
    router = str(blocks[0].router.weight.dtype).replace("torch.", "")
    why = "cast with the model" if experts != "float32" else "left float: the int8 formats convert linear layers only"
    return moe_effect(model, f"{experts} ({why})", f"{router} (not quantized)")


def run_cpu_fast(ctx, step) -> dict:
    p = step.params
    model = ctx.model
    if any(t.dtype != torch.float32 for t in model.parameters()):
        model.float()
    model.eval()
    if p.format != "auto":
        _, metrics = convert_with_guard(ctx, model, p.format, p, p.guard)
        step.result_format = p.format
        _note(ctx, p.format, metrics)
        if p.compile and compiles(p.format):
            _compile(model, metrics)
        _record_state(ctx)
        return metrics
    return run_auto(ctx, step)


def compiles(fmt: str) -> bool:
    """``--compile`` applies to every format but ``int8-dynamic`` (its quantized modules run eager)."""
    return fmt != "int8-dynamic"


def _compile(model, metrics) -> None:
    compile_model(model)
    model.gptopt_cpu["compile"] = True
    metrics["compiled"] = True


def _record_state(ctx) -> None:
    """``ctx.state["quantized"]``: {module name: format} of the converted layers (the cross-plugin key)."""
    record = ctx.model.gptopt_cpu
    ctx.state.setdefault("quantized", {}).update({name: record["format"] for name in record["converted"]})


def _note(ctx, fmt, metrics):
    if "calib_ppl_ratio" in metrics:
        ctx.log(f"  {fmt}: {metrics['converted_layers']} layers converted, {metrics['guard_kept_layers']} kept in "
                f"float32 by the guard; calibration ppl x{metrics['calib_ppl_ratio']:.3f} "
                f"(all converted: x{metrics['plain_calib_ppl_ratio']:.3f})")


def candidate_list(params, log) -> list[str]:
    wanted = params.wanted_candidates()
    problem = torchao_problem() if any(c.startswith("ao-") for c in wanted) else None
    out = []
    for c in wanted:
        if c.startswith("ao-") and problem:
            if params.candidates:
                raise GptoptError(f"cpu-fast: candidate {c}: {problem}")
            log(f"  auto: skipping {c}: {problem}")
            continue
        out.append(c)
    return out


def run_auto(ctx, step) -> dict:
    """``--format auto``: convert a copy per candidate, measure each one's ppl and decode speed, keep the fastest
    within the budget."""
    p = step.params
    ids = _selection_ids(ctx, p)
    prompt = _prompt(ctx, p)
    blocks = ctx.calibration_blocks(p.calib_blocks, p.calib_seq_len)
    models, info = convert_candidates(ctx, ctx.model, candidate_list(p, ctx.log), p, blocks)
    rows = measure_quality(ctx, models, info, ids, p)
    measure_speed(ctx, models, info, rows, prompt, p)
    table, chosen = choose(rows, p)
    _print_table(ctx, table, p)
    if chosen is None:
        best = min((r for r in table if r["format"] != "fp32"), key=lambda r: r["ppl_ratio"])
        raise GptoptError(f"cpu-fast auto: no format stays within --max-ppl-increase {p.max_ppl_increase:.1%} "
                          f"(closest: {best['format']} at ppl x{best['ppl_ratio']:.3f}); raise the budget or keep the "
                          f"model as it is")
    label = chosen["format"]
    _adopt(ctx, step, models, info, label)
    metrics = dict(info[label]["metrics"])
    metrics.update(auto_choice=label, auto_table=[dict(r) for r in table],
                   auto_decode_speedup=chosen["decode_speedup"], auto_ppl_ratio=chosen["ppl_ratio"],
                   auto_decode_tokens_per_s=chosen["decode_tokens_per_s"], auto_split=p.select_on)
    if p.select_on == "valid":
        metrics["perplexity"] = chosen["perplexity"]
    ctx.log(f"  auto: chose {label}: decode x{chosen['decode_speedup']:.2f} at ppl x{chosen['ppl_ratio']:.3f} "
            f"(budget x{1.0 + p.max_ppl_increase:.3f})")
    return metrics


def _selection_ids(ctx, p):
    """The tokens auto's perplexities are measured on (``--select-on``), at least one block of them."""
    ids = ctx.data.valid_ids if p.select_on == "valid" else ctx.data.train_ids
    if ids.numel() < p.block_size + 1:
        raise GptoptError(f"cpu-fast auto: the {p.select_on} split has {ids.numel()} tokens, fewer than one block of "
                          f"{p.block_size}+1; give more text or a smaller --block-size")
    return ids


def convert_candidates(ctx, base, names, p, blocks) -> tuple[dict, dict]:
    """``({label: model}, {label: info})``: the fp32 model as it is, and a converted copy per candidate (plus the
    plain, unguarded int8-dynamic next to a guarded one that kept layers)."""
    models, info = {"fp32": base}, {"fp32": {"format": "fp32", "kept": 0, "record": None}}
    for fmt in names:
        ctx.log(f"  auto: converting a copy to {fmt}")
        m = copy.deepcopy(base)
        record, metrics = convert_with_guard(ctx, m, fmt, p, p.guard, blocks)
        models[fmt], info[fmt] = m, {"format": fmt, "kept": len(record["keep"]), "record": record,
                                     "metrics": metrics}
        if fmt == "int8-dynamic" and p.guard and record["keep"] and not p.keep:
            # the plain conversion (every linear layer), shown next to the guarded one (and a candidate like any other)
            plain = copy.deepcopy(base)
            record2, metrics2 = convert_with_guard(ctx, plain, fmt, p, False)
            models["int8-dynamic-plain"] = plain
            info["int8-dynamic-plain"] = {"format": fmt, "kept": 0, "record": record2, "metrics": metrics2}
    return models, info


def measure_quality(ctx, models, info, ids, p) -> dict:
    """One table row per candidate: perplexity on ``ids`` (measured eagerly: torch.compile fuses ops, it does not
    change the weights) and model bytes."""
    rows = {}
    for label, m in ctx.progress(list(models.items()), "auto: perplexity"):
        r = perplexity(m, ids, p.block_size, p.block_size, p.eval_tokens)
        rows[label] = {"format": label, "kept_layers": info[label]["kept"], "perplexity": r["perplexity"],
                       "model_bytes": model_bytes(m)}
    return rows


def measure_speed(ctx, models, info, rows, prompt, p) -> None:
    """Decode speed of every candidate, interleaved, into ``rows`` (with ``--compile`` on compiled models: they
    compile in the speed test's warm-up run), and each row's ppl ratio and budget verdict."""
    for label, m in models.items():
        rows[label]["compiled"] = bool(p.compile and label != "fp32" and compiles(info[label]["format"]))
        if rows[label]["compiled"]:
            _compile(m, info[label]["metrics"])
    if p.compile:
        ctx.log("  auto: compiling (torch.compile, inductor) in the speed test's warm-up")
    speed = interleaved(models, prompt, p.new_tokens, p.rounds, warmup=2 if p.compile else 1,
                        pad_token_id=_pad(ctx), progress=ctx.progress)
    ref = rows["fp32"]
    for label, row in rows.items():
        row["ppl_ratio"] = row["perplexity"] / ref["perplexity"]
        row["decode_tokens_per_s"] = speed[label]["decode_tokens_per_s"]
        row["decode_speedup"] = speed[label]["decode_tokens_per_s"] / speed["fp32"]["decode_tokens_per_s"]
        row["prefill_ms"] = speed[label]["prefill_ms"]
        row["within_budget"] = row["ppl_ratio"] <= 1.0 + p.max_ppl_increase


def choose(rows: dict, p) -> tuple[list[dict], dict | None]:
    """``(table, chosen row)``: the fastest decoder among the converted formats within the budget (``None`` if
    none is); every row marked ``chosen`` or not."""
    eligible = [r for label, r in rows.items() if label != "fp32" and r["within_budget"]]
    table = list(rows.values())
    chosen = max(eligible, key=lambda r: r["decode_tokens_per_s"]) if eligible else None
    for r in table:
        r["chosen"] = chosen is not None and r is chosen
    return table, chosen


def _adopt(ctx, step, models, info, label) -> None:
    """Make the chosen candidate the run's model and free the others."""
    ctx.model = models[label]
    step.result_format = info[label]["format"]
    for other in list(models):
        if other != label:
            models.pop(other)
    gc.collect()
    _record_state(ctx)


def _pad(ctx):
    tok = ctx.tokenizer
    pad = getattr(tok, "pad_token_id", None)
    return pad if pad is not None else (getattr(tok, "eos_token_id", None) or 0)


def _prompt(ctx, p):
    ids = ctx.data.valid_ids.reshape(-1)
    if ids.numel() < p.prompt_tokens:
        ids = ids.repeat(p.prompt_tokens // max(ids.numel(), 1) + 1)
    return ids[:p.prompt_tokens].unsqueeze(0).to(ctx.device)


def _print_table(ctx, table, p) -> None:
    ctx.log(f"  cpu-fast auto: ppl on the {p.select_on} split, budget x{1 + p.max_ppl_increase:.3f}; decode speed "
            f"interleaved over {p.rounds} rounds (medians)")
    if ctx.quiet or ctx.console is None or not ctx.is_main_process:
        return
    for line in table_lines(table):
        ctx.console.print("    " + line, soft_wrap=True, markup=False, highlight=False)
