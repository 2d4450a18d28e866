"""The family matrix: which step (cell) runs on which family of the architecture table, and why not where not.

``tests/test_families.py`` runs every cell on every dense family's tiny model and ``tests/test_moe.py`` every cell on
every mixture-of-experts family's (a supported cell must do what it is for, on a MoE also to the experts and
routers; an unsupported one must refuse in one line) and ``docs/architectures.md`` is generated from this list and the table,
so the page says what the tests check.
"""
from __future__ import annotations

from typing import Optional

from . import vocabulary

#: cell name -> :class:`gptopt_core.MatrixCell` (what the family needs for it; ``needs=None``: nothing beyond being
#: a causal LM with linear layers), as the plugins that own the cells' steps declare them
#: (``gptopt_register_vocabulary``; the core's ``eval`` and ``save safetensors`` too)
CELLS = vocabulary.CELLS


def supported(arch, cell: str) -> Optional[str]:
    """``None`` when ``cell`` runs on the family ``arch``; otherwise why not, in a few words."""
    needs = CELLS[cell].needs
    if needs is not None and getattr(arch, needs, None) is None:
        return CELLS[cell].why_not or f"the family has no {needs} in the table"
    return None
