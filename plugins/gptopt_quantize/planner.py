"""``quantize --plan auto``: per-module precision (4-bit, int8, kept) that minimises bytes within a ppl budget.

1. Measure each unit's calibration-loss change when it alone goes to 4 bits (``gptopt_core.kit.sensitivity``).
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


from gptopt_core.kit.precision_search import nll_with_modules, smallest_within
from gptopt_core.kit.sensitivity import calibration_nll, get_module, module_sensitivity

from .convert import is_embedding, make_embedding, make_linear, make_tied_head


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


def plan_units(layers, layout: dict, emb_prec, q4: str) -> tuple[dict, dict]:
    """What gets one precision: ``({unit: [member modules]}, {unit: allowed precisions})``.

    A unit is one layer (4-bit, int8 or kept), or with ``--embeddings`` an embedding (``emb_prec``'s choices),
    which also carries the output head when the head is tied to it (they share one quantized storage).
    """
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
    return units, allowed


class PlanSearch:
    """The measurements behind ``--plan auto`` on one model: unit sensitivities, plan(k), whole-plan checks.

    Replacement modules are built once per (module, precision) and shared by every check; the model itself is
    only ever changed inside a check, and restored after it.
    """

    def __init__(self, model, device, settings: dict, units: dict, allowed: dict, layout: dict):
        self.model, self.device, self.s = model, device, settings
        self.units, self.allowed, self.layout = units, allowed, layout
        self.q4 = settings["quant_type"]
        self.memo: dict = {}
        self.trials: list[dict] = []  # one row per whole-plan check, in the order measured

    def quantized(self, name: str, precision: str):
        """The module at ``name`` converted to ``precision`` (built once)."""
        key = (name, precision)
        if key not in self.memo:
            module = get_module(self.model, name)
            self.memo[key] = (make_embedding(module, precision, self.s, self.device) if is_embedding(module)
                              else make_linear(module, precision, self.s, self.device))
        return self.memo[key]

    # 1. sensitivity and size of each unit
    def to_measure(self) -> list[str]:
        return [m for u, members in self.units.items() if self.q4 in self.allowed[u] for m in members]

    def measure_sensitivity(self, blocks, progress=None) -> None:
        """``self.delta``: each unit's calibration NLL change at 4 bits (members measured one by one, summed)."""
        q4 = self.q4
        sens = module_sensitivity(self.model, blocks, {n: (lambda m, n=n: self.quantized(n, q4))
                                                       for n in self.to_measure()}, progress=progress)
        self.delta = {u: sum(sens["delta_nll"][m] for m in members) if q4 in self.allowed[u] else 0.0
                      for u, members in self.units.items()}

    def measure_sizes(self) -> None:
        """``self.size[unit][precision]``: weight bytes (a tied head shares the embedding's, so it adds none)."""
        model, s = self.model, self.s
        self.size = {u: {prec: sum(unit_bytes(get_module(model, m), prec, s, is_embedding(get_module(model, m)))
                                   for m in members[:1]) for prec in (self.q4, "int8", "keep")}
                     for u, members in self.units.items()}

    # 2. the order in which units are protected
    def order_units(self) -> None:
        """``self.order``: 4-bit-able units, most sensitive per byte saved against int8 first; ``self.keepable``:
        units that may stay unquantized, most sensitive first."""
        q4, delta, size = self.q4, self.delta, self.size
        self.upgradable = [u for u in self.units if q4 in self.allowed[u]]
        self.fixed8 = [u for u in self.units if q4 not in self.allowed[u]]
        self.order = sorted(self.upgradable, key=lambda u: -delta[u] / max(size[u]["int8"] - size[u][q4], 1.0))
        self.keepable = sorted([u for u in self.units if "keep" in self.allowed[u]], key=lambda u: -delta[u])

    def plan_for(self, k_int8: int, k_keep: int = 0) -> dict:
        """The first ``k_int8`` units of the order in int8, the other 4-bit-able ones 4-bit, the first ``k_keep``
        keepable ones kept: ``{unit: precision}``."""
        plan = {u: self.q4 for u in self.upgradable}
        plan.update({u: "int8" for u in self.fixed8})
        plan.update({u: "int8" for u in self.order[:k_int8]})
        plan.update({u: "keep" for u in self.keepable[:k_keep]})
        return plan

    def expand(self, plan: dict) -> dict:
        """A unit plan as a module plan: ``{module name: precision}``."""
        return {m: prec for u, prec in plan.items() for m in self.units[u]}

    # 3. whole-plan checks and the search
    def replacements(self, plan: dict) -> dict:
        """``{module name: replacement}`` for a plan, the output head last (a tied head uses the embedding's)."""
        layout, head_name, emb_name = self.layout, self.layout["head"], self.layout["input_embedding"]
        expanded = self.expand(plan)
        out = {}
        for name, prec in sorted(expanded.items(), key=lambda kv: kv[0] == head_name):
            if prec == "keep":
                continue
            if name == head_name and layout["tied"] and expanded.get(emb_name) == prec:
                out[name] = make_tied_head(get_module(self.model, name), self.quantized(emb_name, prec), self.s)
            else:
                out[name] = self.quantized(name, prec)
        return out

    def measure(self, plan: dict, check) -> float:
        """Calibration NLL on ``check`` with the whole plan in place (recorded in :attr:`trials`)."""
        nll = nll_with_modules(self.model, check, self.replacements(plan))
        self.trials.append({"int8": sum(v == "int8" for v in plan.values()),
                            "keep": sum(v == "keep" for v in plan.values()),
                            "calib_ppl_ratio": round(math.exp(nll - self.base), 5),
                            "weight_bytes": int(sum(self.size[u][prec] for u, prec in plan.items()))})
        return nll

    def choose(self, check, budget_nll: float) -> tuple[dict, bool]:
        """The plan with the fewest int8 units within ``budget_nll``; if even all-int8 is over, the fewest kept
        units on top of it (or all of them, ``met`` False)."""
        k, _ = smallest_within(lambda k: self.measure(self.plan_for(k), check), budget_nll, 0, len(self.order))
        if k is not None:
            return self.plan_for(k), True
        top = len(self.order)
        j, _ = smallest_within(lambda j: self.measure(self.plan_for(top, j), check), budget_nll, 0, len(self.keepable))
        return self.plan_for(top, j if j is not None else len(self.keepable)), j is not None

    def report(self, chosen: dict, met: bool, budget: float, calib_tokens: int, check_tokens: int) -> dict:
        """The planner's record: budget, result, every check, the order and each unit's choice."""
        n_int8, n_keep = sum(v == "int8" for v in chosen.values()), sum(v == "keep" for v in chosen.values())
        final = next((t for t in reversed(self.trials) if t["int8"] == n_int8 and t["keep"] == n_keep), None)
        ratio_key = "nf4_ppl_ratio" if self.q4 == "nf4" else "fp4_ppl_ratio"
        return {"budget": budget, "met": met, "calib_tokens": calib_tokens, "check_tokens": check_tokens,
                "base_calib_ppl": round(math.exp(self.base), 4),
                "calib_ppl_ratio": final["calib_ppl_ratio"] if final else None,
                "trials": self.trials,
                "order": self.order,  # plan(k) = these units' first k in int8, the rest 4-bit
                "modules": {u: {"precision": chosen[u], ratio_key: round(math.exp(self.delta[u]), 6),
                                "bytes": int(self.size[u][chosen[u]])} for u in self.units}}


def auto_plan(ctx, step, layers, layout, emb_prec):
    """``--plan auto``: ``({module: precision}, report)`` for the smallest weights within the ppl budget."""
    p, s = step.params, step.settings()
    budget = p.max_ppl_increase if p.max_ppl_increase is not None else 0.05
    calib_blocks, calib_seq_len = p.calibration()
    check_blocks = p.check_blocks or 16
    blocks = ctx.calibration_blocks(calib_blocks, calib_seq_len)
    check = ctx.calibration_blocks(check_blocks, calib_seq_len)
    units, allowed = plan_units(layers, layout, emb_prec, s["quant_type"])
    search = PlanSearch(ctx.model, ctx.device, s, units, allowed, layout)

    ctx.log(f"  plan auto: measuring 4-bit sensitivity of {len(search.to_measure())} modules on "
            f"{calib_blocks}x{calib_seq_len} calibration tokens (train split)")
    search.measure_sensitivity(blocks, progress=ctx.progress)
    search.base = calibration_nll(ctx.model, check)  # the checks' reference: the model as it stands
    search.measure_sizes()
    search.order_units()
    chosen, met = search.choose(check, search.base + math.log1p(budget))

    report = search.report(chosen, met, budget, calib_blocks * calib_seq_len, check_blocks * calib_seq_len)
    print_plan(ctx, report, units)
    if not met:
        ctx.log(f"  [yellow]plan auto: no plan stays within +{budget:.1%}; keeping the closest one[/]")
    search.memo.clear()
    return search.expand(chosen), report


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
