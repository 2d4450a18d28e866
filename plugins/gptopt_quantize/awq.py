"""``quantize --awq``: activation-aware weight scaling (AWQ; Lin et al., "AWQ: Activation-aware Weight Quantization
for LLM Compression and Acceleration", arXiv:2306.00978; re-implemented after the reference ``llm-awq``
``auto_scale.py`` and AutoAWQ), run before the grid method (rtn, gptq or signround) on the same model.

Block by block on calibration text (the layer-wise engine, :func:`gptopt_core.run_blockwise`), for each
:class:`~.awq_fold.Pair` of the family (``prev`` op -> the linear layers reading its output):

    x_mean = mean |x| per input channel (channels fed by one value row under GQA: their mean, shared)
    s(alpha) = x_mean ** alpha, clamped at 1e-4, divided by sqrt(max(s) * min(s))      alpha in 0, 0.05, ..., 0.95
    error(alpha) = sum over the layers of  E_x || x W^T - (x / s) Q(W s)^T ||^2 = tr(D H D^T),
                   D = Q(W s) / s - W,  H = E[x x^T] on the calibration tokens

where ``Q`` is round-to-nearest on the step's grid (bits, group size, symmetric, observer). The ``alpha`` with the
lowest error is kept (``alpha = 0`` is ``s = 1``: plain round-to-nearest, so the error never rises), and the scales are
folded (:func:`.awq_fold.fold_scales`: the float model computes the same function). Statistics come from the float
block before any of its pairs is scaled (as AutoAWQ caches them); the next block calibrates on the scaled block's
outputs, which equal the float ones. Differences from the reference, said here: the error is the layers' own output
error, computed exactly from ``H`` (the reference runs the parent module, e.g. the whole attention, per ``alpha``);
per-group clip search only with ``--awq-clip`` (:mod:`.awq_clip`; the reference always clips).
"""
from __future__ import annotations

import time

from gptopt_core.kit.calibration import calibration_batches, find_blocks, run_blockwise, split_by_block
from gptopt_core.kit.grids import fit_grid
from gptopt_core.kit.modules import weight_matrix

from .awq_fold import family_pairs, fold_scales, source_rows

N_GRID = 20
ALPHAS = tuple(i / N_GRID for i in range(N_GRID))


def tied_means(x_mean, rows):
    """``x_mean`` with the channels fed by one ``prev`` row replaced by their mean (a row has one scale)."""
    import torch

    n = int(rows.max()) + 1
    sums = torch.zeros(n, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, rows, x_mean)
    counts = torch.zeros(n, dtype=x_mean.dtype, device=x_mean.device).index_add_(0, rows, torch.ones_like(x_mean))
    return (sums / counts.clamp(min=1))[rows]


def scales_for(x_mean, alpha: float):
    """AWQ's per-channel scales for ``alpha`` (see the module docstring)."""
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def output_error(weights, scales, H, spec) -> float:
    """``sum tr(D H D^T)`` over ``weights`` (float ``(out, in)``), ``D = Q(W s) / s - W``, ``Q`` round-to-nearest on
    ``spec = (bits, group_size, symmetric, observer)``."""
    bits, gs, symmetric, observer = spec
    total = 0.0
    for W in weights:
        Ws = W * scales[None, :]
        grid = fit_grid(Ws, bits, gs, symmetric, observer)
        D = grid.dequantize(grid.codes(Ws)) / scales[None, :] - W
        total += float(((D @ H) * D).sum())
    return total


def search_scales(weights, x_mean, H, rows, spec) -> dict:
    """The grid search over :data:`ALPHAS`: ``{"alpha", "scales", "error_rtn" (alpha 0), "error"}``."""
    tied = tied_means(x_mean.float(), rows)
    best = None
    for alpha in ALPHAS:
        s = scales_for(tied, alpha)
        err = output_error(weights, s, H, spec)
        if alpha == 0:
            err0 = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return {"alpha": best[1], "scales": best[2], "error_rtn": err0, "error": best[0]}


class AbsMeans:
    """Forward hooks on the first layer of each pair: sum of ``|x|`` per input channel and the token count, while
    the engine collects its statistics of the block (each block's hooks stop once the block is ``close``d, so the
    forward passes of the scaled block that make the next block's inputs add nothing)."""

    def __init__(self, layers: dict):
        self.sums, self.tokens, self.closed = {}, {}, set()
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            if name in self.closed:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            s = x.abs().sum(0)
            self.sums[name] = s if name not in self.sums else self.sums[name] + s
            self.tokens[name] = self.tokens.get(name, 0) + x.shape[0]
        return hook

    def mean(self, name):
        self.closed.add(name)
        return self.sums.pop(name) / max(self.tokens.pop(name), 1)

    def remove(self):
        for h in self.handles:
            h.remove()


