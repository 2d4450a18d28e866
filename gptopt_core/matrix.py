"""The family matrix: which step (cell) runs on which family of the architecture table, and why not where not.

``tests/test_families.py`` runs every cell on every family's tiny model (a supported cell must do what it is for, an
unsupported one must refuse in one line) and ``docs/architectures.md`` is generated from this list and the table,
so the page says what the tests check.
"""
from __future__ import annotations

from typing import Optional

from . import vocabulary

#: cell name -> :class:`gptopt_core.MatrixCell` (what the family needs for it; ``needs=None``: nothing beyond being
#: a causal LM with linear layers), as the plugins that own the cells' steps declare them
#: (``gptopt_register_vocabulary``; the core's ``eval`` and ``save safetensors`` too)
CELLS = vocabulary.CELLS


#: the cells ``tests/test_moe.py`` runs on each mixture-of-experts family (experts as linear layers, per expert
#: coverage, merged expert tensors in GGUF), kept few for the suite's time; a MoE family's other cells are not
#: checked yet
_GPTQ_GGUF = "gptq int4 -> export gguf q4_0 + llamacpp"
MOE_CELLS = {
    "mixtral": ("quantize rtn int4", "prune magnitude 2:4", "prune wanda", "prune sparsegpt",
                "save safetensors", "export gguf f32 + llamacpp", "rtn int8 -> export gguf q8_0 + llamacpp",
                _GPTQ_GGUF),
    "qwen2_moe": ("prune wanda", "save safetensors", _GPTQ_GGUF),
    "qwen3_moe": (_GPTQ_GGUF,),
    "olmoe": (_GPTQ_GGUF,),
}


def checked(arch, cell: str) -> bool:
    """Whether the tests run ``cell`` on the family ``arch`` (every cell on a dense family; :data:`MOE_CELLS` on a
    mixture of experts)."""
    return getattr(arch, "moe", None) is None or cell in MOE_CELLS.get(arch.model_type, ())


def supported(arch, cell: str) -> Optional[str]:
    """``None`` when ``cell`` runs on the family ``arch``; otherwise why not, in a few words."""
    needs = CELLS[cell].needs
    if needs is not None and getattr(arch, needs, None) is None:
        return CELLS[cell].why_not or f"the family has no {needs} in the table"
    return None
