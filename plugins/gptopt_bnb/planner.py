"""``quantize --plan auto``: per-module precision (4-bit, int8, kept) that minimises bytes within a ppl budget.

1. Measure each unit's calibration-loss change when it alone goes to 4 bits (``gptopt_core.sensitivity``).
2. Order the units by that change per byte saved (4-bit vs int8): the most sensitive per byte first.
3. Plan(k) puts the first k units in int8 and the rest in 4-bit; binary-search the smallest k whose *measured*
   calibration ppl (all replacements at once) is within the budget. If even all-int8 is over budget, layers
   are kept at full precision in order of sensitivity, again by binary search.
Step 1 runs one partial forward per module, so it uses few tokens (``calib_blocks``); the whole-plan checks of
step 3 are a handful of forwards, so they use more (``check_blocks``): on SmolLM2, 1,024 calibration tokens
put an all-int8-plus-half-nf4 plan *below* the dense model (x0.97) and the chosen plan missed the budget on
held-out text; the checks decide the plan, so they get the larger sample.
A unit is one layer, or the input embedding together with the output head it is tied to.
"""
from __future__ import annotations

import math

import torch.nn as nn

from gptopt_core.sensitivity import calibration_nll, get_module, module_sensitivity, replace_module

from .convert import make_embedding, make_linear, make_tied_head


def unit_bytes(module, precision: str, s: dict, embedding: bool) -> float:
    """Bytes a module's weight takes at ``precision`` (bias and norms are unchanged and left out)."""
    w = module.weight
    n, rows = w.numel(), w.shape[0] if embedding or not type(module).__name__ == "Conv1D" else w.shape[1]
    if precision == "keep":
        return n * w.element_size()
    if precision == "int8":
        return n + rows * 4
    double = s["double_quant"] and not embedding
    blocks = n / s["block_size"]
    return n / 2 + blocks * (1 if double else 4) + (blocks / 256 * 4 if double else 0)


