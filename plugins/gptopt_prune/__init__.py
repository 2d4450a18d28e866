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
from gptopt_core.vocabulary import Fact, MatrixCell, StateKey

from .expert_step import PruneExpertsParams, PruneExpertsStep
from .masks import reapply_masks
from .step import PruneParams, PruneStep, parse_pattern

__all__ = ["PruneExpertsParams", "PruneExpertsStep", "PruneParams", "PruneStep", "parse_pattern"]


@hookimpl
def gptopt_register_steps(register):
    register(PruneStep)
    register(PruneExpertsStep)


@hookimpl
def gptopt_register_vocabulary(register):
    register(StateKey("masks", "{qualified module name: bool tensor shaped like module.weight as stored, True = kept}; "
                               "the prune plugin keeps these weights at zero while later steps train, lora --merge "
                               "re-applies them, savers may store them sparse"))
    register(Fact("masks", "pruning masks exist in ctx.state['masks'] (kept through later training); before it runs, "
                           "a pruning step's plan_facts()['masks'] says {sparsity, rule, method} (l1 reads it)",
                  lossy=True))
    register(Fact("experts-pruned", "a mixture of experts lost experts (prune-experts dropped or merged them)",
                  lossy=True))
    for cell in ("magnitude", "magnitude 2:4", "wanda", "wanda 2:4", "sparsegpt", "sparsegpt 2:4"):
        register(MatrixCell(f"prune {cell}"))


@hookimpl(tryfirst=True)
def gptopt_after_optimizer_step(ctx, model, step):
    """Pruned weights stay exactly zero while a later step trains (before other plugins' updates see them)."""
    reapply_masks(ctx, model)
