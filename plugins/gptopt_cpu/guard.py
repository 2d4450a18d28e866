"""The quality guard: keep the linear layers an int8 conversion hurts most in float32.

1. Convert every candidate layer at once (swapped in place, no model copy) and measure the calibration NLL
   (train split, ``gptopt_core.nll_with_modules``). Within budget: done, nothing is kept.
2. Otherwise measure each layer's own damage with the core's ``module_sensitivity`` (the same measurement
   ``quantize --plan auto`` uses), order the layers by it, and binary-search the smallest number ``k`` of
   most-damaging layers to keep in float so that the *measured* calibration NLL with all the others converted
   is within ``log(1 + budget)`` of the float model's (``gptopt_core.smallest_within``, the search
   ``quantize --plan auto`` uses too).
"""
from __future__ import annotations

import math

from gptopt_core.kit.modules import matches
from gptopt_core.kit.precision_search import nll_with_modules, smallest_within
from gptopt_core.kit.sensitivity import calibration_nll, module_sensitivity

from .convert import convert_module, linear_names


def guard_plan(model, fmt: str, blocks, budget: float, keep=(), progress=None, log=None) -> dict:
    """Which layers to keep in float so that ``fmt`` stays within ``budget`` on the calibration ``blocks``.

    :returns: ``{"keep": [names], "base_nll", "nll", "calib_ppl_ratio", "plain_calib_ppl_ratio",
        "sensitivity": {name: delta_nll} (only when measured), "within_budget": bool}``; the model is unchanged.
    """
    candidates = [n for n in linear_names(model) if not matches(n, keep)]
    memo: dict = {}

    def make(name):
        if name not in memo:
            memo[name] = convert_module(model.get_submodule(name), fmt)
        return memo[name]

    def nll_keeping(kept) -> float:
        return nll_with_modules(model, blocks, {n: make(n) for n in candidates if n not in kept})

    base = calibration_nll(model, blocks)
    limit = base + math.log1p(budget)
    plain = nll_keeping(())
    out = {"base_nll": base, "plain_calib_ppl_ratio": math.exp(plain - base)}
    if plain <= limit:
        out.update(keep=[], nll=plain, calib_ppl_ratio=math.exp(plain - base), within_budget=True)
        return out
    if log:
        log(f"  guard: {fmt} on every layer costs calibration ppl x{math.exp(plain - base):.3f} (budget "
            f"x{1 + budget:.3f}); measuring each of {len(candidates)} layers")
    sens = module_sensitivity(model, blocks, {n: (lambda m, n=n: make(n)) for n in candidates}, progress=progress)
    delta = sens["delta_nll"]
    order = sorted(candidates, key=lambda n: -delta[n])
    # keeping all of them is the float model (base); keeping none was measured above (plain, over budget)
    k, nll = smallest_within(lambda k: nll_keeping(set(order[:k])), limit, 0, len(order),
                             known={0: plain, len(order): base})
    kept = order[:k]
    out.update(keep=kept, nll=nll[k], calib_ppl_ratio=math.exp(nll[k] - base), within_budget=nll[k] <= limit,
               sensitivity={n: round(delta[n], 6) for n in order})
    return out
