"""Option values from any door (CLI text, recipe, Python), as pydantic validators a params field carries.

A plugin's params annotate a field with the type it holds and the core's parser for it, so the CLI, the recipe
keys and the Python keyword arguments all accept the same spellings with the same errors::

    from typing import Annotated, Literal, Optional

    import pydantic
    from gptopt_core import GroupSize, Params, as_choice, as_group_size, as_percent

    class MyParams(Params):
        budget: Annotated[float, as_percent()] = pydantic.Field(0.1, gt=0)           # "10%" or 0.1
        group_size: Annotated[Optional[GroupSize], as_group_size()] = None   # 64, "64", "channel"
        bits: Annotated[Optional[Literal[4, 8]], as_choice((4, 8), "quantizes to 4 or 8 bits, not {value}")] = None

The annotation's type is what ``gptopt run STEP --help`` and docs/cli.md show (choices of a ``Literal``).
"""
from __future__ import annotations

import functools

import pydantic

from .kit.groupsize import GroupSize, parse_group_size
from .steps import parse_choice, parse_percent

__all__ = ["as_percent", "as_group_size", "as_choice", "group_columns"]


def as_percent() -> pydantic.BeforeValidator:
    """A fraction (a sparsity, a relative increase, a share of the steps): ``"10%"`` → 0.10, ``"0.1"`` / ``0.1`` →
    0.1 (:func:`gptopt_core.parse_percent`). Every fraction option of the core and its plugins takes it, so ``50%``
    works wherever ``0.5`` does; the field's own bounds (``ge``, ``lt``, ...) apply to the converted value."""
    return pydantic.BeforeValidator(parse_percent)


def as_group_size() -> pydantic.BeforeValidator:
    """Input columns per scale: an int >= 2 (also ``"64"``) or ``"channel"`` (:func:`gptopt_core.parse_group_size`),
    on a field annotated ``Optional[GroupSize]``: the step gets a :class:`gptopt_core.GroupSize` (``None`` when not
    given), which every grid engine takes; a recipe stores ``64`` or ``"channel"`` as typed."""
    return pydantic.BeforeValidator(parse_group_size)


def as_choice(choices, message: str) -> pydantic.BeforeValidator:
    """One of a few whole numbers, also given as text (``"8"``); anything else is ``message`` formatted with
    ``{value}`` (:func:`gptopt_core.parse_choice`)."""
    return pydantic.BeforeValidator(functools.partial(parse_choice, choices=tuple(choices), message=message))


def group_columns(group_size, default=64) -> GroupSize:
    """The :class:`gptopt_core.GroupSize` a grid is fitted with, from an :func:`as_group_size` option: ``None`` (not
    given) is ``default`` (an int, ``"channel"`` or a ``GroupSize``), anything else is parsed as itself.
    It returned ``int | None`` before (CHANGELOG): ``.size`` is that value."""
    return GroupSize.of(default if group_size is None else group_size)
