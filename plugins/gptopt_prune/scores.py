"""How important each weight is: magnitude, Taylor (|w·∂L/∂w| over calibration batches) and Wanda (|w|·‖x‖,
block by block on the core's calibration engine). Scores are float tensors on a target's (out_features,
in_features) view; :class:`.pruning.Pruner` turns them into masks.
"""
from __future__ import annotations

from typing import Any

from gptopt_core import GptoptError, SourceError
from gptopt_core.kit.calibration import find_blocks, run_blockwise, split_by_block
from gptopt_core.kit.evaluate import model_device
from gptopt_core.kit.calibration import calibration_batches as core_calibration_batches


def magnitude_score(t: Target):
    return t.view().detach().abs().float()


def calibration_batches(ctx, params):
    """Calibration blocks from the train split, concatenated 8 at a time, on the model's device."""
    if getattr(ctx, "data", None) is None:
        raise GptoptError(f"prune --method {params.method} needs training text for calibration; give --data")
    try:
        out = core_calibration_batches(ctx, params.calib_samples, params.calib_seq_len)
    except SourceError as exc:
        raise GptoptError(f"prune --method {params.method} needs calibration text from the train split: {exc}") \
            from None
    device = model_device(ctx.model)
    return [b.to(device) for b in out]


def taylor_scores(ctx, model, targets: list[Target], batches) -> list:
    """sum over calibration batches of |w · ∂L/∂w| (causal LM loss), on the (out, in) view."""
    import torch

    flags = {p: p.requires_grad for p in model.parameters()}
    weights = [t.module.weight for t in targets]
    acc = [torch.zeros(w.shape, dtype=torch.float32, device=w.device) for w in weights]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for w in weights:
            w.requires_grad_(True)
        for batch in ctx.progress(batches, "prune taylor"):
            out = model(input_ids=batch, labels=batch, use_cache=False)
            out.loss.backward()
            with torch.no_grad():
                for w, a in zip(weights, acc):
                    if w.grad is not None:
                        a.add_((w.detach().float() * w.grad.float()).abs())
                    w.grad = None
            ctx.progress_info(f"loss {out.loss.item():.3f}")
            del out
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
    return [a.t() if t.conv1d else a for t, a in zip(targets, acc)]


class NormCollector:
    """Forward hooks that accumulate sum of x_j² per input channel j of each target (Wanda's ‖X_j‖²)."""

    def __init__(self, targets):
        self.sums, self.handles = {}, []
        for t in targets:
            self.handles.append(t.module.register_forward_hook(self._hook(t)))

    def _hook(self, t):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            s = (x * x).sum(0)
            self.sums[t] = self.sums[t] + s if t in self.sums else s
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def score(self, t: Target):
        import torch

        norm = torch.sqrt(self.sums[t]) if t in self.sums else None
        if norm is None:
            raise GptoptError(f"prune: {t.name} saw no calibration input (is it used in the forward pass?)")
        return t.view().detach().abs().float() * norm.to(t.module.weight.device)[None, :]


def full_pass_norms(model, group, batches) -> NormCollector:
    """Wanda's input norms of ``group`` from full forward passes (layers outside the decoder blocks)."""
    col = NormCollector(group)
    try:
        for b in batches:
            model(input_ids=b, use_cache=False)
    finally:
        col.remove()
    return col


def wanda(ctx, model, targets: list[Target], batches, pruner: Pruner, sequential: bool) -> dict:
    """Wanda, block by block on the core's calibration engine (:func:`gptopt_core.kit.calibration.run_blockwise`):
    the input-channel norms of one decoder block's layers, fed the previous block's outputs.

    ``sequential``: each block is pruned before its outputs feed the next block (later blocks see the pruned
    earlier ones); otherwise nothing changes while the engine runs, so every block sees dense inputs, and all
    targets are pruned at the end (needed for ``--scope global``). Targets outside the blocks (e.g. an included
    lm_head) get one full forward pass.
    """
    import torch

    by_name = {t.name: t for t in targets}
    _, blocks = find_blocks(model)
    inside_names, outside_names = split_by_block(model, list(by_name)) if blocks is not None else ({}, list(by_name))
    inside = [by_name[n] for names in inside_names.values() for n in names]
    outside = [by_name[n] for n in outside_names]
    pending: list[tuple[Target, Any]] = []  # (target, score) for pruning at the end
    peak_act = 0

    def compress(block, stats):
        group = [by_name[n] for n in stats]
        scores = []
        for t in group:
            if stats[t.name].sq_norms is None:
                raise GptoptError(f"prune: {t.name} saw no calibration input (is it used in the forward pass?)")
            norm = torch.sqrt(stats[t.name].sq_norms)
            scores.append(t.view().detach().abs().float() * norm.to(t.module.weight.device)[None, :])
        if sequential:
            pruner.prune(group, scores)
        else:
            pending.extend(zip(group, scores))

    with torch.no_grad():
        if outside and not sequential:
            col = full_pass_norms(model, outside, batches)
            pending += [(t, col.score(t)) for t in outside]
        if inside:
            run_blockwise(model, batches, compress, layers=[t.name for t in inside], stats=("sq_norms",),
                          sequential=False, progress=ctx.progress)
            hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
            peak_act = sum(b.numel() for b in batches) * hidden * 4 * 2  # a block's inputs and outputs, float32
        if outside and sequential:
            col = full_pass_norms(model, outside, batches)
            pruner.prune(outside, [col.score(t) for t in outside])
    if pending:
        order = {t: i for i, t in enumerate(targets)}
        pending.sort(key=lambda p: order[p[0]])
        pruner.prune([p[0] for p in pending], [p[1] for p in pending])
    return {"wanda_blockwise": bool(inside), "calib_activation_bytes": int(peak_act)}
