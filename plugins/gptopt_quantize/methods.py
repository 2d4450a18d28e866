"""``quantize --method NAME``: one :class:`QuantizeMethod` record per method, the table :class:`.step.QuantizeStep`
reads for everything that differs between methods: the options the method takes (the others are refused from the
table, in one line), its checks, the facts it gives, its calibration defaults, its plan-time check and its engine.
Adding a method is one record in :data:`METHODS` (through :func:`register_method`).

The options no record lists (``--bits``, ``--include``, ``--exclude``, ``--embeddings``) are every method's.
The engines import torch where they run, so reading this table (``gptopt --help``) loads none.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from gptopt_core.kit.experts import moe_effect, with_experts
from gptopt_core.kit.observers import get_observer

#: the integer-grid methods' common options, and the calibration text's
GRID = ("group_size", "symmetric", "observer", "activations", "awq", "awq_clip", "router")
CALIB = ("calib_blocks", "calib_seq_len")
GPTQ = ("act_order", "dampening", "offload", "sequential", "min_expert_tokens")


@dataclass(frozen=True)
class QuantizeMethod:
    """One ``--method``: ``engine(ctx, step) -> metrics`` does the work; ``facts(step)`` are the facts the model has
    after it; ``check(params)`` raises ``ValueError`` (one line) for a combination the method refuses, after the
    table refused the options it does not take; ``preflight(ctx, step)`` checks the model before anything runs."""

    name: str
    #: one clause for ``--method``'s help
    help: str
    #: the method-specific options it reads (field names); any other method's option is refused
    options: tuple[str, ...]
    engine: Callable
    facts: Callable
    check: Optional[Callable] = None
    preflight: Optional[Callable] = None
    #: ``(calibration blocks, tokens per block)`` when ``--calib-blocks`` / ``--calib-seq-len`` are not given
    calibration: tuple[int, int] = (64, 128)
    #: how a refusal names this method (after "not ")
    title: str = ""
    #: what a refusal tells the user to do
    hint: str = "drop it"
    #: own one-line refusals for options it does not take (``{flag}`` is the option), instead of the table's
    refusals: Mapping[str, str] = field(default_factory=dict)
    #: an integer-grid method's rounding, for :func:`grid_engine`: ``(ctx, params, layers, (bits, group size,
    #: symmetric, observer), metrics) -> names rounded to nearest instead`` (``layers``: ``[(name, module)]``)
    rounding: Optional[Callable] = None


#: name -> record, in ``--method``'s order
METHODS: dict[str, QuantizeMethod] = {}


def register_method(method: QuantizeMethod) -> QuantizeMethod:
    if method.name in METHODS:
        raise ValueError(f"quantize method '{method.name}' is already registered")
    METHODS[method.name] = method
    return method


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def method_options() -> list[str]:
    """Every option some method reads and another may not, in table order."""
    seen: dict[str, None] = {}
    for m in METHODS.values():
        seen.update(dict.fromkeys(m.options))
    return list(seen)


def refuse_options(params) -> None:
    """``ValueError`` for the first method option given that ``params.method`` does not take."""
    method = METHODS[params.method]
    for name in method_options():
        if name in method.options or getattr(params, name) is None:
            continue
        if name in method.refusals:
            raise ValueError(method.refusals[name].format(flag=flag(name)))
        takers = [m for m in METHODS.values() if name in m.options]
        shown = "/".join(m.name + (f" ({m.title})" if len(takers) == 1 and m.title else "") for m in takers)
        raise ValueError(f"{flag(name)} applies to --method {shown}{' only' if len(takers) == 1 else ''}, not "
                         f"{method.title or method.name}; {method.hint}")


# -- the built-in methods -----------------------------------------------------------------------------------------
def grid_facts(step) -> set:
    return {"quantized:grid"} | ({"quantized:w8a8"} if step.params.w8a8 else set())


def grid_engine(ctx, step) -> dict:
    """A MoE's experts as linear layers (bitsandbytes leaves them float), then the method's rounding on every
    layer (:func:`.grid.quantize_grid`)."""
    from .grid import quantize_grid

    p = step.params
    rounding = METHODS[p.method].rounding
    return with_experts(ctx.model, lambda: quantize_grid(ctx, step, rounding), p.min_expert_tokens, ctx.log,
                        p.offload, "quantize", routers=p.router == "include")


def rtn_rounding(*args) -> list[str]:
    from .grid import rtn_layers  # torch work: imported when it runs

    return rtn_layers(*args)


def gptq_rounding(*args) -> list[str]:
    from .grid import gptq_layers

    return gptq_layers(*args)


def signround_rounding(*args) -> list[str]:
    from .grid import signround_rounding as rounding

    return rounding(*args)


def grid_preflight(ctx, step) -> None:
    from .grid import preflight

    preflight(ctx, step)


def bnb_engine(ctx, step) -> dict:
    from .workflow import quantize_model  # bitsandbytes and torch: imported when it runs

    return {**quantize_model(ctx, step), **moe_effect(
        ctx.model, "float (bitsandbytes quantizes linear layers; the fused 3-D expert weights are none; "
                   "--method rtn|gptq puts every expert on a grid)")}


def bnb_facts(step) -> set:
    return {f"quantized:{b}" for b in step.planned_precisions()}


FOUR_BIT_OPTIONS = ("quant_type", "double_quant", "compute_dtype", "block_size")


def check_bnb(p) -> None:
    if p.plan is None and p.bits is None:
        raise ValueError("give --bits 8 or --bits 4 (or --plan auto / --plan FILE)")
    if p.plan is not None and p.bits is not None:
        raise ValueError("give either --bits or --plan, not both (a plan sets each module's precision)")
    if p.bits == 8:
        given = [o for o in FOUR_BIT_OPTIONS if getattr(p, o) is not None]
        if given:
            raise ValueError(f"{flag(given[0])} applies to 4-bit quantization only; drop it or use --bits 4")
    if p.max_ppl_increase is not None and p.plan != "auto":
        raise ValueError("--max-ppl-increase is the budget of --plan auto; add --plan auto or drop it")
    if isinstance(p.plan, dict) and (p.embeddings != "keep" or p.include or p.exclude):
        raise ValueError("a plan mapping names every module's precision; drop --embeddings/--include/--exclude")
    if isinstance(p.plan, dict) and p.quant_type is not None:
        four = {v for v in p.plan.values() if v in ("nf4", "fp4")}
        if four and four != {p.quant_type}:
            raise ValueError(f"--quant-type {p.quant_type} contradicts the plan's {four.pop()} modules")


def check_grid(p) -> None:
    """What every integer-grid method refuses."""
    m = p.method
    if p.bits is None:
        raise ValueError(f"give --bits 4 or --bits 8 with --method {m}")
    if p.embeddings == "4":
        raise ValueError(f"--method {m} puts the embeddings and output head on an int8 grid only: use "
                         "--embeddings 8 (or --method bnb --embeddings 4)")
    if p.activations is not None:
        check_w8a8(p)
    if p.awq_clip and not p.awq:
        raise ValueError("--awq-clip is AWQ's clip search on its scaled weights: add --awq or drop --awq-clip")
    if p.awq and p.w8a8:
        raise ValueError("--awq searches weight-only scales; with --activations 8 (W8A8) the inputs are rounded "
                         "too, which its search does not measure: drop one of them")


def check_w8a8(p) -> None:
    if p.bits != 8:
        raise ValueError(f"--activations 8 (W8A8) needs --bits 8: int8 inputs meet int8 weights; use --bits 8 "
                         f"or drop --activations (--bits {p.bits} is weight-only)")
    if p.group_size is not None and not p.group_size.per_channel:
        raise ValueError("--activations 8 (W8A8) puts weights on per-channel grids (one scale per output row, "
                         "as vLLM's int8 kernels read them); drop --group-size or give --group-size channel")
    if p.symmetric is False:
        raise ValueError("--activations 8 (W8A8) needs symmetric weight grids (vLLM's int8 kernels have no "
                         "weight zero point); drop --no-symmetric")
    if p.embeddings != "keep":
        raise ValueError("--activations 8 (W8A8) quantizes linear layers only; the embeddings and head stay "
                         "float (vLLM reads no int8 embedding beside W8A8 layers); drop --embeddings")


def check_rtn(p) -> None:
    check_grid(p)
    if p.observer is not None and get_observer(p.observer).importance:
        raise ValueError(f"--observer {p.observer} weights by the calibration Hessian, which only --method gptq "
                         "collects; use --method gptq or --observer mse")
    given = [o for o in CALIB if getattr(p, o) is not None]
    if given and not p.awq:
        raise ValueError(f"{flag(given[0])} applies to --method gptq only; round-to-nearest needs no calibration "
                         "(unless with --awq)")


def check_signround(p) -> None:
    check_grid(p)
    if p.observer not in (None, "minmax"):
        raise ValueError(f"--observer {p.observer} does not apply to --method signround (it tunes the clipping "
                         "itself)")


SIGNROUND_REFUSES = "{flag} does not apply to --method signround (it tunes the clipping itself)"

register_method(QuantizeMethod(
    "bnb", "bitsandbytes int8/nf4/fp4 modules",
    ("quant_type", "double_quant", "compute_dtype", "block_size", "int8_threshold", "plan", "max_ppl_increase",
     "check_blocks") + CALIB,
    bnb_engine, bnb_facts, check_bnb, calibration=(4, 256), title="bitsandbytes", hint="add --method gptq (or rtn) or drop it"))
register_method(QuantizeMethod(
    "rtn", "round-to-nearest integer grid", GRID + CALIB, grid_engine, grid_facts, check_rtn, grid_preflight,
    rounding=rtn_rounding))
register_method(QuantizeMethod(
    "gptq", "GPTQ integer grid (layer by layer on calibration text)", GRID + CALIB + GPTQ, grid_engine, grid_facts,
    check_grid, grid_preflight, rounding=gptq_rounding))
register_method(QuantizeMethod(
    "signround", "SignRound/AutoRound rounding and clipping tuned per block on its output error",
    GRID + CALIB + ("offload", "iters", "lr"), grid_engine, grid_facts, check_signround, grid_preflight,
    calibration=(128, 256), refusals={o: SIGNROUND_REFUSES for o in GPTQ if o != "offload"},
    rounding=signround_rounding))
