"""gptopt-transfer: knowledge transfer by training: ``lora`` (PEFT LoRA, QLoRA on a 4-bit base) and ``finetune``.

Both steps run the core's one training loop (:mod:`gptopt_core.kit.training`) and share its options. Pruning
masks (``ctx.state["masks"]``) survive: full fine-tuning keeps pruned weights exactly zero after every
optimizer step, and a LoRA ``--merge`` re-applies the masks to the merged weights, so the saved model has the
pruned sparsity exactly. ``--distill-from original`` adds a KL term against the model as it was loaded.

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the
steps, :mod:`.masked`, :mod:`.distill` and :mod:`.adapter` the torch / peft work (imported where it runs).
"""
from gptopt_core import PlanError, hookimpl
from gptopt_core.vocabulary import Fact, MatrixCell, StateKey

from .adapter import is_peft_model, load_with_adapter, save_with_adapter
from .distill import distill_loss
from .step import FinetuneParams, FinetuneStep, LoraParams, LoraStep, resolve_targets

__all__ = ["FinetuneStep", "LoraStep", "LoraParams", "FinetuneParams", "resolve_targets",
           "PlanError"]


@hookimpl
def gptopt_register_steps(register):
    register(LoraStep)
    register(FinetuneStep)


@hookimpl
def gptopt_register_vocabulary(register):
    register(StateKey("distill", "{'weight', 'temperature'} of --distill-from while its training step runs"))
    register(Fact("adapter", "the model carries an unmerged LoRA adapter (a PEFT model)"))
    register(MatrixCell("lora + merge"))
    register(MatrixCell("finetune"))


@hookimpl
def gptopt_training_loss(ctx, model, batch, outputs):
    """Distillation (``--distill-from original``) while its training step runs."""
    cfg = ctx.state.get("distill")
    return distill_loss(ctx, cfg, batch, outputs) if cfg else None


@hookimpl(tryfirst=True)
def gptopt_save_model(ctx, model, path):
    """A PEFT model: the base model in ``path`` (saved by whichever plugin saves such a base), the adapter in
    ``path/adapter``."""
    if not is_peft_model(model):
        return None
    save_with_adapter(ctx, model, path)
    return True


@hookimpl
def gptopt_resolve_model(spec, options):
    """A directory saved by ``save`` after an unmerged ``lora``: load the base, then its ``adapter/``."""
    return load_with_adapter(spec, options)
