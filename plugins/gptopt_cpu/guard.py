"""The quality guard: keep the linear layers an int8 conversion hurts most in float32.

1. Convert every candidate layer at once (swapped in place, no model copy) and measure the calibration NLL
   (train split, ``gptopt_core.sensitivity.calibration_nll``). Within budget: done, nothing is kept.
2. Otherwise measure each layer's own damage with the core's ``module_sensitivity`` (the same measurement
   ``quantize --plan auto`` uses), order the layers by it, and binary-search the smallest number ``k`` of
   most-damaging layers to keep in float so that the *measured* calibration NLL with all the others converted
   is within ``log(1 + budget)`` of the float model's.
"""
from __future__ import annotations

import math

from gptopt_core.sensitivity import calibration_nll, module_sensitivity, replace_module

from .convert import convert_module, linear_names, matches


class _Swapped:
    """Context manager: the named layers replaced by converted copies (memoised), restored on exit."""

    def __init__(self, model, names, make):
        self.model, self.names, self.make = model, list(names), make
        self.saved = []

    def __enter__(self):
        for name in self.names:
            self.saved.append((name, replace_module(self.model, name, self.make(name))))
        return self.model

    def __exit__(self, *exc):
        for name, original in reversed(self.saved):
            replace_module(self.model, name, original)
        self.saved = []


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

    base = calibration_nll(model, blocks)
    limit = base + math.log1p(budget)

    def nll_keeping(kept: set) -> float:
        with _Swapped(model, [n for n in candidates if n not in kept], make):
            return calibration_nll(model, blocks)

    plain = nll_keeping(set())
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
    results = {0: plain}
    lo, hi = 0, len(order)  # invariant: keeping order[:hi] is within budget (all kept == the float model)
    results[hi] = base
    while hi - lo > 1:
        mid = (lo + hi) // 2
        results[mid] = nll_keeping(set(order[:mid]))
        if results[mid] <= limit:
            hi = mid
        else:
            lo = mid
    kept = order[:hi]
    out.update(keep=kept, nll=results[hi], calib_ppl_ratio=math.exp(results[hi] - base),
               within_budget=results[hi] <= limit, sensitivity={n: round(delta[n], 6) for n in order})
    return out
