"""``quantize --method rtn|gptq``: integer grids (:mod:`gptopt_core.kit.grids`) on the linear / ``Conv1D`` layers.

Each quantized layer stays a plain ``nn.Linear`` / ``Conv1D`` holding the de-quantized weights exactly, with a
:class:`~gptopt_core.kit.grids.WeightGrid` attached, so ``eval`` / ``bench`` run the same numbers a packed kernel
would, and the GGUF / compressed-tensors writers read the integer codes back without re-rounding.

* ``rtn``: round-to-nearest on min-max scales (:func:`gptopt_core.kit.grids.fit_grid`), no calibration;
* ``gptq``: :func:`.gptq.gptq_quantize` per layer, block by block on calibration text from the train split with
  :func:`gptopt_core.kit.calibration.run_blockwise` (compressed blocks feed the next; optional offloading). A layer
  pruned earlier in the chain (``ctx.state["masks"]``, weights still zero outside the mask) keeps its mask: its
  pruned weights are quantized to zero and their error compensated (:mod:`.gptq`), so sparsity survives exactly.

The output head and the embeddings stay in float unless ``--embeddings 8``: then the token embedding and the
output head (once, when tied) are rounded to nearest on int8 per-row symmetric grids (the rows are what a token
lookup and a logit read). A selected layer outside the transformer blocks (an untied head named by ``--include``)
is rounded to nearest even under gptq, and the metrics say so.
"""
from __future__ import annotations

import time

from gptopt_core import GptoptError
from gptopt_core.kit.activations import attach_input_quant, input_quant_of
from gptopt_core.kit.calibration import calibration_batches, run_blockwise, split_by_block, torch_threads
from gptopt_core.kit.grids import attach_grid, fit_grid, grid_layers, grid_of, round_to_grid
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import weight_matrix, weight_modules

from .gptq import gptq_quantize


def targets(model, p):
    """``[(name, module)]`` of the layers to put on a grid (output head only if named by --include, never tied)."""
    found = weight_modules(model, p.include or None, p.exclude or None)
    if p.include and not found:
        raise GptoptError(f"quantize: --include {' '.join(p.include)} matches no linear/Conv1D layer; layer names "
                          f"look like '{weight_modules(model)[0][0]}'")
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = []
    for name, module in found:
        if emb is not None and module.weight.data_ptr() == emb.weight.data_ptr():
            raise GptoptError(f"quantize --method {p.method}: {name} is tied to the input embedding, which integer "
                              "grids leave in full precision; --exclude it")
        out.append((name, module))
    if not out:
        raise GptoptError("quantize: no linear/Conv1D layer is left to quantize (check --include/--exclude)")
    return out


def check_layers(model, p, layers) -> None:
    """Refuse what cannot land on the grid: a group size that does not divide an input width, non-float32
    weights (fp16/bf16 cannot hold every de-quantized value exactly), layers already quantized."""
    if grid_layers(model) or getattr(model, "gptopt_bnb", None) is not None:
        raise GptoptError("quantize: the model is already quantized; quantize once, with every option in one step")
    gs = p.grid_group_size
    bad = {}
    for name, module in layers:
        w = module.weight
        if getattr(w, "quant_state", None) is not None or not w.dtype.is_floating_point:
            raise GptoptError(f"quantize: {name} already holds quantized weights; quantize once")
        if w.dtype != __import__("torch").float32:
            raise GptoptError(f"quantize --method {p.method} needs float32 weights to hold the de-quantized values "
                              f"exactly; {name} is {str(w.dtype).replace('torch.', '')} (load the model in float32)")
        width = weight_matrix(module).shape[1]
        if not gs.divides(width):
            bad.setdefault(width, name)
    if bad:
        widths = sorted({weight_matrix(m).shape[1] for _, m in layers})
        fits = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        width, name = next(iter(sorted(bad.items())))
        raise GptoptError(f"quantize: --group-size {gs} does not divide the input width {width} of {name} (input "
                          f"widths: {', '.join(map(str, widths))}); use --group-size "
                          + (f"{' or '.join(map(str, fits))} or " if fits else "") + "channel")


