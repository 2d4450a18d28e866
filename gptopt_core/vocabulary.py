"""The shared vocabulary: ``ctx.state`` keys, fact families and family-matrix cells, each declared by its owner.

A plugin declares what it shares through the ``gptopt_register_vocabulary`` hook, with one record per word:

* :class:`StateKey`: a key of ``ctx.state`` (``masks``, ``gguf``, ...) and what its value is;
* :class:`Fact`: a fact family (``masks``, ``adapter``, ``quantized:4bit``'s ``quantized``) and what it says;
* :class:`MatrixCell`: a cell of the family matrix (``prune wanda``, ``export gguf f32 + llamacpp``): a short chain
  ``tests/test_families.py`` runs on every family's tiny model and ``docs/architectures.md`` lists.

The core declares its own words the same way (``builtin.py``: ``trainer``, ``original_model``, ``kl_base``, the
``quantized`` key and fact its model sources, save formats and several plugins share); no core module spells a
plugin's words. A word two plugins declare is an error of the second, as for steps; the registering plugin is the
word's owner. :data:`STATE_KEYS`, :data:`FACTS` and :data:`CELLS` are read-only views of what the loaded plugins
declared, and ``ctx.state`` (:class:`State`) refuses to store a key nobody declared.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Optional

_registry: Callable[[], Any] = lambda: None  # the process-wide plugin set; plugins.py sets it (no import circle)


@dataclass(frozen=True)
class StateKey:
    """A ``ctx.state`` key a plugin shares: ``StateKey("masks", "{qualified module name: bool tensor ...}")``."""

    #: the key, e.g. ``"masks"``
    name: str
    #: what the value is and who reads it (one or two sentences; ``docs/python-api.md`` lists it)
    meaning: str
    #: set by the registry: the plugin that declared it
    plugin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"state key '{self.name}'"


@dataclass(frozen=True)
class Fact:
    """A fact family a step may require, forbid or provide: ``Fact("adapter", "the model carries ...")``.

    A fact is the family or ``family:detail`` (``quantized:4bit``); the family is what is declared. ``lossy``: a
    step that provides it changes the model's outputs on purpose (quantization, pruning), so ``--kl-base auto``
    takes the model before the chain's first such step as the base of its KL measurements.
    """

    family: str
    meaning: str
    lossy: bool = False
    plugin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"fact '{self.family}'"


@dataclass(frozen=True)
class MatrixCell:
    """A cell of the family matrix: ``MatrixCell("export gguf f32 + llamacpp", needs="gguf", why_not="...")``.

    ``needs``: the :class:`gptopt_core.Architecture` field a family must have for the cell to run (``None``: any
    causal LM with linear layers); ``why_not``: the few words ``docs/architectures.md`` shows for a family without
    it. The cell's chain and checks live in the owner's tests (``tests/test_families.py`` for the built-in ones).
    """

    name: str
    needs: Optional[str] = None
    why_not: str = ""
    plugin: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        return f"matrix cell '{self.name}'"


_WORD = {StateKey: "name", Fact: "family", MatrixCell: "name"}


def use_registry(get_plugins: Callable[[], Any]) -> None:
    """Where the views find the plugins (``gptopt_core.get_plugins``)."""
    global _registry
    _registry = get_plugins


def refusal(record, table: dict, new: dict) -> Optional[str]:
    """Why a plugin may not declare ``record`` beside ``table`` (declared words) and ``new`` (its own so far)."""
    what = _WORD.get(type(record))
    if what is None:
        return (f"registered {record!r} in gptopt_register_vocabulary: give a gptopt_core.StateKey, Fact or "
                "MatrixCell")
    word, meaning = getattr(record, what), getattr(record, "meaning", "x")
    if not isinstance(word, str) or not word.strip() or not isinstance(meaning, str) or not meaning.strip():
        also = " and meaning" if hasattr(record, "meaning") else ""
        return f"registered {record!r}: give a non-empty {what}{also}"
    if isinstance(record, Fact) and ":" in word:
        return f"fact '{word}': declare the family only ('{word.split(':')[0]}'); details need no declaration"
    if isinstance(record, MatrixCell) and record.needs is not None and record.needs not in _architecture_fields():
        return f"matrix cell '{word}': needs='{record.needs}' is not a gptopt_core.Architecture field"
    if record.key in table:
        return f"{record.key} is already registered by {table[record.key].plugin}"
    if record.key in new:
        return f"registers {record.key} twice"
    return None


def _architecture_fields() -> set:
    from .architectures import Architecture

    return {f.name for f in fields(Architecture)}


def records(kind: type, plugins=None) -> dict:
    """``{word: record}`` of one kind (:class:`StateKey`, :class:`Fact`, :class:`MatrixCell`), in declaration
    order (the core's first)."""
    plugins = plugins if plugins is not None else _registry()
    table = getattr(plugins, "vocabulary", None) or {}
    return {getattr(r, _WORD[kind]): r for r in table.values() if type(r) is kind}


class _View(Mapping):
    """A read-only, live view of one kind of declared word: ``word -> value(record)``."""

    def __init__(self, kind: type, value: Callable, doc: str):
        self._kind, self._value, self.__doc__ = kind, value, doc

    def _table(self) -> dict:
        return records(self._kind)

    def __getitem__(self, word):
        return self._value(self._table()[word])

    def __iter__(self):
        return iter(self._table())

    def __len__(self):
        return len(self._table())

    def __repr__(self):
        return f"{{{', '.join(f'{k!r}: {v!r}' for k, v in self.items())}}}"


#: Every ``ctx.state`` key the loaded plugins declared: key → (owner, meaning); read-only (a plugin declares a key
#: with :class:`StateKey` in its ``gptopt_register_vocabulary`` hook). A test checks every ``ctx.state["..."]``
#: literal in ``plugins/`` against it, and ``ctx.state`` refuses to store an undeclared key.
STATE_KEYS: Mapping = _View(StateKey, lambda r: (r.plugin, r.meaning), "ctx.state keys: key -> (owner, meaning)")

#: Every fact family the loaded plugins declared: family → (owner, meaning); read-only (:class:`Fact`). A fact is a
#: string ``family`` or ``family:detail`` (``quantized:4bit``). Matching rule (:func:`gptopt_core.fact_matches`): a
#: pattern without a detail matches the family and every detail (``quantized`` matches ``quantized:8bit``); a
#: pattern with a detail matches only itself (``quantized:4bit`` does not match ``quantized:8bit``).
FACTS: Mapping = _View(Fact, lambda r: (r.plugin, r.meaning), "fact families: family -> (owner, meaning)")

#: Every family-matrix cell the loaded plugins declared: name → :class:`MatrixCell` (read-only)
CELLS: Mapping = _View(MatrixCell, lambda r: r, "family-matrix cells: name -> MatrixCell")


def lossy_families(plugins=None) -> set:
    """The fact families declared ``lossy`` (``quantized``, ``masks``, ...)."""
    return {family for family, r in records(Fact, plugins).items() if r.lossy}


class UndeclaredStateKey(LookupError):
    """A step stored a ``ctx.state`` key no loaded plugin declared."""


class State(dict):
    """``ctx.state``: a dict that stores only declared keys (:data:`STATE_KEYS` of the run's plugins).

    Reading is a dict's (an undeclared key is simply absent: its owner may not be loaded); storing a key nobody
    declared (``[]=``, ``setdefault``, ``update``) raises :class:`UndeclaredStateKey` naming it and how to declare it.
    """

    def __init__(self, items=(), plugins=None):
        self.plugins = plugins
        super().__init__()
        self.update(items)

    def _check(self, key) -> None:
        table = getattr(self.plugins if self.plugins is not None else _registry(), "vocabulary", None)
        if table is not None and f"state key '{key}'" not in table:
            raise UndeclaredStateKey(
                f"ctx.state[{key!r}] is not a declared state key; declare it in the plugin that owns it: "
                f"register(gptopt_core.StateKey({key!r}, 'what it holds')) in its gptopt_register_vocabulary hook "
                f"(declared: {', '.join(sorted(records(StateKey, self.plugins))) or 'none'})")

    def __setitem__(self, key, value) -> None:
        self._check(key)
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        if key not in self:
            self._check(key)
        return super().setdefault(key, default)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self

    def __copy__(self):
        return State(self, self.plugins)

    def __deepcopy__(self, memo):
        import copy

        return State(copy.deepcopy(dict(self), memo), self.plugins)
