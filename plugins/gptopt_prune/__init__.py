"""gptopt plugin ``prune``: magnitude, Wanda, Taylor (gradient) and SparseGPT importance; unstructured or N:M.

The step zeroes the least important weights of the linear / Conv1D layers (the output head and the
embeddings only when ``--include`` names them) and records the masks as a model fact: ``ctx.state["masks"]``
(qualified module name → bool tensor shaped like ``module.weight`` as stored, True = kept) and the fact
``masks``, so training steps that follow keep the pruned weights at zero (this module's
``gptopt_after_optimizer_step``).

``prune-experts`` (:mod:`.expert_step`, engine :mod:`.experts`) drops or merges whole experts of
mixture-of-experts models by their router-weighted output on calibration text (REAP).

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the step,
:mod:`.pruning`, :mod:`.sparsegpt_step`, :mod:`.sparsegpt` and :mod:`.masks` the torch work.
"""
from gptopt_core import hookimpl

from .expert_step import PruneExpertsParams, PruneExpertsStep
from .masks import reapply_masks
from .step import PruneParams, PruneStep, parse_pattern

__all__ = ["PruneExpertsParams", "PruneExpertsStep", "PruneParams", "PruneStep", "parse_pattern"]


@hookimpl
def gptopt_register_steps(register):
    register(PruneStep)
    register(PruneExpertsStep)


@hookimpl(tryfirst=True)
def gptopt_after_optimizer_step(ctx, model, step):
    """Pruned weights stay exactly zero while a later step trains (before other plugins' updates see them)."""
    reapply_masks(ctx, model)
