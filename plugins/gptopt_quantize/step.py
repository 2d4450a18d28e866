"""The ``quantize`` step: parameters, plan-time checks, facts. The work is in :mod:`.convert` / :mod:`.planner`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

import pydantic

from gptopt_core import Params, Step
from gptopt_core.kit.groupsize import GroupSize
from gptopt_core.kit.observers import get_observer
from gptopt_core.options import as_choice, as_group_size, as_percent, group_columns

from .methods import METHODS, refuse_options

PRECISIONS = ("int8", "nf4", "fp4", "keep")
BLOCK_SIZES = (64, 128, 256, 512, 1024, 2048, 4096)
BLOCK_SIZE_ERROR = f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {{value}}"


def check_plan_mapping(plan: dict, where: str) -> dict:
    if not plan:
        raise ValueError(f"{where} is empty; it maps module names to int8, nf4, fp4 or keep")
    out = {}
    for name, prec in plan.items():
        prec = str(prec).lower()
        if prec in ("8", "8bit"):
            prec = "int8"
        if prec not in PRECISIONS:  # the file may be any YAML a recipe names: its values are never echoed
            shown = f"module '{name}'" if re.fullmatch(r"[\w.*?\[\]-]{1,80}", str(name)) else "an entry"
            raise ValueError(f"{where}: {shown} has a precision that is not one of {', '.join(PRECISIONS)}")
        out[str(name)] = prec
    if {"nf4", "fp4"} <= set(out.values()):
        raise ValueError(f"{where} mixes nf4 and fp4; one model uses one 4-bit type")
    return out


def read_plan_file(path: str) -> dict:
    from gptopt_core import GptoptError
    from gptopt_core.kit.inputs import load_structured_file

    p = Path(path).expanduser()
    if not p.exists() and not p.is_symlink():
        raise ValueError(f"plan file {path} does not exist (give --plan auto, a JSON/YAML file, or a mapping)")
    try:  # the one safe loader: regular file, 4 MiB at most, no tags / anchors / aliases / duplicate keys
        doc = load_structured_file(p, "plan file")
    except GptoptError as exc:
        raise ValueError(str(exc)) from None
    if isinstance(doc, dict) and isinstance(doc.get("plan"), dict):
        doc = doc["plan"]
    if not isinstance(doc, dict):
        raise ValueError(f"plan file {path} must hold a mapping of module name to int8/nf4/fp4/keep")
    return check_plan_mapping(doc, f"plan file {path}")


class QuantizeParams(Params):
    method: Literal[tuple(METHODS)] = pydantic.Field(  # the method table (.methods): one record per method
        "bnb", description="; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
        + "; rtn/gptq/signround weights stay exactly on their grid (GGUF q4_0/q4_1/q8_0 blocks at group 32, packed "
          "int4/int8 + scales)")
    bits: Annotated[Optional[Literal[8, 4]], as_choice(
            (8, 4), "bitsandbytes quantizes to 8 or 4 bits, not {value}; use --bits 8 or --bits 4")] = pydantic.Field(
        None, description="8 (LLM.int8) or 4 (nf4/fp4) for every selected layer; not with --plan. rtn/gptq: the "
                          "code width, 4 or 8; required (no default: the step asks for it)")
    quant_type: Optional[Literal["nf4", "fp4"]] = pydantic.Field(
        None, description="4-bit data type (4-bit only) [default: nf4]")
    double_quant: Optional[bool] = pydantic.Field(
        None, description="quantize the 4-bit block scales too (4-bit only) [default: on]")
    compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = pydantic.Field(
        None, description="dtype of 4-bit matmuls (4-bit only) [default: float32]")
    block_size: Annotated[Optional[int], as_choice(BLOCK_SIZES, BLOCK_SIZE_ERROR)] = pydantic.Field(
        None, description="4-bit block size, 64..4096, a power of two (4-bit only) [default: 64]")
    include: list[str] = pydantic.Field(
        default_factory=list, description="only layers whose qualified name matches this glob (repeatable)")
    exclude: list[str] = pydantic.Field(
        default_factory=list, description="leave layers matching this glob unquantized (repeatable)")
    embeddings: Literal["keep", "8", "4"] = pydantic.Field(
        "keep", description="also quantize the embeddings and the output head to 8 or 4 bits (full quantization); "
                            "with --method rtn/gptq: 8 (int8 per-row grids)")
    int8_threshold: Optional[float] = pydantic.Field(
        None, ge=0.0, description="LLM.int8 outlier threshold for 8-bit layers (0: pure int8) [default: 6.0]")
    plan: Optional[Union[dict[str, str], str]] = pydantic.Field(
        None, description="per-module precision: 'auto' (measure sensitivity, pick within --max-ppl-increase), "
                          "a JSON/YAML file, or (in recipes) a mapping module -> int8|nf4|fp4|keep")
    max_ppl_increase: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, le=10.0, description="--plan auto budget: relative calibration ppl increase, e.g. 5% [default: 5%]")
    calib_blocks: Optional[int] = pydantic.Field(
        None, ge=1, le=4096, description="--plan auto / gptq / signround / --awq: calibration blocks (train "
                                         "split) [default: 4 for --plan auto, 64 for gptq and rtn --awq, 128 for "
                                         "signround]")
    calib_seq_len: Optional[int] = pydantic.Field(
        None, ge=16, le=8192, description="--plan auto / gptq / signround / --awq: tokens per calibration block "
                                          "[default: 256 for --plan auto and signround, 128 for gptq and rtn --awq]")
    check_blocks: Optional[int] = pydantic.Field(
        None, ge=1, le=1024, description="--plan auto: calibration blocks each whole-plan check is measured on "
                                         "(one forward per block and check, so more costs little) [default: 16]")
    group_size: Annotated[Optional[GroupSize], as_group_size()] = pydantic.Field(
        None, description="rtn/gptq: input columns sharing one scale (32, 64, 128, ...; must divide every layer's "
                          "input width) or 'channel' (one scale per output row) [default: 64]")
    symmetric: Optional[bool] = pydantic.Field(
        None, description="rtn/gptq: signed codes around zero (q4_0/q8_0-style), or unsigned codes with an integer "
                          "zero point per group (q4_1-style) [default: symmetric]")
    observer: Optional[str] = pydantic.Field(
        None, description="rtn/gptq: how each group's scale is chosen, a registered observer: minmax (the group's "
                          "range) or mse (the range shrunk, per group, to where rounding error is lowest) or hmse "
                          "(gptq: mse with each column's error weighted by the calibration Hessian's diagonal, the "
                          "mean squared activation llama.cpp's imatrix holds); a plugin adds more "
                          "(gptopt_register_observers; `gptopt plugins` lists them) [default: minmax]")
    activations: Annotated[Optional[Literal[8]], as_choice(
            (8,), "--activations quantizes layer inputs to int8 only (W8A8), not {value}")] = pydantic.Field(
        None, description="rtn/gptq with --bits 8: also quantize every quantized layer's input to int8, per token, "
                          "symmetric, dynamic (W8A8, what vLLM's CPU int8 kernels run); weights on per-channel "
                          "symmetric grids; eval measures it so")
    act_order: Optional[bool] = pydantic.Field(
        None, description="gptq: quantize columns in order of decreasing Hessian diagonal (groups stay contiguous: "
                          "their scales are fitted before the updates) [default: on]")
    dampening: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, le=1.0, description="gptq: added to the Hessian diagonal, as a fraction of its mean "
                                          "[default: 0.01]")
    offload: Optional[Literal["none", "cpu", "disk"]] = pydantic.Field(
        None, description="gptq: keep only the block being quantized on the compute device (cpu) or in memory "
                          "(disk: the others wait in safetensors files) [default: none]")
    sequential: Optional[bool] = pydantic.Field(
        None, description="gptq: within a block, quantize q/k/v, o, gate/up, down in turn, each calibrated on the "
                          "block with the earlier ones already quantized [default: on]")
    router: Optional[Literal["float", "include"]] = pydantic.Field(
        None, description="rtn/gptq on a mixture of experts: keep the routers and shared-expert gates float, or "
                          "quantize them like the linear layers (the metrics' router says which) [default: float]")
    min_expert_tokens: Optional[int] = pydantic.Field(
        None, ge=0, le=1_000_000, description="gptq on a mixture of experts: an expert the router sent fewer "
                                              "calibration tokens is quantized round-to-nearest (identity Hessian) and "
                                              "listed in the metrics (experts_below_min) [default: 16]")

    awq: Optional[bool] = pydantic.Field(
        None, description="rtn/gptq/signround: first search activation-aware per-channel scales (AWQ: mean "
                          "|input|^alpha, alpha on a 20-point grid per layer group, lowest output error of the "
                          "rounded layers on calibration text) and fold them into the norm or linear layer before "
                          "(the float model computes the same function) [default: off]")
    awq_clip: Optional[bool] = pydantic.Field(
        None, description="with --awq: also AWQ's per-group clip search on the scaled weights (range shrunk by up to "
                          "45 % where the group's share of the output error is lowest; q/k projections unclipped) "
                          "[default: off]")
    iters: Optional[int] = pydantic.Field(
        None, ge=0, le=100000, description="signround: signed-gradient steps per block (0: round-to-nearest) "
                                           "[default: 200, as AutoRound]")
    lr: Optional[float] = pydantic.Field(
        None, gt=0.0, le=1.0, description="signround: step size, decaying linearly to 0 [default: 1/iters]")

    @pydantic.field_validator("embeddings", mode="before")
    @classmethod
    def _embeddings(cls, v):
        return str(v) if isinstance(v, int) and not isinstance(v, bool) else v
    @pydantic.field_validator("observer")
    @classmethod
    def _observer(cls, v):
        return v if v is None else get_observer(v).name

    @pydantic.field_validator("plan", mode="before")
    @classmethod
    def _plan(cls, v):
        if v is None:
            return v
        if isinstance(v, dict):
            return check_plan_mapping(v, "plan")
        if isinstance(v, str):
            if v.strip().lower() == "auto":
                return "auto"
            return read_plan_file(v)  # read now: a replayed recipe carries the mapping, not the path
        raise ValueError("plan must be 'auto', a file path, or a mapping module -> precision")

    @pydantic.model_validator(mode="after")
    def _combination(self):
        """The method table refuses the options the method does not take, then the method checks the rest."""
        refuse_options(self)
        check = METHODS[self.method].check
        if check is not None:
            check(self)
        return self

    @property
    def w8a8(self) -> bool:
        """int8 weights per channel and int8 per-token inputs (``--activations 8``)."""
        return self.activations == 8

    @property
    def grid_group_size(self) -> GroupSize:
        """rtn/gptq/signround group size: 64 unless given (per channel under ``--activations 8``)."""
        return group_columns(self.group_size, default="channel" if self.w8a8 else 64)

    def calibration(self) -> tuple[int, int]:
        """(calibration blocks, tokens per block) with the method's defaults filled in."""
        blocks, seq_len = METHODS[self.method].calibration
        return (self.calib_blocks or blocks, self.calib_seq_len or seq_len)