def preflight(ctx, step) -> None:
    p = step.params
    check_layers(ctx.model, p, targets(ctx.model, p))
    if p.awq:
        from .awq_fold import family_pairs

        family_pairs(ctx.model)  # a family AWQ has no fold pairs for: refused before anything runs
    if p.method in ("gptq", "signround") or p.awq:
        blocks, seq_len = p.calibration()
        data = getattr(ctx, "data", None)
        have = int(data.train_ids.numel()) if data is not None else 0
        if have < seq_len + 1:
            raise GptoptError(f"quantize --method {p.method}{' --awq' if p.awq else ''} needs calibration text: the "
                              f"train split of "
                              f"'{getattr(data, 'spec', '')}' has {have} tokens, fewer than one block of "
                              f"--calib-seq-len {seq_len}+1; give more --data or a smaller --calib-seq-len")


def rtn(module, bits: int, group_size, symmetric: bool, observer: str = "minmax"):
    observer = "mse" if observer == "hmse" else observer  # no Hessian outside gptq's blocks
    grid = fit_grid(weight_matrix(module), bits, group_size, symmetric, observer)
    round_to_grid(module, grid)
    return grid


def embeddings_to_int8(model) -> list:
    """Token embedding and output head on int8 per-row symmetric grids (round to nearest); a head tied to the
    embedding shares its grid-rounded weight and is listed once. Returns ``[(name, module)]`` rounded."""
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    done = []
    for module in (emb, head):
        if module is None or grid_of(module) is not None:
            continue
        if module is head and emb is not None and head.weight.data_ptr() == emb.weight.data_ptr():
            continue  # tied: already rounded with the embedding
        round_to_grid(module, fit_grid(weight_matrix(module), 8, None, symmetric=True))
        done.append((names[id(module)], module))
    return done


def kept_masks(ctx, modules: dict) -> dict:
    """``{name: bool mask (out, in)}`` of the pruning masks (``ctx.state["masks"]``) of ``modules`` whose weights
    are still zero everywhere outside the mask (a merged adapter or an unmasked fine-tune has undone the others)."""
    import torch

    out = {}
    for name, mask in ((getattr(ctx, "state", None) or {}).get("masks") or {}).items():
        module = modules.get(name)
        if module is None or tuple(mask.shape) != tuple(module.weight.shape):
            continue
        mask = mask.to(module.weight.device, torch.bool)
        mask = mask.t() if is_conv1d(module) else mask
        if not bool((weight_matrix(module)[~mask] != 0).any()):
            out[name] = mask
    return out


def rtn_layers(ctx, p, layers, spec, metrics: dict) -> list[str]:
    """``--method rtn``: every layer rounded to nearest; none falls back."""
    for _, module in layers:
        rtn(module, *spec)
    return []


def signround_rounding(ctx, p, layers, spec, metrics: dict) -> list[str]:
    """``--method signround`` on the layers inside the blocks, round-to-nearest (minmax) on the others."""
    from .signround import signround_layers

    fallback = signround_layers(ctx, p, layers, spec[:3], metrics)
    for name in fallback:
        rtn(dict(layers)[name], *spec[:3])
    return fallback


