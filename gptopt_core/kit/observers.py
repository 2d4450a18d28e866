"""Observers: how an integer grid's per-group range is chosen, as a registry plugins extend.

An :class:`Observer` is registered through the ``gptopt_register_observers`` hook (the core registers the built-in
``minmax``, ``mse`` and ``hmse`` the same way, in ``builtin.py``); :func:`gptopt_core.fit_grid` and everything built on
it (``quantize --method rtn|gptq --observer NAME``, SparseGPT's joint quantization) look the name up here.

The observer's ``fit`` sees one layer's weight cut into groups and returns the range each group's grid spans; the
core turns a range into the grid's fp16-exact scale (and integer zero point) with the one formula every grid uses
(:func:`gptopt_core.fit_grid`), so an observer cannot make a grid the writers would store differently.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

_registry: Callable[[], Any] = lambda: None  # the process-wide plugin set; plugins.py sets it (no import circle)


@dataclass(frozen=True)
class Observer:
    """One way to choose a grid's range per group, for ``quantize --observer NAME``.

    ``fit(groups, bits, symmetric, importance)`` gets ``groups``, the layer's float32 weight as
    ``(out_features, n_groups, group_size)`` (per-channel: one group of ``in_features``), the grid's ``bits`` and
    whether it is ``symmetric``, and ``importance``: ``None``, or ``(1, n_groups, group_size)`` float32 per input
    column (the calibration Hessian's diagonal, given only to an observer registered with ``importance=True`` and
    only by ``--method gptq``). It returns ``(lo, hi)``, two ``(out_features, n_groups)`` tensors: each group's
    range. The core widens it to include 0 (``lo <= 0 <= hi``); symmetric grids use ``max(-lo, hi)``.
    """

    #: the name ``--observer`` takes, e.g. ``"mse"``
    name: str
    #: ``fit(groups, bits, symmetric, importance) -> (lo, hi)`` (see the class docstring)
    fit: Callable
    #: needs per-column importance, which only ``--method gptq`` collects (``--method rtn`` refuses it)
    importance: bool = False
    #: one sentence for ``--help`` and ``gptopt plugins``
    help: str = ""
    #: set by the registry: the plugin that registered it
    plugin: str = field(default="", compare=False)


def use_registry(get_plugins: Callable[[], Any]) -> None:
    """Where :func:`get_observer` finds the plugins (``gptopt_core.get_plugins``)."""
    global _registry
    _registry = get_plugins


def refusal(obs, table: dict, new: dict) -> Optional[str]:
    """Why a plugin may not register ``obs`` beside ``table`` (registered observers) and ``new`` (its own so far);
    ``None`` when it may."""
    if not isinstance(obs, Observer) or not isinstance(obs.name, str) or not obs.name or not callable(obs.fit):
        return f"registered {obs!r} as an observer: give a gptopt_core.Observer with a name and a fit function"
    if obs.name in table:
        return f"observer '{obs.name}' is already registered by {table[obs.name].plugin}"
    if obs.name in new:
        return f"registers observer '{obs.name}' twice"
    return None


def observers(plugins=None) -> dict:
    """``{name: Observer}``: every observer the loaded plugins registered, the core's first."""
    plugins = plugins if plugins is not None else _registry()
    return dict(getattr(plugins, "observers", None) or {})


def get_observer(name: str, plugins=None) -> Observer:
    """The registered :class:`Observer` called ``name``; ``ValueError`` with one line naming the registered ones."""
    table = observers(plugins)
    if name not in table:
        raise ValueError(f"unknown observer {name!r}; registered: {', '.join(sorted(table))} (a plugin adds one "
                         "with the gptopt_register_observers hook)")
    return table[name]
