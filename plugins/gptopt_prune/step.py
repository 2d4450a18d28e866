"""The ``prune`` step: its params (one schema for CLI, recipe and Python) and plan facts.

The work is in the engine modules :mod:`.pruning`, :mod:`.scores`, :mod:`.sparsegpt_step` and :mod:`.sparsegpt`, which
import torch inside their functions (so importing them here loads no torch at ``gptopt --help``).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Optional

import pydantic

from gptopt_core import Params, Step
from gptopt_core.kit.groupsize import GroupSize
from gptopt_core.options import as_choice, as_group_size, as_percent, group_columns

from .pruning import preflight, run_prune

NM_RE = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(pattern: str) -> Optional[tuple[int, int]]:
    """``"unstructured"`` → ``None``; ``"N:M"`` → ``(N, M)`` (N weights kept of every M)."""
    if pattern == "unstructured":
        return None
    m = NM_RE.match(pattern)
    if not m:
        raise ValueError(f"'{pattern}' is neither 'unstructured' nor N:M (e.g. 2:4: keep 2 of every 4 weights)")
    n, m_ = int(m.group(1)), int(m.group(2))
    if not 0 < n < m_ or m_ > 1024:
        raise ValueError(f"'{pattern}' is not a valid N:M pattern: need 0 < N < M <= 1024 (keep N of every M "
                         "consecutive input weights), e.g. 2:4 or 4:8")
    return n, m_


class PruneParams(Params):
    sparsity: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, ge=0.0, lt=1.0,
        description="fraction of weights to zero, in [0, 1) (unstructured; an N:M pattern implies 1 - N/M)")
    method: Literal["magnitude", "wanda", "taylor", "sparsegpt"] = pydantic.Field(
        "wanda", description="importance: |w|, |w|·‖x‖ (Wanda), |w·∂L/∂w| over calibration batches (Taylor), or "
                             "SparseGPT (second-order updates of the kept weights, layer by layer on calibration text)")
    pattern: str = pydantic.Field(
        "unstructured", description="unstructured, or N:M: keep N of every M consecutive input weights (e.g. 2:4)")
    scope: Literal["layer", "global"] = pydantic.Field(
        "layer", description="where the sparsity is exact: in every layer, or over all pruned layers together")
    calib_samples: int = pydantic.Field(
        64, ge=1, le=100_000, description="calibration blocks from the train split (wanda, taylor)")
    calib_seq_len: int = pydantic.Field(
        128, ge=2, le=32_768, description="tokens per calibration block (wanda, taylor)")
    sequential: bool = pydantic.Field(
        False, description="wanda: prune each block before its outputs feed the next (later blocks calibrate on the "
                           "pruned earlier ones; measured worse on SmolLM2, see docs/prune.md)")
    include: list[str] = pydantic.Field(
        [], description="glob on module names to prune (repeatable); the only way to prune lm_head / embeddings")
    exclude: list[str] = pydantic.Field([], description="glob on module names to leave dense (repeatable)")
    dampening: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, le=1.0, description="sparsegpt: added to the Hessian diagonal, as a fraction of its mean "
                                          "[default: 0.01]")
    # Literal[8, 4] as quantize's --bits: typing caches equal Literals (order-blind), so a different order here made
    # the choices shown by --help depend on which plugin loaded first
    quantize_bits: Annotated[Optional[Literal[8, 4]], as_choice(
            (4, 8), "sparsegpt quantizes to 4 or 8 bits, not {value}")] = pydantic.Field(
        None, description="sparsegpt: also put the kept weights on a 4- or 8-bit integer grid (joint "
                          "sparsification and quantization; facts as quantize --method gptq)")
    group_size: Annotated[Optional[GroupSize], as_group_size()] = pydantic.Field(
        None, description="sparsegpt --quantize-bits: input columns sharing one scale, or 'channel' [default: 64]")
    symmetric: Optional[bool] = pydantic.Field(
        None, description="sparsegpt --quantize-bits: signed codes, or unsigned codes with a zero point "
                          "[default: symmetric]")
    offload: Optional[Literal["none", "cpu", "disk"]] = pydantic.Field(
        None, description="sparsegpt: keep only the block being pruned on the compute device (cpu) or in memory "
                          "(disk) [default: none]")
    min_expert_tokens: int = pydantic.Field(
        16, ge=0, le=1_000_000, description="wanda/sparsegpt on a mixture of experts: an expert the router sent "
                                            "fewer calibration tokens is pruned by magnitude (unit statistics) and "
                                            "listed in the metrics (experts_below_min)")

    @pydantic.field_validator("pattern")
    @classmethod
    def _check_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @pydantic.field_validator("include", "exclude")
    @classmethod
    def _check_globs(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("empty glob pattern")
        return value

    @pydantic.model_validator(mode="after")
    def _check_combination(self):
        only = [f for f in ("dampening", "quantize_bits", "group_size", "symmetric", "offload")
                if getattr(self, f) is not None]
        if self.method != "sparsegpt" and only:
            raise ValueError(f"--{only[0].replace('_', '-')} applies to --method sparsegpt only")
        if self.method == "sparsegpt":
            if self.quantize_bits is None and (self.group_size is not None or self.symmetric is not None):
                raise ValueError("--group-size/--symmetric set the grid of --quantize-bits; add --quantize-bits 4 "
                                 "(or 8) or drop them")
            if self.scope == "global":
                raise ValueError("--scope global does not apply to --method sparsegpt (it prunes each layer to the "
                                 "target with its own Hessian); use --scope layer")
            if self.sequential:
                raise ValueError("--sequential is how sparsegpt always runs (block by block on the pruned blocks' "
                                 "outputs); drop it")
        nm = parse_pattern(self.pattern)
        if nm is None:
            if self.sparsity is None:
                raise ValueError("give --sparsity (fraction of weights to zero, e.g. 0.5) or an N:M --pattern")
        else:
            implied = 1 - nm[0] / nm[1]
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"--sparsity {self.sparsity} contradicts --pattern {self.pattern}, which zeros "
                                 f"{implied:.4g} of the weights; leave --sparsity out with an N:M pattern")
            if self.scope == "global":
                raise ValueError(f"--scope global does not apply to --pattern {self.pattern} (N:M is exact per "
                                 "group of M weights); use --scope layer")
        return self

    @property
    def grid_group_size(self) -> GroupSize:
        """--quantize-bits group size, default 64."""
        return group_columns(self.group_size)

    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.sparsity)


class PruneStep(Step):
    """Zero unimportant weights (magnitude, Wanda or Taylor importance; unstructured or N:M) and record the masks.

    magnitude scores |w|; wanda scores |w|·‖x‖ (input-channel activation norm on calibration text from the
    train split, compared within each output row, block by block); taylor scores |w·∂L/∂w| summed over
    calibration batches. The masks go to the run's state (fact ``masks``) so later training keeps the zeros.
    """

    name = "prune"
    Params = PruneParams
    forbids = {"quantized": "pruning needs float weights; put prune before quantize"}
    provides = frozenset({"masks"})

    def next_facts(self, facts):
        out = super().next_facts(facts)
        if self.params.quantize_bits:  # sparsegpt's joint quantization puts the kept weights on integer grids
            out.add("quantized:grid")
        return out

    def plan_facts(self):
        """``{"masks": {sparsity, rule, method}}``: what a step planned before this prune (l1) may read."""
        p = self.params
        nm = p.nm
        rule = f"nm:{nm[0]}:{nm[1]}" if nm else "global" if p.scope == "global" else "row" if p.method == "wanda" \
            else "layer"
        return {"masks": {"sparsity": p.target_sparsity, "rule": rule, "method": p.method}}

    def preflight(self, ctx):
        preflight(ctx, self.params)

    def apply(self, ctx):
        from gptopt_core.kit.experts import with_experts

        return with_experts(ctx.model, lambda: run_prune(ctx, self.params), self.params.min_expert_tokens, ctx.log,
                            self.params.offload, "prune")

