"""Keeping pruned weights at zero while a later step trains (the prune plugin's own training hook).

The core's training loop knows nothing of masks: after every optimizer step it calls
``gptopt_after_optimizer_step``, and this implementation multiplies the weights being trained by the masks in
``ctx.state["masks"]`` (PEFT-wrapped names resolved; frozen weights, e.g. a LoRA base, are left out since they
cannot move). It runs before other plugins' implementations (``tryfirst``), so they see the masked weights.
"""
from __future__ import annotations

import weakref

from gptopt_core import hookimpl

#: the running Trainer → [(weight, bool mask)] of the weights it trains, found once per training run
_targets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@hookimpl(tryfirst=True)
def gptopt_after_optimizer_step(ctx, model, step):
    """Re-apply ``ctx.state["masks"]`` to the weights being trained: pruned weights stay exactly zero."""
    masks, trainer = ctx.state.get("masks"), ctx.state.get("trainer")
    if not masks:
        return
    import torch

    from gptopt_core import mask_targets

    targets = _targets.get(trainer) if trainer is not None else None
    if targets is None:
        targets = mask_targets(model, masks)
        if trainer is not None:
            _targets[trainer] = targets
    with torch.no_grad():
        for weight, keep in targets:
            weight.mul_(keep.to(weight.dtype))
