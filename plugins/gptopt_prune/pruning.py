"""The pruning itself: which layers, which weights go (from the importance scores of :mod:`.scores`), the step's run.

Every score and mask is computed on the weight's (out_features, in_features) view, whatever the layer type
(GPT-2 ``Conv1D`` stores the transpose; an included ``nn.Embedding`` is taken as (vocab, dim)), and turned
back into the stored shape for ``ctx.state["masks"]``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from gptopt_core import GptoptError
from gptopt_core.kit.layertypes import is_conv1d, is_weight_layer
from gptopt_core.kit.modules import matches, weight_modules

from .scores import calibration_batches, magnitude_score, taylor_scores, wanda
from .sparsegpt_step import check_sparsegpt_targets, run_sparsegpt

#: magnitude and taylor compare weights across the whole layer, wanda within each output row (Wanda paper)
ROW_WISE = {"magnitude": False, "wanda": True, "taylor": False, "sparsegpt": False}


@dataclass(eq=False)
class Target:
    name: str
    module: Any

    @property
    def conv1d(self) -> bool:
        return is_conv1d(self.module)

    @property
    def embedding(self) -> bool:
        import torch.nn as nn

        return isinstance(self.module, nn.Embedding)

    def view(self):
        """(out, in) view of the weight (no copy)."""
        w = self.module.weight
        return w.t() if self.conv1d else w

    def to_stored(self, keep_view):
        return keep_view.t().contiguous() if self.conv1d else keep_view


# -- which layers -------------------------------------------------------------------------------------
def find_targets(model, include, exclude) -> list[Target]:
    """Linear / Conv1D layers (head and embeddings only when ``include`` names them), model order, de-duplicated
    by weight tensor (tied weights are pruned once)."""
    import torch.nn as nn

    candidates = [(n, m) for n, m in model.named_modules() if is_weight_layer(m) or isinstance(m, nn.Embedding)]
    for pattern in include:
        if not any(matches(n, [pattern]) for n, _ in candidates):
            example = next((n for n, m in candidates if is_weight_layer(m)), "?")
            raise GptoptError(f"prune: --include '{pattern}' matches no linear, Conv1D or embedding layer of this "
                              f"model; names look like '{example}'")
    chosen = {id(m) for _, m in weight_modules(model, include or None, exclude or None)}
    if include:
        chosen |= {id(m) for n, m in candidates if isinstance(m, nn.Embedding) and matches(n, include)
                   and not (exclude and matches(n, exclude))}
    targets, seen = [], set()
    # weight layers first, so a weight tied between an embedding and the head is pruned as the head
    order = {id(m): i for i, (_, m) in enumerate(candidates)}
    for name, module in sorted(candidates, key=lambda c: isinstance(c[1], nn.Embedding)):
        if id(module) not in chosen:
            continue
        weight = module.weight
        if getattr(weight, "quant_state", None) is not None or weight.dtype in _int_dtypes():
            raise GptoptError(f"prune: {name} holds quantized weights; put prune before quantize")
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        targets.append(Target(name, module))
    targets.sort(key=lambda t: order[id(t.module)])
    if not targets:
        raise GptoptError("prune: no layer left to prune after --include/--exclude; loosen --exclude")
    return targets


def _int_dtypes():
    import torch

    return (torch.int8, torch.uint8)


# -- which weights ------------------------------------------------------------------------------------
def keep_nm(score, n: int, m: int, name: str):
    """Keep the ``n`` highest-scoring of every ``m`` consecutive input weights of each row."""
    import torch

    rows, cols = score.shape
    if cols % m:
        raise GptoptError(f"prune: {name} has {cols} input features, not a multiple of M={m}; choose another "
                          f"N:M pattern or --exclude '{name}'")
    groups = score.reshape(rows, cols // m, m)
    drop = groups.topk(m - n, dim=-1, largest=False).indices
    keep = torch.ones(groups.shape, dtype=torch.bool, device=score.device)
    keep.scatter_(-1, drop, False)
    return keep.reshape(rows, cols)


def keep_rows(score, sparsity: float):
    """Per output row: drop the lowest scores; the layer total is exactly round(sparsity * numel) (the first
    ``remainder`` rows drop one more)."""
    import torch

    rows, cols = score.shape
    k_total = round(sparsity * rows * cols)
    base, extra = divmod(k_total, rows)
    keep = torch.ones((rows, cols), dtype=torch.bool, device=score.device)
    if base:  # topk per row is several times faster than sorting rows on CPU
        keep.scatter_(1, score.topk(base, dim=1, largest=False, sorted=False).indices, False)
    if extra:
        nxt = score[:extra].masked_fill(~keep[:extra], float("inf")).argmin(dim=1)
        keep[torch.arange(extra, device=score.device), nxt] = False
    return keep


def _drop_lowest(flat, k: int):
    """Bool mask of exactly ``k`` lowest entries of a 1-D tensor (ties at the threshold broken by position)."""
    import torch

    drop = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k:
        threshold = flat.kthvalue(k).values
        drop = flat < threshold
        need = k - int(drop.sum())
        if need > 0:
            drop[(flat == threshold).nonzero().squeeze(1)[:need]] = True
    return drop


def keep_layer(score, sparsity: float):
    """Drop exactly round(sparsity * numel) lowest scores of the whole layer."""
    return ~_drop_lowest(score.flatten(), round(sparsity * score.numel())).reshape(score.shape)


def keep_global(scores: list, sparsity: float) -> list:
    """Drop exactly round(sparsity * total) lowest scores over all layers together (ties broken by order)."""
    import torch

    flat = torch.cat([s.flatten().float().cpu() for s in scores])
    drop = _drop_lowest(flat, round(sparsity * flat.numel()))
    del flat
    out, start = [], 0
    for s in scores:
        out.append((~drop[start:start + s.numel()]).reshape(s.shape).to(s.device))
        start += s.numel()
    return out


class Pruner:
    """Turns importance scores into masks, applies them and records them in ``ctx.state["masks"]``."""

    def __init__(self, ctx, params):
        self.ctx, self.params = ctx, params
        self.nm = params.nm
        self.sparsity = params.target_sparsity
        self.row_wise = ROW_WISE[params.method]

    def prune(self, targets: list[Target], scores: list) -> None:
        """``scores``: float tensors on the (out, in) view, one per target (all pruned together if global)."""
        import torch

        if self.params.scope == "global":
            keeps = keep_global(scores, self.sparsity)
        else:
            keeps = []
            for t, s in zip(targets, scores):
                if self.nm:
                    keeps.append(keep_nm(s, *self.nm, t.name))
                elif self.row_wise:
                    keeps.append(keep_rows(s, self.sparsity))
                else:
                    keeps.append(keep_layer(s, self.sparsity))
        masks = self.ctx.state.setdefault("masks", {})
        with torch.no_grad():
            for t, keep in zip(targets, keeps):
                stored = t.to_stored(keep)
                weight = t.module.weight
                weight.mul_(stored.to(dtype=weight.dtype, device=weight.device))
                old = masks.get(t.name)
                if old is not None and tuple(old.shape) == tuple(stored.shape):
                    stored = old.to(stored.device) & stored
                masks[t.name] = stored


# -- the step -----------------------------------------------------------------------------------------
def check_targets(targets: list[Target], params) -> None:
    nm = params.nm
    for t in targets:
        cols = t.view().shape[1]
        if nm and cols % nm[1]:
            raise GptoptError(f"prune: {t.name} has {cols} input features, not a multiple of M={nm[1]}; choose "
                              f"another N:M pattern or --exclude '{t.name}'")
        if params.method in ("wanda", "sparsegpt") and t.embedding:
            raise GptoptError(f"prune --method {params.method} cannot score embedding '{t.name}' (it has no input "
                              "activations); use --method magnitude or taylor, or --exclude it")


def preflight(ctx, params) -> None:
    """Everything that can fail on the loaded model or the data, checked before the chain's first step."""
    targets = find_targets(ctx.model, params.include, params.exclude)
    check_targets(targets, params)
    if params.method == "sparsegpt":
        check_sparsegpt_targets(ctx.model, targets, params)
    if params.method in ("wanda", "taylor", "sparsegpt"):
        data = getattr(ctx, "data", None)
        have = int(data.train_ids.numel()) if data is not None else 0
        if have < params.calib_seq_len + 1:
            spec = getattr(data, "spec", "")
            raise GptoptError(
                f"prune --method {params.method} needs training text for calibration: the train split of "
                f"'{spec}' has {have} tokens, fewer than one block of --calib-seq-len {params.calib_seq_len}+1; "
                "give more --data or a smaller --calib-seq-len")


