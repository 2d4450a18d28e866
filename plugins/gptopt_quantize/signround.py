"""``quantize --method signround``: SignRound / AutoRound's block-wise rounding optimization, re-implemented on the
layer-wise engine (``gptopt_core.run_blockwise``) and gptopt's integer grids (Cheng et al., "Optimize Weight
Rounding via Signed Gradient Descent for the Quantization of LLMs", arXiv:2309.05516; Intel's auto-round).

For every linear layer of a transformer block, per weight a rounding offset ``V`` in [-0.5, 0.5] and per group two
clipping factors ``alpha`` (on the group's max) and ``beta`` (on its min), in [0.5, 1]:

    lo = beta * min(min(w_g), 0),  hi = alpha * max(max(w_g), 0)
    scale = max(-lo, hi) / ((2^b - 1) / 2)            (symmetric: gptopt's q4_0 / q8_0 grids)
    scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale)   (asymmetric: q4_1-style)
    w_q = scale * (clamp(round(w / scale + V) [+ zero], qmin, qmax) [- zero])

with ``round`` passed straight through for the gradient and the scale rounded to fp16 (as the grids store it).
All of a block's layers are tuned together on the block's output mean squared error against the unquantized block
on the same inputs, by signed gradient descent (``p -= lr_t * sign(grad)``, ``lr_t`` decaying linearly from ``lr``
to 0 over ``iters`` steps, AutoRound's SignSGD + LinearLR), one calibration micro-batch per step in a seeded order;
the parameters of the step with the lowest loss are kept (step 0 is round-to-nearest, V = 0, alpha = beta = 1).
Differences from AutoRound's defaults, said here: the target is the unquantized block on the inputs the quantized
block sees (the compressed earlier blocks' outputs, as GPTQ calibrates), not on the unquantized model's own hidden
states; the clipping factors start at 1 and stay in [0.5, 1].
The result is exactly on a :class:`gptopt_core.WeightGrid` (the exporters write it without re-rounding).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from gptopt_core.kit.grids import attach_grid, grid_from_groups
from gptopt_core.kit.groupsize import GroupSize
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import weight_matrix

CLIP_MIN = 0.5


@dataclass
class Tuned:
    """One layer's tunable rounding: the float weight ``W`` ``(out, in)``, offsets ``V``, clipping ``alpha`` /
    ``beta`` ``(out, groups)``."""

    module: object
    param: object
    W: object
    V: object
    alpha: object
    beta: object

    def params(self):
        return [self.V, self.alpha, self.beta]


def _ste_round(x):
    return x + (x.round() - x).detach()


def _ste_half(x):
    return x + (x.half().float() - x).detach()


def qdq(W, V, alpha, beta, bits: int, gs, symmetric: bool, codes: bool = False):
    """De-quantized weights (differentiable in ``V``, ``alpha``, ``beta``), ``gs`` a :class:`gptopt_core.GroupSize`;
    ``codes=True``: ``(codes int32, scale (out, groups), zero or None)`` instead, the exact grid of the same
    numbers."""
    import torch

    out, cols = W.shape
    gs = GroupSize.of(gs).columns(cols)  # per channel: one group per row
    g = W.reshape(out, cols // gs, gs)
    lo = g.amin(-1).clamp(max=0) * beta
    hi = g.amax(-1).clamp(min=0) * alpha
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((2 ** bits - 1) / 2)
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        scale = (hi - lo) / (2 ** bits - 1)
        qmin, qmax = 0, 2 ** bits - 1
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = _ste_half(scale)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))  # fp16 underflow
    zero = None if symmetric else _ste_round(-lo / scale).clamp(qmin, qmax)
    q = _ste_round(g / scale[..., None] + V.reshape(g.shape))
    if zero is not None:
        q = q + zero[..., None]
    q = q.clamp(qmin, qmax)
    if codes:
        return q.detach().reshape(out, cols).to(torch.int32), scale.detach(), None if zero is None else zero.detach()
    if zero is not None:
        q = q - zero[..., None]
    return (q * scale[..., None]).reshape(out, cols)


def _set_weight(module, w):
    """Put ``w`` ``(out, in)`` in place of the layer's weight for the forward pass (autograd-tracked); the weight
    parameter itself waits in :attr:`Tuned.param`."""
    module._parameters.pop("weight", None)
    module.__dict__["weight"] = w.t() if is_conv1d(module) else w


def _restore(t: "Tuned", w) -> None:
    """The original weight parameter back, holding ``w`` ``(out, in)``."""
    t.module.__dict__.pop("weight", None)
    t.module._parameters["weight"] = t.param
    weight_matrix(t.module).copy_(w.to(t.param.dtype))


def block_loss(block, tuned, spec, inputs, targets) -> float:
    """Mean squared error of the block's output on ``inputs`` with every layer at its current rounding."""
    import torch

    bits, gs, symmetric = spec
    with torch.no_grad():
        for t in tuned:  # none: the layers as they are
            _set_weight(t.module, qdq(t.W, t.V, t.alpha, t.beta, bits, gs, symmetric))
        total = sum(float(torch.nn.functional.mse_loss(block.output(a, k), y, reduction="sum"))
                    for (a, k), y in zip(inputs, targets))
    return total / sum(y.numel() for y in targets)


