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

Offloading (``offload``):

* ``"none"``: the model stays where it is.
* ``"cpu"``: the model's parameters stay in CPU memory; only the block being compressed (plus the cached
  calibration activations) is moved to the compute ``device``. On a CPU-only machine this is ``"none"``.
* ``"disk"``: every block's tensors are written to a temporary directory with ``safetensors`` and the block is
  moved to the ``meta`` device (no storage); the block being compressed is read back, compressed, written
  again and dropped. Only one block's parameters are resident at any time; at the end every block is read back
  (compressed) so the model is whole again for ``eval`` / ``save``.

The embeddings and the modules before the first block (and the final norm / head, which never run) stay
resident: they are needed to compute the first block's inputs.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from .modules import is_weight_layer, weight_matrix

OFFLOAD_MODES = ("none", "cpu", "disk")
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
    """The block being compressed: its index, qualified name and module."""

    index: int
    name: str
    module: Any


class _Stop(Exception):
    pass


class _Collector:
    """Forward hooks on some layers that add their inputs to :class:`LayerStats` (``kinds`` empty: collect nothing)
    and record which layers read the same input tensor (for sequential groups). Layers that read the very same
    input tensor (Llama's q/k/v, gate/up) share one set of statistics: it is computed once and handed to each.
    Once every hooked layer has seen the current batch, the block's forward pass is stopped: nothing after them is
    needed."""

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
    """``(prefix, ModuleList)`` of the transformer blocks (GPT-2 ``transformer.h``, Llama ``model.layers``):
    the longest ``nn.ModuleList`` whose children share one type; ``(None, None)`` when there is none."""
    import torch.nn as nn

    best = (None, None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
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


# -- offloading -------------------------------------------------------------------------------------------------
def _tensors(module):
    """``[(owner module, kind, attribute name, qualified name, tensor)]`` of a module's parameters and buffers."""
    out = []
    for mod_name, mod in module.named_modules():
        for kind, table in (("param", mod._parameters), ("buffer", mod._buffers)):
            for key, t in table.items():
                if t is not None:
                    out.append((mod, kind, key, f"{mod_name}.{key}" if mod_name else key, t))
    return out


def _set_tensor(mod, kind, key, tensor, like):
    import torch.nn as nn

    if kind == "param":
        mod._parameters[key] = nn.Parameter(tensor, requires_grad=like.requires_grad)
    else:
        mod._buffers[key] = tensor


class _DiskStore:
    """Blocks written to safetensors files and replaced by ``meta`` tensors until they are loaded again."""

    def __init__(self, directory: Optional[str] = None):
        import os
        import tempfile

        from .paths import remove_stale_temporaries

        remove_stale_temporaries(directory or tempfile.gettempdir(), "gptopt-offload-")  # of runs killed with -9
        self._tmp = tempfile.TemporaryDirectory(prefix=f"gptopt-offload-{os.getpid()}-", dir=directory)
        self.dir = self._tmp.name

    def path(self, index: int) -> str:
        import os

        return os.path.join(self.dir, f"block-{index:04d}.safetensors")

    def drop(self, index: int, block) -> None:
        import torch
        from safetensors.torch import save_file

        entries = _tensors(block)
        save_file({q: t.detach().contiguous().cpu() for _, _, _, q, t in entries}, self.path(index))
        for mod, kind, key, _, t in entries:
            _set_tensor(mod, kind, key, torch.empty_like(t, device="meta"), t)

    def load(self, index: int, block, device) -> None:
        from safetensors.torch import load_file

        stored = load_file(self.path(index), device=str(device))
        for mod, kind, key, q, t in _tensors(block):
            _set_tensor(mod, kind, key, stored[q], t)

    def close(self) -> None:
        self._tmp.cleanup()


def resident_param_bytes(model, device=None) -> int:
    """Bytes of the model's parameters that hold storage (not ``meta``); with ``device``, only those on it."""
    import torch

    seen, total = set(), 0
    for p in model.parameters():
        if p.device.type == "meta" or (device is not None and p.device != torch.device(device)):
            continue
        key = (p.device, p.data_ptr())
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


# -- running blocks -----------------------------------------------------------------------------------------------
def _hidden(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


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


@contextlib.contextmanager
def _outside_blocks_on(model, blocks, device):
    """Move every parameter/buffer outside the block list to ``device`` for the capture; restore after."""
    block_ids = {id(t) for b in blocks for _, _, _, _, t in _tensors(b)}
    moved = []
    for mod, kind, key, _, t in _tensors(model):
        if id(t) in block_ids or t.device == device:
            continue
        moved.append((mod, kind, key, t))
        _set_tensor(mod, kind, key, t.data.to(device), t)
    try:
        yield
    finally:
        for mod, kind, key, t in moved:
            _set_tensor(mod, kind, key, t, t)


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

    kinds = tuple(stats)
    for k in kinds:
        if k not in STAT_KINDS:
            raise ValueError(f"unknown statistic '{k}'; use {', '.join(STAT_KINDS)}")
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    prefix, blocks = find_blocks(model)
    if blocks is None:
        raise ValueError("the model has no list of transformer blocks to calibrate block by block")
    home = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    device = torch.device(device) if device is not None else home
    names = [n for n, m in model.named_modules() if is_weight_layer(m)] if layers is None else list(layers)
    by_block, _ = split_by_block(model, names)
    modules = dict(model.named_modules())
    start = time.perf_counter()
    was_training = model.training
    model.eval()
    store = _DiskStore(offload_dir) if offload == "disk" else None
    report = {"blocks": len(blocks), "layers": 0, "groups": 0, "calib_tokens": int(sum(b.numel() for b in batches)),
              "offload": offload, "device": str(device)}
    peaks = {"resident": 0, "compute": 0}

    def sample():
        peaks["resident"] = max(peaks["resident"], resident_param_bytes(model))
        peaks["compute"] = max(peaks["compute"], resident_param_bytes(model, device))

    try:
        with torch.no_grad():
            if offload != "none":
                blocks.to("cpu")
            if store is not None:
                for i, block in enumerate(blocks):
                    store.drop(i, block)
            with _outside_blocks_on(model, blocks, device) if offload != "none" else contextlib.nullcontext():
                inputs = capture_first_inputs(model, blocks, batches, device)
            last = max(by_block) if by_block else -1
            steps = range(last + 1)
            for i in (progress(steps, "calibrate") if progress else steps):
                block = blocks[i]
                if store is not None:
                    store.load(i, block, device)
                elif offload == "cpu":
                    block.to(device)
                info = BlockInfo(i, f"{prefix}.{i}", block)
                wanted = {n: modules[n] for n in by_block.get(i, [])}
                if wanted:
                    groups = [list(wanted)]
                    if sequential:  # which layers read the same input, in data-flow order: one batch tells
                        col = _Collector(wanted, (), record_order=True)
                        try:
                            col.run(block, inputs[:1])
                        finally:
                            col.remove()
                        groups = col.groups()
                        del col
                    for group in groups:  # each group calibrates on the block with the groups before it compressed
                        col = _Collector({n: wanted[n] for n in group}, kinds)
                        try:
                            col.run(block, inputs)
                        finally:
                            gathered = col.remove()
                        sample()
                        compress(info, {n: gathered[n] for n in group})
                        report["groups"] += 1
                        report["layers"] += len(group)
                    del gathered
                sample()
                if i < last:
                    inputs = [_with_hidden(a, k, _run_block(block, a, k)) for a, k in inputs]
                if store is not None:
                    store.drop(i, block)
                elif offload == "cpu":
                    block.to("cpu")
            del inputs
    finally:
        if store is not None:
            for i, block in enumerate(blocks):
                if any(p.device.type == "meta" for p in block.parameters()):
                    store.load(i, block, home if offload != "none" else device)
            store.close()
        if offload != "none":
            blocks.to(home)
        model.train(was_training)
    report["seconds"] = round(time.perf_counter() - start, 3)
    report["peak_resident_param_bytes"] = int(peaks["resident"])
    report["peak_compute_param_bytes"] = int(peaks["compute"])
    return report


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
    second-order (OBS) updates.

    Raises the dampening ``d`` tenfold (up to 1.0) while the damped Hessian is not positive definite; returns
    ``(U, dampening used)``; raises ``ValueError`` when even 1.0 does not make it so.
    """
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