def quantize_grid(ctx, step, rounding) -> dict:
    """An integer-grid method on the selected layers: ``rounding(ctx, params, layers, (bits, group size, symmetric,
    observer), metrics)`` (the method record's) puts them on grids and returns the names it rounded to nearest
    instead; AWQ before it, ``--embeddings 8`` and W8A8 after it are every grid method's."""
    import torch

    p = step.params
    model = ctx.model
    layers = targets(model, p)
    check_layers(model, p, layers)
    bits, gs = int(p.bits), p.grid_group_size
    symmetric = True if p.symmetric is None else bool(p.symmetric)
    observer = p.observer or "minmax"
    start, cpu_start = time.perf_counter(), time.process_time()
    metrics: dict = {"method": p.method, "bits": bits, "group_size": gs.value, "symmetric": symmetric,
                     "observer": observer}
    fallback = []
    with torch.no_grad():
        if p.awq:
            from .awq import awq_scale

            search = "mse" if observer == "hmse" else observer  # round-to-nearest in the search: no Hessian weighting
            metrics["awq"] = awq_scale(ctx, p, layers, (bits, gs, symmetric, search), p.calibration())
        fallback = rounding(ctx, p, layers, (bits, gs, symmetric, observer), metrics)
        if p.embeddings == "8":
            embedded = embeddings_to_int8(model)
            layers = layers + [(n, m) for n, m in embedded if all(m is not other for _, other in layers)]
            metrics["embeddings"] = [n for n, _ in embedded]
        if p.w8a8:  # inputs quantized from here on: eval measures W8A8 (after gptq's calibration on float inputs)
            for _, module in layers:
                attach_input_quant(module)
            metrics["scheme"] = "w8a8"
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    described = {}
    for name, module in layers:
        grid = grid_of(module)
        act = input_quant_of(module)
        described[name] = grid.describe() + (f"+{act.describe()}" if act is not None else "")
    ctx.state.setdefault("quantized", {}).update(described)
    kind = next(iter(described.values()))
    metrics.update({"quantized_modules": len(described), "grid": kind, "quantize_seconds": round(seconds, 3),
                    "quantize_cpu_seconds": round(cpu, 3)})
    ctx.log(f"  quantize {p.method}: {len(described)} layers on {kind} grids ({seconds:.1f}s, {cpu:.1f} CPU-s)"
            + (f"; round-to-nearest outside the blocks: {', '.join(fallback)}" if fallback else ""))
    return metrics


def gptq_layers(ctx, p, layers, grid_spec, metrics: dict) -> list[str]:
    """GPTQ on the layers inside the decoder blocks, block by block on the calibration engine (round-to-nearest for
    the ones outside them); adds its figures to ``metrics``; returns the names that fell back to round-to-nearest."""
    import torch

    bits, gs, symmetric, observer = grid_spec
    model = ctx.model
    act_order = p.act_order is not False  # on unless --no-act-order
    damp = 0.01 if p.dampening is None else p.dampening
    n_blocks, seq_len = p.calibration()
    by_block, outside = split_by_block(model, [n for n, _ in layers])
    losses, damps = {}, {}
    masks = kept_masks(ctx, dict(layers))

    def compress(block, stats):
        for name, st in stats.items():
            view = st.weight()
            with torch_threads(1):
                q, grid, info = gptq_quantize(view.detach().float(), st.hessian, bits, gs, symmetric,
                                              act_order, damp, observer=observer, mask=masks.get(name))
            view.copy_(q.to(view.dtype))
            attach_grid(st.module, grid)
            st.hessian = None
            losses[name] = info["loss"]
            if info["dampening"] != damp:
                damps[name] = info["dampening"]

    batches = calibration_batches(ctx, n_blocks, seq_len)
    report = run_blockwise(model, batches, compress, layers=[n for b in by_block.values() for n in b],
                           stats=("hessian",), sequential=p.sequential is not False,
                           offload=p.offload or "none", device=ctx.device, progress=ctx.progress)
    modules = dict(layers)
    for name in outside:
        rtn(modules[name], bits, gs, symmetric, observer)
    metrics.update({"act_order": act_order, "dampening": damp, "calib_tokens": report["calib_tokens"],
                    "sequential": p.sequential is not False, "offload": report["offload"],
                    "engine": report, "gptq_loss": round(sum(losses.values()), 6),
                    "raised_dampening": damps, "rtn_layers": list(outside), "masked_layers": len(masks)})
    return list(outside)