def run_prune(ctx, params) -> dict:
    import torch

    model = ctx.model
    start = time.perf_counter()
    targets = find_targets(model, params.include, params.exclude)
    check_targets(targets, params)
    pruner = Pruner(ctx, params)
    was_training = model.training
    model.eval()
    extra: dict = {}
    calib_tokens = 0
    try:
        if params.method == "magnitude":
            with torch.no_grad():
                if params.scope == "global":
                    pruner.prune(targets, [magnitude_score(t) for t in targets])
                else:  # one layer's scores at a time
                    for t in targets:
                        pruner.prune([t], [magnitude_score(t)])
        else:
            batches = calibration_batches(ctx, params)
            calib_tokens = sum(b.numel() for b in batches)
            if params.method == "sparsegpt":
                extra = run_sparsegpt(ctx, model, targets, batches, params)
            elif params.method == "taylor":
                pruner.prune(targets, taylor_scores(ctx, model, targets, batches))
            else:
                sequential = params.sequential and params.scope == "layer"
                extra = wanda(ctx, model, targets, batches, pruner, sequential)
                extra["sequential"] = sequential
    finally:
        model.train(was_training)
    layer_sparsity, zeros, total = {}, 0, 0
    with torch.no_grad():
        for t in targets:
            w = t.module.weight
            z = int((w == 0).sum())
            layer_sparsity[t.name] = round(z / w.numel(), 6)
            zeros += z
            total += w.numel()
    seconds = time.perf_counter() - start
    ctx.log(f"  prune {params.method} {params.pattern}: {len(targets)} layers, {zeros / total:.2%} of "
            f"{total:,} weights zero ({seconds:.1f}s)")
    return {"method": params.method, "pattern": params.pattern, "scope": params.scope,
            "target_sparsity": round(params.target_sparsity, 6), "pruned_sparsity": zeros / total,
            "pruned_layers": len(targets), "pruned_weights": total, "calib_tokens": calib_tokens,
            "prune_seconds": round(seconds, 3), "layer_sparsity": layer_sparsity, **extra}