class QuantizeStep(Step):
    """Quantize weights with bitsandbytes: int8 or nf4/fp4; full, partial (--include/--exclude) or planned.

    Works on the model as it stands in the chain (after prune or fine-tune), on GPT-2 Conv1D and nn.Linear
    layers, on CPU and CUDA. ``--embeddings 8|4`` also quantizes the token embeddings and the output head
    (a tied head shares the embedding's quantized storage). ``--plan auto --max-ppl-increase 5%`` measures each
    layer's sensitivity on the calibration (train) split and picks 4-bit / 8-bit / kept per layer to minimise
    bytes within the budget; the chosen plan is written into the recipe, so a replay does not measure again.
    """

    name = "quantize"
    Params = QuantizeParams
    forbids = {"quantized": "it is already quantized; quantize once, with every option in one quantize step"}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.result_precisions: set | None = None

    def settings(self) -> dict:
        """4-bit/8-bit settings with defaults filled in."""
        p = self.params
        quant_type = p.quant_type
        if quant_type is None and isinstance(p.plan, dict):
            quant_type = next((v for v in p.plan.values() if v in ("nf4", "fp4")), None)
        return {"quant_type": quant_type or "nf4", "double_quant": True if p.double_quant is None else p.double_quant,
                "compute_dtype": p.compute_dtype or "float32", "block_size": p.block_size or 64,
                "int8_threshold": 6.0 if p.int8_threshold is None else p.int8_threshold}

    def planned_precisions(self) -> set:
        """The precisions this step will produce, as far as known before running."""
        if self.result_precisions is not None:
            return self.result_precisions
        p = self.params
        if p.plan == "auto":
            return {"4bit", "8bit"}
        if isinstance(p.plan, dict):
            out = {"8bit" if v == "int8" else "4bit" for v in p.plan.values() if v != "keep"}
        else:
            out = {"8bit" if p.bits == 8 else "4bit"}
        if p.embeddings != "keep":
            out.add("8bit" if p.embeddings == "8" else "4bit")
        return out

    def next_facts(self, facts):
        return set(facts) | METHODS[self.params.method].facts(self)

    def preflight(self, ctx):
        check = METHODS[self.params.method].preflight
        if check is not None:
            check(ctx, self)

    def apply(self, ctx):
        return METHODS[self.params.method].engine(ctx, self)
