"""The group size of an integer grid, one type from the command line to the engines.

A :class:`GroupSize` is either a number of consecutive input columns sharing one scale (``GroupSize(64)``) or one
group per output row (:data:`CHANNEL`, ``GroupSize(None)``). The option parser (:func:`gptopt_core.as_group_size`)
produces it from ``64`` / ``"64"`` / ``"channel"``; a step's params resolve "not given" to their default
(``QuantizeParams.grid_group_size``); every engine (``fit_grid``, the OBS solver behind GPTQ and SparseGPT, SignRound,
AWQ) takes it and asks it for ``columns(width)``. Engines also accept the older spellings (an int, ``"channel"`` or
``None`` for per channel) through :meth:`GroupSize.of`. A recipe stores it as it was typed: ``64`` or ``"channel"``.
:class:`~gptopt_core.kit.grids.WeightGrid` keeps the storage convention (``group_size``: an int, or ``None`` per
channel) that the writers read; :meth:`GroupSize.grid_size` gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["GroupSize", "CHANNEL", "parse_group_size"]

CHANNEL_WORDS = ("channel", "per-channel", "none")


def parse_group_size(value):
    """A group size from any door: an int >= 2, or ``"channel"`` (also ``per-channel`` / ``none``) for one group
    per output row; ``None`` passes through. Raises ``ValueError`` with a sentence otherwise."""
    if value is None:
        return None
    if isinstance(value, GroupSize):
        return value.size if value.size is not None else "channel"
    if isinstance(value, str):
        text = value.strip().lower()
        if text in CHANNEL_WORDS:
            return "channel"
        if not text.isdigit():
            raise ValueError(f"group size must be a number of input columns (32, 64, 128, ...) or 'channel', "
                             f"not {value!r}")
        value = int(text)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return value
    raise ValueError(f"group size must be at least 2 input columns or 'channel', not {value!r}")


@dataclass(frozen=True)
class GroupSize:
    """Input columns per scale (``size``), or ``size=None``: one scale per output row (per channel)."""

    size: Optional[int] = None

    @classmethod
    def of(cls, value, default=None) -> "GroupSize":
        """The group size of ``value``: a :class:`GroupSize`, an int, ``"64"``, ``"channel"``, or ``None`` (then
        ``default`` when given, else per channel: the engines' old convention)."""
        if isinstance(value, GroupSize):
            return value
        if value is None:
            return CHANNEL if default is None else cls.of(default)
        parsed = parse_group_size(value)
        return CHANNEL if parsed == "channel" else cls(int(parsed))

    @property
    def per_channel(self) -> bool:
        return self.size is None

    @property
    def grid_size(self) -> Optional[int]:
        """The :class:`~gptopt_core.kit.grids.WeightGrid` spelling: the size, or ``None`` per channel."""
        return self.size

    @property
    def value(self):
        """As an option or run.json spells it: the int, or ``"channel"``."""
        return "channel" if self.size is None else self.size

    def columns(self, width: int) -> int:
        """Columns in one group of a layer ``width`` inputs wide (``width`` itself per channel)."""
        return width if self.size is None else self.size

    def divides(self, width: int) -> bool:
        return self.size is None or width % self.size == 0

    def check(self, width: int, name: str = "layer") -> None:
        """Raise ``ValueError`` naming the width when the group size does not divide it."""
        if not self.divides(width):
            raise ValueError(f"group size {self.size} does not divide {name}'s input width {width}")

    def __str__(self) -> str:
        return "channel" if self.size is None else str(self.size)

    def __bool__(self) -> bool:  # never "falsy": per channel is a group size too (ask .per_channel)
        return True

    # -- pydantic: an option annotated ``Optional[GroupSize]`` validates with parse_group_size and dumps as typed
    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any):
        from pydantic_core import core_schema

        return core_schema.no_info_plain_validator_function(
            cls.of, serialization=core_schema.plain_serializer_function_ser_schema(lambda g: g.value))

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: Any, handler: Any) -> dict:
        return {"anyOf": [{"type": "integer", "minimum": 2}, {"const": "channel"}]}


#: one group per output row
CHANNEL = GroupSize(None)
