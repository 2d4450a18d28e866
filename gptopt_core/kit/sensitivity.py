"""Per-module sensitivity: how much the calibration loss moves when one module is replaced by a transformed copy.

Generic (no quantization library in here): a caller gives, per qualified module name, a function that builds a
replacement module (a quantized copy, a pruned copy, a low-rank copy ...). :func:`module_sensitivity` swaps
each one in, measures the mean next-token NLL on calibration blocks (from the *train* split, never the held-out
one: use ``ctx.calibration_blocks``), and swaps the original back. Plugins use the numbers to plan which
modules to transform how far (e.g. ``quantize --plan auto``).

Speed: the transformer blocks before the replaced module compute exactly what they computed without it, so
their outputs are computed once per block list and replayed (:class:`BlockCache`); a module in block ``i``
costs the embedding, blocks ``i..n`` and the head. Results are identical to full forwards (up to float
summation order, which does not change here).

NLL differences convert to perplexity ratios with ``math.exp(delta)``.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

from .calibration import find_blocks  # the one block-list finder (calibration engine, prune, here)


def get_module(model, name: str):
    """The submodule at qualified ``name`` (``""`` is the model)."""
    return model.get_submodule(name) if name else model


def replace_module(model, name: str, new):
    """Put ``new`` at qualified ``name``; returns the module that was there."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def _forward_nll(model, block) -> tuple[float, int]:
    import torch

    logits = model(input_ids=block, use_cache=False).logits[0, :-1].float()
    targets = block[0, 1:]
    nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    return float(nll), int(targets.numel())


def calibration_nll(model, blocks, cache: "BlockCache | None" = None, start_block: int = 0) -> float:
    """Mean next-token NLL of ``model`` over ``blocks`` (list of [1, T] LongTensors on the model's device).

    With ``cache`` and ``start_block > 0``, the first ``start_block`` transformer blocks replay their cached
    outputs instead of running (valid only while nothing before them changed).
    """
    import torch

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for j, block in enumerate(blocks):
                if cache is not None and start_block > 0:
                    with cache.replay(j, start_block):
                        nll, n = _forward_nll(model, block)
                else:
                    nll, n = _forward_nll(model, block)
                total += nll
                count += n
    finally:
        model.train(was_training)
    return total / max(count, 1)


class BlockCache:
    """Outputs of every transformer block for each calibration block, recorded once on the unchanged model.

    :meth:`start_index` says from which block a module's replacement can change anything; :meth:`replay`
    patches the blocks before it to return their recorded outputs.
    """

    def __init__(self, model, blocks):
        import torch

        self.model = model
        self.prefix, self.layers = find_blocks(model)
        self.outputs: list[list] = []
        if self.layers is None:
            return
        self.outputs = [[None] * len(blocks) for _ in self.layers]
        current = [0]
        handles = []

        def recorder(i):
            def hook(module, args, output):
                self.outputs[i][current[0]] = _detach(output)
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_hook(recorder(i)))
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for j, block in enumerate(blocks):
                    current[0] = j
                    model(input_ids=block, use_cache=False)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        self._order = [n for n, _ in model.named_modules()]

    def start_index(self, name: str) -> int:
        """Index of the first block whose output a change to module ``name`` can affect (0: none can be skipped)."""
        if self.layers is None:
            return 0
        pre = self.prefix + "."
        if name.startswith(pre):
            return int(name[len(pre):].split(".")[0])
        # a module after every block in module order (final norm, output head) can skip them all
        try:
            if self._order.index(name) > self._order.index(f"{self.prefix}.{len(self.layers) - 1}"):
                return len(self.layers)
        except ValueError:
            pass
        return 0

    def replay(self, block_index: int, start: int):
        import contextlib

        @contextlib.contextmanager
        def patched():
            saved = []
            for i in range(min(start, len(self.layers))):
                layer = self.layers[i]
                out = self.outputs[i][block_index]
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = (lambda o: (lambda *a, **k: o))(out)
            try:
                yield
            finally:
                for layer, fwd in saved:
                    if fwd is None:
                        del layer.forward
                    else:
                        layer.forward = fwd

        return patched()


def _detach(output):
    if isinstance(output, tuple):
        return tuple(_detach(o) for o in output)
    if hasattr(output, "detach"):
        return output.detach()
    return output


def module_sensitivity(model, blocks, replacements: dict[str, Callable], progress=None,
                       use_cache: bool = True) -> dict:
    """Calibration-loss change when each module alone is replaced.

    :param model: the model (left unchanged on return).
    :param blocks: calibration token blocks [1, T] on the model's device (train split).
    :param replacements: qualified module name → ``make(original_module) -> replacement_module``.
    :param progress: optional ``ctx.progress``-like wrapper for a progress bar.
    :param use_cache: replay the outputs of blocks before the replaced module (same result, less compute).
    :returns: ``{"base_nll": float, "delta_nll": {name: nll_with_replacement - base_nll}}``.
    """
    cache = BlockCache(model, blocks) if use_cache else None
    base = calibration_nll(model, blocks)
    deltas = {}
    names: Iterable[str] = list(replacements)
    iterator = progress(names, "sensitivity") if progress else names
    for name in iterator:
        original = get_module(model, name)
        new = replacements[name](original)
        replace_module(model, name, new)
        try:
            start = cache.start_index(name) if cache is not None else 0
            deltas[name] = calibration_nll(model, blocks, cache, start) - base
        finally:
            replace_module(model, name, original)
        del new
    return {"base_nll": base, "delta_nll": deltas}


def ppl_ratio(delta_nll: float) -> float:
    """Perplexity ratio for a mean-NLL difference."""
    return math.exp(delta_nll)
