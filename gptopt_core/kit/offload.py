"""Where the transformer blocks live while :func:`gptopt_core.kit.calibration.run_blockwise` compresses them
(``offload``): ``"none"`` (where they are), ``"cpu"`` (CPU memory; only the block being compressed on the compute
device) or ``"disk"`` (safetensors files in a temporary directory, the blocks on the ``meta`` device; only the block
being compressed is read back, compressed, written again and dropped; at the end every block is read back so the
model is whole again for ``eval`` / ``save``). On a CPU-only machine ``"cpu"`` is ``"none"``. :class:`BlockPlacement`
is the one object the engine asks; the modes' branches are here."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Optional

from .paths import remove_stale_temporaries

OFFLOAD_MODES = ("none", "cpu", "disk")


class BlockPlacement:
    """The blocks of one ``run_blockwise`` call, offloaded as ``mode`` says from the start until :meth:`close`."""

    def __init__(self, model, blocks, mode: str, device, home, directory: Optional[str] = None):
        self.model, self.blocks, self.mode, self.device, self.home = model, blocks, mode, device, home
        self.store = DiskStore(directory) if mode == "disk" else None

    def start(self) -> None:
        """Move the blocks away from the compute device as the mode says (call inside the ``try`` that
        :meth:`close` ends)."""
        if self.mode != "none":
            self.blocks.to("cpu")
        if self.store is not None:
            for i, block in enumerate(self.blocks):
                self.store.drop(i, block)

    def outside_blocks_on_device(self):
        """While the first block's inputs are captured: what runs before it (embeddings, rotary tables) on the
        compute device (a no-op without offloading)."""
        if self.mode == "none":
            return contextlib.nullcontext()
        return outside_blocks_on(self.model, self.blocks, self.device)

    def fetch(self, index: int):
        """Block ``index`` on the compute device, ready to run."""
        block = self.blocks[index]
        if self.store is not None:
            self.store.load(index, block, self.device)
        elif self.mode == "cpu":
            block.to(self.device)
        return block

    def release(self, index: int) -> None:
        """Block ``index`` (compressed) back where the mode keeps it."""
        block = self.blocks[index]
        if self.store is not None:
            self.store.drop(index, block)
        elif self.mode == "cpu":
            block.to("cpu")

    def close(self) -> None:
        """Every block whole and back where the model was (also after an error)."""
        if self.store is not None:
            for i, block in enumerate(self.blocks):
                if any(p.device.type == "meta" for p in block.parameters()):
                    self.store.load(i, block, self.home)
            self.store.close()
        if self.mode != "none":
            self.blocks.to(self.home)


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


class DiskStore:
    """Blocks written to safetensors files and replaced by ``meta`` tensors until they are loaded again."""

    def __init__(self, directory: Optional[str] = None):
        remove_stale_temporaries(directory or tempfile.gettempdir(), "gptopt-offload-")  # of runs killed with -9
        self._tmp = tempfile.TemporaryDirectory(prefix=f"gptopt-offload-{os.getpid()}-", dir=directory)
        self.dir = self._tmp.name

    def path(self, index: int) -> str:
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


@contextlib.contextmanager
def outside_blocks_on(model, blocks, device):
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
