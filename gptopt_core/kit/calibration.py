"""Layer-by-layer ("sequential") calibration: one engine for every compressor that needs layer inputs.

:func:`run_blockwise` runs calibration batches through a causal LM one transformer block at a time, the way the
GPTQ and SparseGPT reference code does:

1. the inputs of the first block (hidden states plus the keyword arguments the model passes its blocks: attention
   mask, position ids, Llama's rotary ``position_embeddings`` ...) are captured with a forward pre-hook that stops
   the forward pass there, so the output head never runs;
2. for each block, forward hooks on its linear / ``Conv1D`` layers collect what the compressor asked for
   (:class:`LayerStats`: the ``X^T X`` Hessian ``H = 2/n * sum x x^T`` and/or the per-input-channel ``sum x^2``);
3. the compressor's callback ``compress(block, stats)`` changes the block's weights;
4. the *compressed* block's outputs become the next block's inputs, so later blocks calibrate on what the
   compressed model really computes.

With ``sequential=True`` (the reference code's "true sequential") the layers of a block are compressed in the
order their inputs are computed: the layers reading the same input tensor form one group (Llama: q/k/v, o,
gate/up, down; GPT-2: c_attn, c_proj, c_fc, mlp.c_proj) and a group's statistics are collected after the groups
before it were compressed. This costs one block forward per group.

Offloading (``offload``: ``"none"``, ``"cpu"``, ``"disk"``) keeps only the block being compressed on the compute
device or in memory: :mod:`gptopt_core.kit.offload`.

The embeddings and the modules before the first block (and the final norm / head, which never run) stay
resident: they are needed to compute the first block's inputs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..architectures import architecture_of
from .experts import record_experts
from .modules import is_weight_layer, weight_matrix
from .offload import OFFLOAD_MODES, BlockPlacement, resident_param_bytes

STAT_KINDS = ("hessian", "sq_norms")


@dataclass(eq=False)
class LayerStats:
    """What one linear layer saw during calibration, on its ``(out, in)`` orientation.

    * ``hessian``: float32 ``(in, in)``, ``2/n * sum_t x_t x_t^T`` over the ``n`` calibration tokens (as in GPTQ);
    * ``sq_norms``: float32 ``(in,)``, ``sum_t x_t^2`` per input channel (Wanda's squared activation norm).
    """

    name: str
    module: Any
    samples: int = 0
    hessian: Any = None
    sq_norms: Any = None
    _sum: Any = field(default=None, repr=False)

    def weight(self):
        """The weight as an ``(out, in)`` view (GPT-2 ``Conv1D`` transposed; no copy)."""
        return weight_matrix(self.module)

    def add(self, x, kinds) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.samples += x.shape[0]
        if "hessian" in kinds:
            if self._sum is None:
                self._sum = x.new_zeros((x.shape[1], x.shape[1]))
            self._sum.addmm_(x.t(), x)
        if "sq_norms" in kinds:
            s = (x * x).sum(0)
            self.sq_norms = s if self.sq_norms is None else self.sq_norms + s

    def finish(self) -> "LayerStats":
        if self._sum is not None:
            self.hessian = self._sum.mul_(2.0 / max(self.samples, 1))
            self._sum = None
        return self


@dataclass
class BlockInfo:
    """The block being compressed: its index, qualified name and module; ``inputs``: ``[(args, kwargs)]`` it
    receives for each calibration batch (the compressed earlier blocks' outputs), for compressors that fit the
    block's output (e.g. rounding optimized on the block's output error); :meth:`output` runs the block on one."""

    index: int
    name: str
    module: Any
    inputs: list = field(default_factory=list, repr=False)

    def output(self, args, kwargs):  # the block's hidden-state output for one captured input
        return _run_block(self.module, args, kwargs)


class _Stop(Exception):
    pass


class _Collector:
    """Forward hooks on some layers that add their inputs to :class:`LayerStats` (``kinds`` empty: collect nothing)
    and record which layers read the same input tensor (for sequential groups). Layers that read the very same
    input tensor (Llama's q/k/v, gate/up) share one set of statistics: it is computed once and handed to each.
    Once every hooked layer has seen the batch, the block's forward pass stops: nothing after them is needed."""

    def __init__(self, layers: dict, kinds, record_order: bool = False):
        self.stats = {name: LayerStats(name, module) for name, module in layers.items()}
        self.kinds = kinds
        # (name, input tensor) in call order; the tensors are kept alive so that no later input can reuse their
        # storage and be mistaken for them
        self.order: list[tuple[str, Any]] = []
        self.record_order = record_order
        self.seen: set = set()
        self.batch_inputs: list[tuple[Any, str]] = []  # (input tensor, first layer that read it) this batch
        self.alias: dict[str, str] = {}  # layer -> the layer whose statistics it shares
        self.batches = 0
        self.handles = [module.register_forward_hook(self._hook(name)) for name, module in layers.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            if self.record_order:
                self.order.append((name, x))
            if self.kinds:
                first = next((n for t, n in self.batch_inputs if t is x), None)
                if self.batches == 0 and first is not None:
                    self.alias[name] = first
                if self.alias.get(name) != first:
                    raise RuntimeError(f"{name} read a different input tensor than in the first calibration batch")
                if first is None:
                    self.batch_inputs.append((x, name))
                    self.stats[name].add(x, self.kinds)
            self.seen.add(name)
            if len(self.seen) == len(self.stats):
                raise _Stop
        return hook

    def run(self, block, inputs) -> None:
        """Feed ``inputs`` through ``block``, each batch only as far as the hooked layers."""
        for a, k in inputs:
            self.seen, self.batch_inputs = set(), []
            try:
                _run_block(block, a, k)
            except _Stop:
                pass
            self.batches += 1
        self.batch_inputs = []

    def groups(self) -> list[list[str]]:
        """Layer names grouped by shared input tensor, in the order the inputs were computed."""
        out, seen = [], []  # seen: [(input tensor, its group)]
        for name, x in self.order:
            if any(name in g for g in out):
                continue
            group = next((g for t, g in seen if t is x), None)
            if group is not None:
                group.append(name)
            else:
                seen.append((x, [name]))
                out.append(seen[-1][1])
        missing = [n for n in self.stats if not any(n in g for g in out)]
        return out + ([missing] if missing else [])

    def remove(self) -> dict:
        for h in self.handles:
            h.remove()
        self.handles = []
        done = {n: s.finish() for n, s in self.stats.items() if n not in self.alias}
        for name, first in self.alias.items():  # same input: the same numbers (consumers copy before changing)
            st, src = self.stats[name], done[first]
            st.samples, st.hessian, st.sq_norms = src.samples, src.hessian, src.sq_norms
            done[name] = st
        return {n: done[n] for n in self.stats}


def find_blocks(model):
    """``(prefix, ModuleList)`` of the transformer blocks: where the architecture table says they are for a known
    family (GPT-2 ``transformer.h``, Llama ``model.layers``, GPT-NeoX ``gpt_neox.layers``, ...), else the longest
    ``nn.ModuleList`` whose children share one type and hold weight layers (one block is a list too);
    ``(None, None)`` when there is none."""
    import torch.nn as nn

    arch = architecture_of(model)
    if arch is not None:  # by name; a PEFT wrapper prefixes it (base_model.model.<blocks>)
        for name, module in model.named_modules():
            if (name == arch.blocks or name.endswith("." + arch.blocks)) and isinstance(module, nn.ModuleList):
                return name, module
    best = (None, None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            if any(is_weight_layer(m) for m in module[0].modules()):
                if best[1] is None or len(module) > len(best[1]):
                    best = (name, module)
    return best


def split_by_block(model, names: Iterable[str]):
    """``({block index: [qualified names]}, [names outside every block])`` for the given layer names."""
    prefix, blocks = find_blocks(model)
    inside: dict[int, list[str]] = {}
    outside = []
    for name in names:
        if prefix is not None and name.startswith(prefix + "."):
            inside.setdefault(int(name[len(prefix) + 1:].split(".")[0]), []).append(name)
        else:
            outside.append(name)
    return inside, outside


# -- running blocks -----------------------------------------------------------------------------------------------
def _with_hidden(args, kwargs, hidden):
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block, args, kwargs):
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _to(obj, device):
    """Move the tensors in captured block arguments (nested tuples / dicts) to ``device``."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def capture_first_inputs(model, blocks, batches, device) -> list:
    """``[(args, kwargs)]`` the model passes its first block for each batch; stops each forward pass there."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError("the first transformer block did not run for every calibration batch")
    return captured


def run_blockwise(model, batches, compress: Callable, *, layers: Optional[Iterable[str]] = None,
                  stats: Iterable[str] = ("hessian",), sequential: bool = True, offload: str = "none",
                  device=None, offload_dir: Optional[str] = None, progress=None) -> dict:
    """Compress ``model`` block by block on calibration ``batches``.

    :param model: a causal LM whose transformer blocks :func:`find_blocks` finds.
    :param batches: LongTensors ``[b, T]`` of calibration tokens (train split: ``ctx.calibration_blocks``).
    :param compress: ``compress(block: BlockInfo, stats: {name: LayerStats})``, called once per group of layers
        (``sequential``) or once per block; it changes the layers' weights in place.
    :param layers: qualified names of the linear / ``Conv1D`` layers to compress (default: every one inside the
        blocks). Names outside the blocks are ignored: the caller handles them (see :func:`split_by_block`).
    :param stats: which :class:`LayerStats` to collect: ``"hessian"`` and/or ``"sq_norms"``.
    :param sequential: compress a block's layers group by group, each group calibrated after the ones before it.
    :param offload: ``"none"``, ``"cpu"`` or ``"disk"`` (see the module docstring).
    :param device: compute device (default: where the model's parameters are).
    :param offload_dir: parent directory of the ``"disk"`` offload's temporary directory (default: the system's).
    :param progress: optional ``ctx.progress``-like wrapper.
    :returns: ``{"blocks", "layers", "groups", "calib_tokens", "offload", "seconds",
        "peak_resident_param_bytes", "peak_compute_param_bytes"}``.
    """
    import torch

    kinds = _checked_options(stats, offload)
    prefix, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError("the model has no list of transformer blocks to calibrate block by block")
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    device = torch.device(device) if device is not None else home
    names = [n for n, m in model.named_modules() if is_weight_layer(m)] if layers is None else list(layers)
    by_block, _ = split_by_block(model, names)
    modules = dict(model.named_modules())
    start, was_training = time.perf_counter(), model.training
    model.eval()
    place = BlockPlacement(model, blocks, offload, device, home, offload_dir)
    report = {"blocks": len(blocks), "layers": 0, "groups": 0, "calib_tokens": int(sum(b.numel() for b in batches)),
              "offload": offload, "device": str(device)}
    peaks = {"peak_resident_param_bytes": 0, "peak_compute_param_bytes": 0}
    try:
        with torch.no_grad():
            place.start()
            with place.outside_blocks_on_device():
                inputs = capture_first_inputs(model, blocks, batches, device)
            last = max(by_block) if by_block else -1
            for i in (progress(range(last + 1), "calibrate") if progress else range(last + 1)):
                block = place.fetch(i)
                wanted = {n: modules[n] for n in by_block.get(i, [])}
                if wanted:
                    _compress_block(BlockInfo(i, f"{prefix}.{i}", block, inputs), wanted, inputs, kinds,
                                    sequential, compress, report, lambda: _sample_peaks(model, device, peaks))
                _sample_peaks(model, device, peaks)
                if i < last:
                    inputs = [_with_hidden(a, k, _run_block(block, a, k)) for a, k in inputs]
                place.release(i)
            del inputs
    finally:
        place.close()
        model.train(was_training)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report.update({k: int(v) for k, v in peaks.items()})
    return report


def _checked_options(stats, offload: str) -> tuple:
    kinds = tuple(stats)
    for k in kinds:
        if k not in STAT_KINDS:
            raise ValueError(f"unknown statistic '{k}'; use {', '.join(STAT_KINDS)}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    return kinds


def _compress_block(info: BlockInfo, wanted: dict, inputs, kinds, sequential: bool, compress, report: dict,
                    sample) -> None:
    """Collect the statistics of one block's ``wanted`` layers (group by group when ``sequential``) and hand each
    group to ``compress``."""
    groups = [list(wanted)]
    if sequential:  # which layers read the same input, in data-flow order: one batch tells
        col = _Collector(wanted, (), record_order=True)
        try:
            col.run(info.module, inputs[:1])
        finally:
            col.remove()
        groups = col.groups()
    for group in groups:  # each group calibrates on the block with the groups before it compressed
        col = _Collector({n: wanted[n] for n in group}, kinds)
        try:
            col.run(info.module, inputs)
        finally:
            gathered = col.remove()
        record_experts(wanted, gathered)  # MoE expert views (gptopt_core.kit.experts): coverage, min-tokens rule
        sample()
        compress(info, {n: gathered[n] for n in group})
        report["groups"] += 1
        report["layers"] += len(group)


def _sample_peaks(model, device, peaks: dict) -> None:
    peaks["peak_resident_param_bytes"] = max(peaks["peak_resident_param_bytes"], resident_param_bytes(model))
    peaks["peak_compute_param_bytes"] = max(peaks["peak_compute_param_bytes"], resident_param_bytes(model, device))


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run the body with ``n`` intra-op threads. Column-by-column solvers (GPTQ, SparseGPT) issue thousands of small
    ops; with several threads each one pays a thread barrier, which on a busy machine costs far more than the op
    (measured: GPTQ of a 576 x 1536 layer, 6.1 CPU-s with 2 threads, 0.33 with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def calibration_batches(ctx, n: int, seq_len: int, micro_batch: int = 8) -> list:
    """``n`` calibration blocks of ``seq_len`` tokens from the train split, concatenated ``micro_batch`` at a time."""
    import torch

    blocks = ctx.calibration_blocks(n, seq_len)
    return [torch.cat(blocks[i:i + micro_batch]) for i in range(0, len(blocks), micro_batch)]


def inverse_hessian_cholesky(H, dampening: float):
    """Upper Cholesky factor ``U`` of ``(H + d·mean(diag H)·I)^-1``, whose rows drive GPTQ's and SparseGPT's
    second-order (OBS) updates. Raises the dampening ``d`` tenfold (up to 1.0) while the damped Hessian is not
    positive definite; returns ``(U, dampening used)``; raises ``ValueError`` when even 1.0 does not make it so."""
    import torch

    idx = torch.arange(H.shape[0], device=H.device)
    mean = torch.mean(torch.diag(H))
    damp = dampening
    while True:
        Hd = H.clone()
        Hd[idx, idx] += damp * mean
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U, damp
        if damp >= 1.0:
            raise ValueError("the calibration Hessian is not positive definite even with dampening 1.0")
        damp = min(damp * 10, 1.0)
