"""The family matrix: which step (cell) runs on which family of the architecture table, and why not where not.

``tests/test_families.py`` runs every cell on every dense family's tiny model and ``tests/test_moe.py`` every cell on
every mixture-of-experts family's (a supported cell must do what it is for, on a MoE also to the experts and
routers; an unsupported one must refuse in one line) and ``docs/architectures.md`` is generated from this list and the table,
so the page says what the tests check.
"""
from __future__ import annotations

from typing import Optional

#: cell -> what the family needs for it (``None``: nothing beyond being a causal LM with linear layers)
CELLS = {
    "eval": None,
    "quantize bnb int8": None,
    "quantize bnb nf4": None,
    "quantize rtn int4": None,
    "quantize gptq int4": None,
    "prune magnitude": None,
    "prune magnitude 2:4": None,
    "prune wanda": None,
    "prune wanda 2:4": None,
    "prune sparsegpt": None,
    "prune sparsegpt 2:4": None,
    "lora + merge": None,
    "finetune": None,
    "l1 + finetune": None,
    "cpu-fast": None,
    "save safetensors": None,
    "save compressed-tensors": None,
    "export gguf f32 + llamacpp": "gguf",
    "rtn int8 -> export gguf q8_0 + llamacpp": "gguf",
    "gptq int4 -> export gguf q4_0 + llamacpp": "gguf",
}


def supported(arch, cell: str) -> Optional[str]:
    """``None`` when ``cell`` runs on the family ``arch``; otherwise why not, in a few words."""
    if CELLS[cell] == "gguf" and arch.gguf is None:
        return "llama.cpp has no architecture for it (no GGUF layout in the table)"
    return None
