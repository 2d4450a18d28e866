"""The ``l1`` step: its params and its plan (which later training step it shapes, which weights it selects).

The plugin's behaviour is described in :mod:`gptopt_l1`; the torch work is in :mod:`gptopt_l1.regularizer`.
"""
from __future__ import annotations

from typing import Annotated, List, Literal, Optional

import pydantic

from gptopt_core import Params, PlanError, Step
from gptopt_core.options import as_percent

from .regularizer import find_targets


class L1Params(Params):
    weight: float = pydantic.Field(
        ..., ge=0.0, le=1e6,
        description="λ: strength of the L1 term λ·Σ|w| (proximal: threshold λ·lr per optimizer step)")
    targets: List[str] = pydantic.Field(
        default_factory=list,
        description="glob on module names to regularize (repeatable; default: every linear layer but the head)")
    mode: Literal["proximal", "penalty"] = pydantic.Field(
        "proximal", description="proximal: soft-threshold after each optimizer step (exact zeros); "
                                "penalty: add λ·Σ|w| to the loss")
    schedule: Literal["constant", "linear-warmup"] = pydantic.Field(
        "constant", description="λ over training: constant, or ramp linearly from 0 over --warmup-fraction")
    warmup_fraction: Annotated[float, as_percent()] = pydantic.Field(
        0.5, gt=0.0, le=1.0, description="linear-warmup: fraction of the training steps over which λ ramps up")
    select: Literal["auto", "all", "prunable"] = pydantic.Field(
        "auto", description="which weights: all, or only those the later prune would remove (re-chosen as "
                            "training goes); auto = prunable when a prune follows")
    sparsity: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, lt=1.0,
        description="fraction the later prune removes, for --select prunable (default: read from that prune)")
    reselect_every: int = pydantic.Field(
        10, ge=1, le=1_000_000, description="--select prunable: re-choose the penalised weights every N steps")

    @pydantic.field_validator("targets")
    @classmethod
    def _globs(cls, value):
        value = [v.strip() for v in value]
        if any(not v for v in value):
            raise ValueError("empty glob pattern; give a module name pattern such as '*mlp*'")
        return value


def trains(step) -> bool:
    """Whether ``step`` trains the model (its class says ``trains = True``)."""
    return bool(getattr(type(step), "trains", False))


class L1Step(Step):
    """L1-sparsity regularization (proximal or penalty) of the next training step, to make a later prune cheap.

    Optionally only on the weights a later prune removes. Records its configuration (``ctx.state["l1"]``); the hooks act during the following ``finetune``/``lora``.
    """

    name = "l1"
    Params = L1Params
    provides = frozenset({"l1"})
    forbids = {"quantized": "L1 regularization needs float weights being trained; put l1 and its training step "
                            "before quantize (or use lora after quantize without l1)"}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plan: dict = {}

    def check_plan(self, before, after, facts):
        p = self.params
        train_at = next((i for i, s in enumerate(after) if trains(s)), None)
        if train_at is None:
            raise PlanError("l1 does not train by itself: put a training step after it, e.g. "
                            "`l1 --weight 5 finetune --steps 60` or `l1 --weight 5 lora --merge`")
        trainer = after[train_at]
        # the first later step that promises masks (prune, or any plugin's pruning step) says how it will choose
        prune = next((s for s in after[train_at + 1:] if "masks" in s.plan_facts()), None)
        planned = prune.plan_facts()["masks"] if prune is not None else {}
        rule, sparsity = planned.get("rule", "layer"), p.sparsity
        if sparsity is None:
            sparsity = planned.get("sparsity")
        select = p.select
        if select == "auto":
            select = "prunable" if prune is not None and sparsity else "all"
        if select == "prunable" and not sparsity:
            raise PlanError("l1 --select prunable needs to know how much will be pruned: give --sparsity, or put "
                            "`prune --sparsity S` after the training step")
        if rule.startswith("nm:") and p.sparsity is not None:
            n, m = (int(x) for x in rule.split(":")[1:])
            if abs(p.sparsity - (1 - n / m)) > 1e-9:
                raise PlanError(f"l1 --sparsity {p.sparsity} contradicts the later prune's N:M pattern {n}:{m}; "
                                "leave --sparsity out")
        self.plan = {"select": select, "sparsity": sparsity if select == "prunable" else None, "rule": rule,
                     "train_step": trainer.name, "prune_method": planned.get("method")}

    def preflight(self, ctx):
        find_targets(ctx.model, self.params.targets)  # targets matching nothing: fails before any step runs

    def apply(self, ctx):
        p = self.params
        if not self.plan:  # Step used outside a validated Pipeline
            self.check_plan([], [], set(ctx.facts))
        names = [n for n, _ in find_targets(ctx.model, p.targets)]
        cfg = {**p.model_dump(mode="json"), **self.plan, "target_names": names}
        ctx.state["l1"] = cfg
        what = "the weights the later prune removes" if self.plan["select"] == "prunable" else "all weights"
        ctx.log(f"  l1: λ={p.weight} {p.mode} ({p.schedule}) on {what} of {len(names)} layers, "
                f"during the next {self.plan['train_step']}")
        from gptopt_core.kit.experts import moe_effect

        return {"l1_weight": p.weight, "l1_select": self.plan["select"], "l1_target_layers": len(names),
                "l1_sparsity_target": self.plan["sparsity"],
                **moe_effect(ctx.model, "not L1-regularized: l1 targets linear layers (attention, shared expert); the "
                                        "training step after it trains the fused experts without the penalty")}

