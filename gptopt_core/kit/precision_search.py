"""Search over module precisions: swap modules in, measure, restore; binary-search the smallest plan that fits.

Two plugins choose per-module precisions under a perplexity budget the same way (``quantize --plan auto`` picks
4-bit / int8 / kept per layer, ``cpu-fast``'s guard picks the int8 layers to keep in float): order the modules by
their measured sensitivity, let ``plan(k)`` protect the first ``k`` of them, and find the smallest ``k`` whose
*measured* calibration loss, with every replacement in place at once, is within the budget. The pieces:

* :func:`swapped_modules`: a context in which named modules are replaced in place (no model copy); the
  originals are back on exit, also after an error.
* :func:`nll_with_modules`: the calibration NLL (:func:`gptopt_core.calibration_nll`) with such replacements.
* :func:`smallest_within`: the binary search, for a measurement that falls as ``k`` grows.

What a plan replaces with what (a quantized copy, an int8 layer, a tied head) stays with the plugin.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Optional

from .sensitivity import calibration_nll, replace_module

__all__ = ["swapped_modules", "nll_with_modules", "smallest_within"]


@contextlib.contextmanager
def swapped_modules(model, replacements: Mapping[str, object]) -> Iterator[object]:
    """Replace the modules at the qualified names in ``replacements`` with their values, in order; yield ``model``.

    On exit (also after an error) the original modules are put back in reverse order, so the model is exactly
    as before. Build a replacement that depends on another replaced module (e.g. an output head computing with
    the quantized embedding's storage) from that replacement itself, not from the model.
    """
    saved = []
    try:
        for name, new in replacements.items():
            saved.append((name, replace_module(model, name, new)))
        yield model
    finally:
        for name, original in reversed(saved):
            replace_module(model, name, original)


def nll_with_modules(model, blocks, replacements: Mapping[str, object]) -> float:
    """Mean next-token NLL of ``model`` on calibration ``blocks`` with ``replacements`` swapped in (then restored).

    :param blocks: ``[1, T]`` LongTensors on the model's device (``ctx.calibration_blocks``: the train split).
    :returns: the NLL as :func:`gptopt_core.calibration_nll` gives it; ``math.exp`` of a difference is a
        perplexity ratio.
    """
    with swapped_modules(model, replacements):
        return calibration_nll(model, blocks)


def smallest_within(measure: Callable[[int], float], limit: float, lo: int, hi: int,
                    known: Optional[Mapping[int, float]] = None) -> tuple[Optional[int], dict[int, float]]:
    """The smallest ``k`` in ``[lo, hi]`` with ``measure(k) <= limit``, by binary search.

    ``measure(k)`` is the loss of the plan that protects ``k`` modules; the search assumes it does not grow with
    ``k``. ``hi`` is measured first: if even it is over ``limit`` the answer is ``None``. Then the usual bisection
    (midpoint ``(lo + hi) // 2``, rounded down), so at most ``1 + ceil(log2(hi - lo + 1))`` measurements.

    :param known: values already measured (e.g. ``{0: every module replaced, n: none replaced}``); they are used
        instead of calling ``measure``.
    :returns: ``(k or None, {k: value})`` with every value looked at, measured or known.
    """
    values = dict(known or {})

    def value(k: int) -> float:
        if k not in values:
            values[k] = measure(k)
        return values[k]

    if value(hi) > limit:
        return None, values
    while lo < hi:
        mid = (lo + hi) // 2
        if value(mid) <= limit:
            hi = mid
        else:
            lo = mid + 1
    return hi, values