def auto_plan(ctx, step, layers, layout, emb_prec):
    p, s = step.params, step.settings()
    q4 = s["quant_type"]
    model, device = ctx.model, ctx.device
    budget = p.max_ppl_increase if p.max_ppl_increase is not None else 0.05
    calib_blocks, calib_seq_len = p.calibration()
    check_blocks = p.check_blocks or 16
    blocks = ctx.calibration_blocks(calib_blocks, calib_seq_len)
    check = ctx.calibration_blocks(check_blocks, calib_seq_len)

    # units: name -> member modules; allowed precisions
    units, allowed = {}, {}
    for name in layers:
        units[name] = [name]
        allowed[name] = (q4, "int8", "keep")
    emb_name, head_name = layout["input_embedding"], layout["head"]
    if emb_prec:
        emb_allowed = ("int8",) if emb_prec == "int8" else (q4, "int8")
        for name in layout["embeddings"]:
            units[name] = [name]
            allowed[name] = emb_allowed
        if head_name:
            if layout["tied"] and emb_name in units:
                units[emb_name].append(head_name)
            else:
                units[head_name] = [head_name]
                allowed[head_name] = emb_allowed
    for name in list(units):
        if name == head_name and layout["tied"] and emb_prec and emb_name in units:
            del units[name]  # folded into the embedding's unit above (layers never include the head here)

    memo: dict = {}

    def quantized(name, precision):
        key = (name, precision)
        if key not in memo:
            module = get_module(model, name)
            memo[key] = (make_embedding(module, precision, s, device) if type(module) is nn.Embedding
                         else make_linear(module, precision, s, device))
        return memo[key]

    # 1. single-unit 4-bit sensitivity (members of a unit measured one by one, summed)
    to_measure = [m for u, members in units.items() if q4 in allowed[u] for m in members]
    ctx.log(f"  plan auto: measuring 4-bit sensitivity of {len(to_measure)} modules on "
            f"{calib_blocks}x{calib_seq_len} calibration tokens (train split)")
    sens = module_sensitivity(model, blocks, {n: (lambda m, n=n: quantized(n, q4)) for n in to_measure},
                              progress=ctx.progress)
    base = calibration_nll(model, check)  # the checks' reference: the model as it stands, on the check blocks
    delta = {u: sum(sens["delta_nll"][m] for m in members) if q4 in allowed[u] else 0.0
             for u, members in units.items()}
    size = {u: {prec: sum(unit_bytes(get_module(model, m), prec, s, type(get_module(model, m)) is nn.Embedding)
                          for m in members[:1]) for prec in (q4, "int8", "keep")}
            for u, members in units.items()}
    budget_nll = base + math.log1p(budget)

    # 2. order: 4-bit sensitivity per byte saved against int8
    upgradable = [u for u in units if q4 in allowed[u]]
    fixed8 = [u for u in units if q4 not in allowed[u]]
    order = sorted(upgradable, key=lambda u: -delta[u] / max(size[u]["int8"] - size[u][q4], 1.0))
    keepable = sorted([u for u in units if "keep" in allowed[u]], key=lambda u: -delta[u])

    def plan_for(k_int8: int, k_keep: int = 0) -> dict:
        plan = {u: q4 for u in upgradable}
        plan.update({u: "int8" for u in fixed8})
        plan.update({u: "int8" for u in order[:k_int8]})
        plan.update({u: "keep" for u in keepable[:k_keep]})
        return plan

    def expand(plan: dict) -> dict:
        out = {}
        for u, prec in plan.items():
            for m in units[u]:
                out[m] = prec
        return out

    trials = []

    def measure(plan: dict) -> float:
        swapped = []
        expanded = expand(plan)
        try:
            for name, prec in sorted(expanded.items(), key=lambda kv: kv[0] == head_name):
                if prec == "keep":
                    continue
                if name == head_name and layout["tied"] and expanded.get(emb_name) == prec:
                    new = make_tied_head(get_module(model, name), get_module(model, emb_name), s)
                else:
                    new = quantized(name, prec)
                swapped.append((name, replace_module(model, name, new)))
            nll = calibration_nll(model, check)
        finally:
            for name, old in reversed(swapped):
                replace_module(model, name, old)
        nbytes = sum(size[u][prec] for u, prec in plan.items())
        trials.append({"int8": sum(v == "int8" for v in plan.values()), "keep": sum(v == "keep" for v in plan.values()),
                       "calib_ppl_ratio": round(math.exp(nll - base), 5), "weight_bytes": int(nbytes)})
        return nll

    def search(make, hi: int):
        """Smallest k in [0, hi] with measured nll within budget (None if none)."""
        lo_ok = None
        lo, top = 0, hi
        if measure(make(top)) > budget_nll:
            return None
        lo_ok = top
        while lo < lo_ok:
            mid = (lo + lo_ok) // 2
            if measure(make(mid)) <= budget_nll:
                lo_ok = mid
            else:
                lo = mid + 1
        return lo_ok

    k = search(lambda k: plan_for(k), len(order))
    if k is not None:
        chosen = plan_for(k)
        met = True
    else:
        j = search(lambda j: plan_for(len(order), j), len(keepable))
        met = j is not None
        chosen = plan_for(len(order), j if met else len(keepable))

    plan = expand(chosen)
    final = next((t for t in reversed(trials) if t["int8"] == sum(v == "int8" for v in chosen.values())
                  and t["keep"] == sum(v == "keep" for v in chosen.values())), None)
    report = {"budget": budget, "met": met, "calib_tokens": calib_blocks * calib_seq_len,
              "check_tokens": check_blocks * calib_seq_len,
              "base_calib_ppl": round(math.exp(base), 4),
              "calib_ppl_ratio": final["calib_ppl_ratio"] if final else None,
              "trials": trials,
              "order": order,  # plan(k) = these units' first k in int8, the rest 4-bit
              "modules": {u: {"precision": chosen[u], "nf4_ppl_ratio" if q4 == "nf4" else "fp4_ppl_ratio":
                              round(math.exp(delta[u]), 6), "bytes": int(size[u][chosen[u]])} for u in units}}
    print_plan(ctx, report, units)
    if not met:
        ctx.log(f"  [yellow]plan auto: no plan stays within +{budget:.1%}; keeping the closest one[/]")
    memo.clear()
    return plan, report


def print_plan(ctx, report, units) -> None:
    if ctx.quiet or ctx.console is None:
        return
    from rich.table import Table

    table = Table(title=f"quantize plan (budget +{report['budget']:.1%} calibration ppl, measured "
                        f"x{report['calib_ppl_ratio']})", title_justify="left")
    for col in ("module", "precision", "4-bit ppl x", "MB"):
        table.add_column(col, justify="left" if col == "module" else "right")
    for name, info in report["modules"].items():
        ratio = next(v for k, v in info.items() if k.endswith("_ppl_ratio"))
        label = name + (" (+ tied head)" if len(units[name]) > 1 else "")
        table.add_row(label, info["precision"], f"{ratio:.4f}", f"{info['bytes'] / 1e6:.2f}")
    ctx.console.print(table)