def tune_block(block, layers: dict, spec, iters: int, lr: float, seed: int) -> dict:
    """Tune the rounding of ``layers`` ``{name: module}`` of ``block`` (a :class:`gptopt_core.BlockInfo` with its
    inputs); leave each layer exactly on its grid (attached). Returns ``{"loss_rtn", "loss", "best_step"}``:
    the block's output MSE over all its calibration inputs at round-to-nearest and after tuning."""
    import torch

    bits, gs, symmetric = spec
    inputs = block.inputs
    with torch.no_grad():
        targets = [block.output(a, k).detach() for a, k in inputs]
    tuned = []
    for module in layers.values():
        W = weight_matrix(module).detach().float().clone()
        groups = (W.shape[0], W.shape[1] // GroupSize.of(gs).columns(W.shape[1]))
        tuned.append(Tuned(module, module.weight, W, torch.zeros_like(W, requires_grad=True),
                           torch.ones(groups, requires_grad=True), torch.ones(groups, requires_grad=True)))
    frozen = [p for p in block.module.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        result = _descend(block, tuned, spec, inputs, targets, iters, lr, seed)
    finally:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for t in tuned:
                codes, scale, zero = qdq(t.W, t.V, t.alpha, t.beta, bits, gs, symmetric, codes=True)
                grid = grid_from_groups(bits, gs, symmetric, list(scale.unbind(1)),
                                        None if zero is None else list(zero.unbind(1)))
                _restore(t, grid.dequantize(codes))
                attach_grid(t.module, grid)
    result["loss"] = block_loss(block, [], spec, inputs, targets)
    return result


def _descend(block, tuned, spec, inputs, targets, iters, lr, seed) -> dict:
    """Signed gradient descent, one micro-batch per step; the best step's parameters are left in ``tuned``."""
    import torch

    bits, gs, symmetric = spec
    params = [p for t in tuned for p in t.params()]
    best = [p.detach().clone() for p in params]
    best_loss, best_step, loss_rtn = float("inf"), 0, None
    order = random.Random(seed)
    with torch.enable_grad():
        for step in range(iters + 1):
            i = order.randrange(len(inputs))
            for t in tuned:
                _set_weight(t.module, qdq(t.W, t.V, t.alpha, t.beta, bits, gs, symmetric))
            loss = torch.nn.functional.mse_loss(block.output(*inputs[i]), targets[i])
            value = float(loss.detach())
            if step == 0:
                loss_rtn = block_loss(block, tuned, spec, inputs, targets) if len(inputs) > 1 else value
            if value < best_loss:
                best_loss, best_step = value, step
                for b, p in zip(best, params):
                    b.copy_(p.detach())
            if step == iters:
                break
            for p in params:
                p.grad = None
            loss.backward()
            rate = lr * (1 - step / iters)
            with torch.no_grad():
                for t in tuned:
                    for p in t.params():
                        if p.grad is not None:
                            p.sub_(rate * p.grad.sign())
                    t.V.clamp_(-0.5, 0.5)
                    t.alpha.clamp_(CLIP_MIN, 1.0)
                    t.beta.clamp_(CLIP_MIN, 1.0)
    with torch.no_grad():
        for b, p in zip(best, params):
            p.copy_(b)
    return {"loss_rtn": loss_rtn, "best_step": best_step}


def signround_layers(ctx, p, layers, spec, metrics: dict) -> list[str]:
    """SignRound on the layers inside the decoder blocks, block by block on the calibration engine; adds its figures
    to ``metrics``; returns the names outside the blocks (the caller rounds them to nearest)."""
    import torch

    from gptopt_core.kit.calibration import calibration_batches, run_blockwise, split_by_block, torch_threads

    def torch_threads_now():
        return torch.get_num_threads()

    iters = 200 if p.iters is None else p.iters
    lr = p.lr or 1.0 / max(iters, 1)
    n_blocks, seq_len = p.calibration()
    by_block, outside = split_by_block(ctx.model, [n for n, _ in layers])
    losses = {}

    threads = 1 if str(ctx.device).startswith("cpu") else None

    def compress(block, stats):
        # one thread on CPU: a block's small matmuls pay more in thread barriers than they gain (tiny Llama, 10
        # steps: 0.7 s with 1 thread, 14 s with 2 on this busy 2-core machine)
        with torch_threads(threads or torch_threads_now()):
            got = tune_block(block, {n: st.module for n, st in stats.items()}, spec, iters, lr,
                             ctx.seed + block.index)
        losses[block.name] = got

    batches = calibration_batches(ctx, n_blocks, seq_len)
    report = run_blockwise(ctx.model, batches, compress, layers=[n for b in by_block.values() for n in b], stats=(),
                           sequential=False, offload=p.offload or "none", device=ctx.device, progress=ctx.progress)
    metrics.update({"iters": iters, "lr": lr, "calib_tokens": report["calib_tokens"], "offload": report["offload"],
                    "engine": report, "rtn_layers": list(outside),
                    "block_loss_rtn": round(sum(v["loss_rtn"] for v in losses.values()), 8),
                    "block_loss": round(sum(v["loss"] for v in losses.values()), 8),
                    "blocks_improved": sum(v["loss"] < v["loss_rtn"] for v in losses.values())})
    return list(outside)
