"""gptopt plugin ``l1``: L1-sparsity regularization for the training step that follows it.

``l1`` does not train by itself. It records its configuration in ``ctx.state["l1"]`` (fact ``l1``) and its
hook implementations shape the *next* training step of the chain (``finetune``, ``lora``, or any step with
``trains = True``), so that a later ``prune`` costs less::

    gptopt run --model smollm2-135m eval l1 --weight 20 finetune --steps 60 prune --method magnitude \\
        --sparsity 0.5 eval

What it does (λ = ``--weight``, λ_t = λ times the ``--schedule`` factor at step t, lr_t = the learning rate
the optimizer used at step t, S = the *selected* weights of the targeted layers, see ``--select``):

* ``--mode proximal`` under ``finetune``: after every optimizer step, soft-thresholding of the selected weights,
  w ← sign(w)·max(|w| − λ_t·lr_t, 0) (the proximal step of λ·Σ|w| with step size lr_t): exact zeros appear.
* ``--mode penalty`` under ``finetune``: λ_t·Σ_S |w| is added to every micro-batch's loss (gradient λ_t·sign(w)).
* under ``lora`` the base weights are frozen; the penalty acts on the *effective* weight W + scale·B·A of each
  targeted, adapted layer: λ_t·Σ_S |W + scale·BA| is added to the loss and its gradient reaches only A and B.
  A low-rank update cannot set chosen entries exactly to zero, so ``--mode proximal`` under ``lora`` uses this
  same penalty (the step's metrics say ``l1_mode_used: penalty``).

``--select``: ``all`` penalises every weight of the targets (plain L1); ``prunable`` penalises only the weights
that the later ``prune`` would remove now (per layer the lowest-|w| fraction ``--sparsity``, by the later prune's
rule: whole layer, per row for wanda, per group for N:M, or over all layers for --scope global), re-chosen
every ``--reselect-every`` steps, so the large weights the pruned model keeps are not shrunk. ``auto`` (the
default) is ``prunable`` when a ``prune`` follows the training step and ``all`` otherwise.

Zero fractions (exact zeros, and |w| < 1e-3) of the targeted (effective) weights are shown in the progress
bar and recorded in the training step's metrics: ``l1_zero_fraction``, ``l1_small_fraction``, ``l1_history``
(one entry per eval point of ``--eval-every`` and at the end) and merged into its ``eval_history`` entries.

The plugin also holds ``robust`` (:mod:`.robust`, torch work in :mod:`.gradpenalty`, docs/robust.md): the
robustness regularizer λ·‖∇_W L‖₁ for the next training step, through the same hooks; both may be armed at once.

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the step,
:mod:`.regularizer` the torch work (torch imported inside its functions).
"""
from gptopt_core import hookimpl
from gptopt_core.vocabulary import Fact, MatrixCell, StateKey

from .gradpenalty import Runtime as RobustRuntime
from .regularizer import SMALL, runtime
from .robust import RobustParams, RobustStep
from .step import L1Params, L1Step, trains

__all__ = ["L1Params", "L1Step", "RobustParams", "RobustStep", "SMALL"]


@hookimpl
def gptopt_register_steps(register):
    register(L1Step)
    register(RobustStep)


@hookimpl
def gptopt_register_vocabulary(register):
    register(StateKey("l1", "the l1 step's configuration for the next training step (weight, mode, select, ...)"))
    register(StateKey("l1_runtime", "l1's per-training-run state (targets, schedule), created on the first hook "
                                    "call"))
    register(StateKey("robust", "the robust step's configuration for the next training step (weight, mode, "
                                "fd_step, targets, ...)"))
    register(StateKey("robust_runtime", "robust's per-training-run state (probes on the targeted layers, schedule, "
                                        "‖∇L‖₁ history), created when the training step starts"))
    register(Fact("l1", "an L1 regularizer is armed for the next training step"))
    register(Fact("robust", "a gradient-L1 (robustness) regularizer is armed for the next training step"))
    register(MatrixCell("l1 + finetune"))


@hookimpl
def gptopt_step_started(ctx, step):
    cfg = ctx.state.get("l1")
    if cfg is not None and trains(step) and not cfg.get("active"):
        cfg["active"] = step.name
    robust = ctx.state.get("robust")
    if robust is not None and trains(step) and not robust.get("active"):
        robust["active"] = step.name
        # before the step wraps the model (lora): the probes hook the base layers, which PEFT keeps
        ctx.state["robust_runtime"] = RobustRuntime(ctx, robust)


@hookimpl
def gptopt_training_loss(ctx, model, batch, outputs):
    terms = []
    cfg = ctx.state.get("l1")
    if cfg and cfg.get("active"):
        terms.append(runtime(ctx, model).penalty())
    rt = ctx.state.get("robust_runtime")
    if rt is not None:
        terms.append(rt.term(model, batch, outputs))
    terms = [t for t in terms if t is not None]
    return sum(terms[1:], terms[0]) if terms else None


@hookimpl
def gptopt_after_optimizer_step(ctx, model, step):
    rt = ctx.state.get("robust_runtime")
    if rt is not None:
        rt.after_step(step)
    cfg = ctx.state.get("l1")
    if not cfg or not cfg.get("active"):
        return
    runtime(ctx, model).after_step(step)


@hookimpl
def gptopt_step_finished(ctx, step, record):
    robust = ctx.state.get("robust")
    if robust is not None and robust.get("active") == step.name and trains(step):
        rt = ctx.state.pop("robust_runtime", None)
        ctx.state.pop("robust", None)
        if rt is not None:
            rt.close()
            record.setdefault("metrics", {}).update(rt.final_metrics())
    cfg = ctx.state.get("l1")
    if not cfg or cfg.get("active") != step.name or not trains(step):
        return
    rt = ctx.state.pop("l1_runtime", None)
    ctx.state.pop("l1", None)
    if rt is None:
        return
    record.setdefault("metrics", {}).update(rt.final_metrics(record.get("metrics", {})))