def _plan_pairs(model, pairs, names) -> tuple:
    """``({first layer: module}, [skipped pair keys])``: the pairs whose layers are all quantized, by the qualified
    name of their first layer (where the statistics are collected)."""
    by_block, _ = split_by_block(model, sorted(names))
    modules = dict(model.named_modules())
    prefix, _ = find_blocks(model)
    firsts, skipped = {}, []
    for i in by_block:
        for pair in pairs:
            full = [f"{prefix}.{i}.{rel}" for rel in pair.layers]
            if all(n in names for n in full):
                firsts[full[0]] = modules[full[0]]
            else:
                skipped.append(pair.key(f"{prefix}.{i}"))
    return firsts, skipped


def _scale_block(block, stats, job: dict) -> None:
    """Search every pair of ``block`` on the float block's statistics, then fold them all; then (``--awq-clip``)
    clip the scaled layers on their scaled inputs (``H / (s s^T)``)."""
    from .awq_clip import clip_search, clipped_name

    inner = dict(block.module.named_modules())
    plan = []
    for pair in job["pairs"]:
        first = f"{block.name}.{pair.layers[0]}"
        if first not in job["firsts"]:
            continue
        x_mean = job["means"].mean(first)
        H = stats[first].hessian / 2  # the engine's 2/n X^T X
        stats[first].hessian = None
        rows = source_rows(pair, job["config"], x_mean.numel(), x_mean.device)
        weights = [weight_matrix(inner[rel]).detach().float() for rel in pair.layers]
        got = search_scales(weights, x_mean, H, rows, job["spec"])
        plan.append((pair, got["scales"], rows, H))
        job["chosen"][pair.key(block.name)] = {k: round(got[k], 8) if k != "alpha" else got[k]
                                               for k in ("alpha", "error_rtn", "error")}
    for pair, s, rows, _ in plan:  # after every search: each pair saw the float block's statistics
        fold_scales(block.module, pair, s, rows, job["norm"])
    if not job["clip"]:
        return
    for pair, s, _, H in plan:
        Hs = H / (s[:, None] * s[None, :])  # the scaled layers read x / s
        for rel in pair.layers:
            if clipped_name(rel):
                view = weight_matrix(inner[rel])
                W, before, after = clip_search(view.detach().float(), Hs, job["spec"])
                view.copy_(W.to(view.dtype))
                job["clipped"][f"{block.name}.{rel}"] = {"error_rtn": round(before, 8), "error": round(after, 8)}


def awq_scale(ctx, p, layers, spec, calibration: tuple) -> dict:
    """Search and fold AWQ scales (and clip, with ``--awq-clip``) on the pairs whose layers are all in ``layers``
    (``[(name, module)]`` of the step); ``spec = (bits, group_size, symmetric, observer)``. Returns the ``awq``
    metrics."""
    import torch

    model = ctx.model
    arch, pairs = family_pairs(model)
    firsts, skipped = _plan_pairs(model, pairs, {n for n, _ in layers})
    job = {"pairs": pairs, "firsts": firsts, "means": AbsMeans(firsts), "config": model.config, "spec": spec,
           "norm": arch.norm, "clip": bool(getattr(p, "awq_clip", False)), "chosen": {}, "clipped": {}}
    start = time.perf_counter()
    try:
        with torch.no_grad():
            report = run_blockwise(model, calibration_batches(ctx, *calibration),
                                   lambda block, stats: _scale_block(block, stats, job), layers=sorted(firsts),
                                   stats=("hessian",), sequential=False, offload=getattr(p, "offload", None) or "none",
                                   device=ctx.device, progress=ctx.progress)
    finally:
        job["means"].remove()
    chosen, clipped = job["chosen"], job["clipped"]
    out = {"pairs": chosen, "skipped": skipped, "grid_points": N_GRID, "calib_tokens": report["calib_tokens"],
           "error_rtn": round(sum(v["error_rtn"] for v in chosen.values()), 8),
           "error": round(sum(v["error"] for v in chosen.values()), 8),
           "pairs_improved": sum(v["error"] < v["error_rtn"] for v in chosen.values())}
    if job["clip"]:
        out["clip"] = {"layers": clipped, "error_rtn": round(sum(v["error_rtn"] for v in clipped.values()), 8),
                       "error": round(sum(v["error"] for v in clipped.values()), 8)}
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out
