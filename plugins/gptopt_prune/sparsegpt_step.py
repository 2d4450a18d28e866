"""``prune --method sparsegpt``: :func:`.sparsegpt.sparsegpt_prune` on every selected layer, block by block on
calibration text (:func:`gptopt_core.kit.calibration.run_blockwise`: the pruned blocks' outputs feed the next block).

Masks go to ``ctx.state["masks"]`` like the other methods'; with ``--quantize-bits`` the kept weights land on an
integer grid (:mod:`gptopt_core.kit.grids`) and ``ctx.state["quantized"]`` names each layer's grid.
"""
from __future__ import annotations

from gptopt_core import GptoptError
from gptopt_core.kit.calibration import run_blockwise, split_by_block, torch_threads
from gptopt_core.kit.grids import attach_grid

from .sparsegpt import sparsegpt_prune


def check_sparsegpt_targets(model, targets, params) -> None:
    import torch

    _, outside = split_by_block(model, [t.name for t in targets])
    if outside:
        raise GptoptError(f"prune --method sparsegpt prunes the layers inside the transformer blocks; "
                          f"{outside[0]} is outside them: --exclude it or use another --method")
    if params.quantize_bits:
        gs = params.grid_group_size
        widths = sorted({t.view().shape[1] for t in targets})
        for t in targets:
            width = t.view().shape[1]
            if not gs.divides(width):
                raise GptoptError(f"prune: --group-size {gs} does not divide the input width {width} of {t.name} "
                                  f"(input widths: {', '.join(map(str, widths))}); use another --group-size or "
                                  "channel")
            if t.module.weight.dtype != torch.float32:
                raise GptoptError(f"prune --quantize-bits needs float32 weights to hold the de-quantized values "
                                  f"exactly; {t.name} is {str(t.module.weight.dtype).replace('torch.', '')}")


def run_sparsegpt(ctx, model, targets, batches, params) -> dict:
    import torch



    check_sparsegpt_targets(model, targets, params)
    by_name = {t.name: t for t in targets}
    masks = ctx.state.setdefault("masks", {})
    quantized = {}
    damp = 0.01 if params.dampening is None else params.dampening
    bits = params.quantize_bits
    gs = params.grid_group_size
    symmetric = params.symmetric is not False
    losses, raised = {}, {}

    def compress(block, stats):
        for name, st in stats.items():
            t = by_name[name]
            view = t.view()
            with torch_threads(1):
                new, keep, grid, info = sparsegpt_prune(view.detach().float(), st.hessian,
                                                        None if params.nm else params.target_sparsity, params.nm,
                                                        bits, gs, symmetric, damp)
            st.hessian = None
            with torch.no_grad():
                view.copy_(new.to(view.dtype))
            stored = t.to_stored(keep)
            old = masks.get(name)
            if old is not None and tuple(old.shape) == tuple(stored.shape):
                stored = old.to(stored.device) & stored
            masks[name] = stored
            if grid is not None:
                attach_grid(t.module, grid)
                quantized[name] = grid.describe()
            losses[name] = info["loss"]
            if info["dampening"] != damp:
                raised[name] = info["dampening"]

    report = run_blockwise(model, batches, compress, layers=list(by_name), stats=("hessian",), sequential=True,
                           offload=params.offload or "none", device=ctx.device, progress=ctx.progress)
    if quantized:
        ctx.state.setdefault("quantized", {}).update(quantized)
    return {"engine": report, "dampening": damp, "sparsegpt_loss": round(sum(losses.values()), 6),
            "raised_dampening": raised, "quantize_bits": bits, "group_size": gs.value if bits else None,
            "symmetric": symmetric if bits else None, "grid": next(iter(quantized.values()), None)}
