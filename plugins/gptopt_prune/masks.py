"""Keeping pruned weights at zero while a later step trains (what the prune plugin's training hook does).

The core's training loop knows nothing of masks: after every optimizer step it calls
``gptopt_after_optimizer_step``; the prune plugin's implementation (``tryfirst``, so other plugins see the masked
weights) calls :func:`reapply_masks`, which multiplies the weights being trained by the masks in
``ctx.state["masks"]`` (PEFT-wrapped names resolved; frozen weights, e.g. a LoRA base, are left out since they
cannot move).
"""
from __future__ import annotations

import weakref

from gptopt_core.kit.modules import mask_targets

#: the running Trainer → [(weight, bool mask)] of the weights it trains, found once per training run
_targets: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def reapply_masks(ctx, model) -> None:
    """Re-apply ``ctx.state["masks"]`` to the weights being trained: pruned weights stay exactly zero."""
    masks, trainer = ctx.state.get("masks"), ctx.state.get("trainer")
    if not masks:
        return
    import torch

    targets = _targets.get(trainer) if trainer is not None else None
    if targets is None:
        targets = mask_targets(model, masks)
        if trainer is not None:
            _targets[trainer] = targets
    with torch.no_grad():
        for weight, keep in targets:
            weight.mul_(keep.to(weight.dtype))
