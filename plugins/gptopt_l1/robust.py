"""The ``robust`` step: robustness-based pruning's training regularizer, λ·‖∇_θ L‖₁ on the targeted weights.

Like ``l1`` it does not train by itself: it records its configuration in ``ctx.state["robust"]`` (fact
``robust``) and the plugin's hooks add the term to every micro-batch of the *next* training step (``finetune``,
``lora``, or any step with ``trains = True``). A small gradient of the loss with respect to the weights means a
small first-order loss change when weights are perturbed, e.g. set to zero by a later ``prune`` (section 3.3.2
of the source article: "minimise the L1 norm of the model parameters' gradients"). The torch work is in
:mod:`gptopt_l1.gradpenalty`; docs/robust.md has the measurements.
"""
from __future__ import annotations

from typing import Annotated, List, Literal

import pydantic

from gptopt_core import Params, PlanError, Step
from gptopt_core.options import as_percent

from .gradpenalty import target_names
from .step import trains


class RobustParams(Params):
    weight: float = pydantic.Field(
        ..., ge=0.0, le=1e6,
        description="λ: strength of the term λ·‖∇_W L‖₁ (L: the micro-batch's cross-entropy, W: the targeted "
                    "weights)")
    targets: List[str] = pydantic.Field(
        default_factory=list,
        description="glob on module names whose weight gradient is penalised (repeatable; default: every linear "
                    "layer but the head)")
    mode: Literal["exact", "fd"] = pydantic.Field(
        "fd", description="exact: double backward (create_graph); fd: one extra forward/backward at "
                          "W + r·sign(∇L) (finite difference, plain-training memory)")
    fd_step: float = pydantic.Field(
        1e-4, gt=0.0, le=1.0, description="fd: the step r added to every targeted weight along sign(∇_W L)")
    schedule: Literal["constant", "linear-warmup"] = pydantic.Field(
        "constant", description="λ over training: constant, or ramp linearly from 0 over --warmup-fraction")
    warmup_fraction: Annotated[float, as_percent()] = pydantic.Field(
        0.5, gt=0.0, le=1.0, description="linear-warmup: fraction of the training steps over which λ ramps up")

    @pydantic.field_validator("targets")
    @classmethod
    def _globs(cls, value):
        value = [v.strip() for v in value]
        if any(not v for v in value):
            raise ValueError("empty glob pattern; give a module name pattern such as '*mlp*'")
        return value


class RobustStep(Step):
    """Robustness regularization of the next training step: λ·‖∇_W L‖₁ (exact or finite difference), so a later prune hurts less.

    Records its configuration (``ctx.state["robust"]``); the hooks act during the following ``finetune``/``lora``.
    """

    name = "robust"
    Params = RobustParams
    provides = frozenset({"robust"})
    forbids = {"quantized": "the gradient penalty needs float weights (bitsandbytes 4-bit/8-bit bases are not "
                            "supported); put robust and its training step before quantize"}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.plan: dict = {}

    def check_plan(self, before, after, facts):
        trainer = next((s for s in after if trains(s)), None)
        if trainer is None:
            raise PlanError("robust does not train by itself: put a training step after it, e.g. "
                            "`robust --weight 1e-4 finetune --steps 60` or `robust --weight 1e-4 lora --merge`")
        if getattr(trainer.params, "gradient_checkpointing", False):
            raise PlanError(f"robust does not combine with {trainer.name} --gradient-checkpointing (the penalty "
                            "differentiates the gradient itself); leave --gradient-checkpointing out")
        self.plan = {"train_step": trainer.name}

    def preflight(self, ctx):
        target_names(ctx.model, self.params.targets)  # targets matching nothing: fails before any step runs

    def apply(self, ctx):
        p = self.params
        if not self.plan:  # Step used outside a validated Pipeline
            self.check_plan([], [], set(ctx.facts))
        names = target_names(ctx.model, p.targets)
        ctx.state["robust"] = {**p.model_dump(mode="json"), **self.plan, "target_names": names}
        ctx.log(f"  robust: λ={p.weight} on ‖∇W L‖₁ ({p.mode}, {p.schedule}) of {len(names)} layers, during the "
                f"next {self.plan['train_step']}")
        return {"robust_weight": p.weight, "robust_mode": p.mode, "robust_target_layers": len(names)}
