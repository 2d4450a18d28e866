"""Plugin manager: entry points, block/load lists, per-plugin isolation and blame, step registry.

Loading one plugin is a transaction (after tox 4's plugin manager: validate, warn, unregister):

1. import its entry point (``ImportError``, ``SystemExit`` or anything else raised at import is caught);
2. register its hook implementations with pluggy (pluggy checks their arguments against the hookspecs);
3. validate them: a ``@hookimpl`` for a hook that does not exist (e.g. a misspelled name) is an error, and so is a
   function named like a known hook but not marked ``@hookimpl`` (pluggy would silently skip it);
4. register what its ``gptopt_register_*`` hooks give (steps, save formats, columns, architectures, observers,
   pre-tokenizers, vocabulary; :meth:`Plugins._call_registry_hook`): a wrong kind of object, no name, or a name
   the core or another plugin already registered (e.g. ``eval``) is an error naming both plugins.

A name ``GPTOPT_LOAD_PLUGINS`` / ``GPTOPT_BLOCK_PLUGINS`` excludes is rejected by :meth:`Plugins.register`, naming it.

If any part fails, the plugin is unregistered completely (its hooks and any steps it gave) and kept in
:attr:`Plugins.info` with a one-line ``error``; a warning names it and every other plugin keeps working. A module
that provides no hooks and no steps gets a ``warning``. With ``GPTOPT_STRICT_PLUGINS=1`` each of these is an
error instead (one line, exit code 2).

Environment:

* ``GPTOPT_LOAD_PLUGINS=a,b``: comma-separated allow-list of entry-point names; only these load (the core,
  ``gptopt-core``, always loads). Set but empty: no entry-point plugin loads.
* ``GPTOPT_BLOCK_PLUGINS=a,b``: comma-separated names that never load (pluggy's ``set_blocked``; the module is
  not even imported). Applied after the allow-list.
* Names in either list that no installed plugin has are warned about. Whitespace around names is ignored. A
  renamed plugin's old name (:data:`RENAMED`: ``gptopt-bnb`` is ``gptopt-quantize``) means the plugin.
* ``GPTOPT_STRICT_PLUGINS=1``: a plugin that fails to load, or provides nothing, is an error.
* ``GPTOPT_TRACE_PLUGINS=1``: one stderr line per hook implementation call: plugin, hook, ms, what it raised.

Every hook implementation is wrapped so that an unexpected exception it raises becomes a
:class:`PluginHookError` naming the plugin and the hook (a :class:`gptopt_core.GptoptError` a plugin raises on
purpose passes through unchanged). ``gptopt_run_finished`` implementations are isolated further: one that fails
is warned about and turned into a report section saying so, and the other plugins' sections are kept.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field, replace

import pluggy

from . import architectures, hookspecs, vocabulary, writers
from .kit import builtin, observers, pretokenizers
from .errors import GptoptError
from .hookcalls import PluginHookError, PluginLoadWarning, _blamed, _one_line  # noqa: F401 (public through here)
from .report import COLUMNS
from .writers import DIRECTORY
from .steps import Step
from .version import installed_version

GROUP = "gptopt"
CORE = "gptopt-core"
#: entry-point names a built-in plugin had before a rename -> its name now: the old name keeps working in
#: ``GPTOPT_LOAD_PLUGINS`` / ``GPTOPT_BLOCK_PLUGINS`` (recipes name steps, not plugins, so they need nothing)
RENAMED = {"gptopt-bnb": "gptopt-quantize"}
#: how the error of a plugin that failed to import starts; its warning is ``plugin NAME failed to load: ...``
LOAD_FAILED = "failed to load: "
#: record registries: PluginInfo field / Plugins table / gptopt_register_<it> hook -> (refusal's module, key)
_RECORD_TABLES = {"architectures": (architectures, "model_type"), "observers": (observers, "name"),
                  "pre_tokenizers": (pretokenizers, "name"), "vocabulary": (vocabulary, "key")}


class _Rejected(Exception):
    """Internal: why a plugin cannot be registered (one line)."""


@dataclass
class PluginInfo:
    """What ``gptopt plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    steps: list = field(default_factory=list)
    save_formats: list = field(default_factory=list)  # its directory writers (``save --format`` values)
    writers: list = field(default_factory=list)  # every writer it registered, directories and files
    columns: list = field(default_factory=list)
    architectures: list = field(default_factory=list)
    observers: list = field(default_factory=list)
    pre_tokenizers: list = field(default_factory=list)
    #: the words it declared (``gptopt_register_vocabulary``), e.g. ``["state key 'masks'", "fact 'masks'"]``
    vocabulary: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    error: str | None = None  # set when the plugin was rejected; it is then not registered at all
    warning: str | None = None  # loaded, but something is odd (e.g. it provides no hooks and no steps)
    builtin: bool = False
    #: older names of this plugin that still work and are listed (:data:`RENAMED`), e.g. ``["gptopt-bnb"]``
    aliases: list = field(default_factory=list)
    #: set only on the entry :meth:`Plugins.listing` shows under an old name: the plugin's name now
    renamed_to: str | None = None


class Plugins:
    """The loaded plugins: a pluggy manager plus what each plugin gave and what failed.

    :param strict: ``True`` makes a rejected plugin raise :class:`GptoptError`; default: ``GPTOPT_STRICT_PLUGINS``.
    """

    def __init__(self, strict: bool | None = None):
        self.pm = pluggy.PluginManager("gptopt")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.steps: dict[str, type] = {}
        #: writer name -> (plugin name, :class:`gptopt_core.Writer` subclass), in registration order
        self.formats: dict[str, tuple[str, type]] = {}
        #: metric key -> (plugin name, column title, format spec): ``gptopt_register_columns``
        self.columns: dict[str, tuple[str, str, str]] = {}
        #: ``config.model_type`` -> :class:`gptopt_core.Architecture` (its ``plugin`` says who gave it)
        self.architectures: dict = {}
        #: observer name -> :class:`gptopt_core.Observer` (``gptopt_register_observers``)
        self.observers: dict = {}
        #: ``tokenizer.ggml.pre`` name -> :class:`gptopt_core.PreTokenizer` (``gptopt_register_pre_tokenizers``)
        self.pre_tokenizers: dict = {}
        #: ``StateKey`` / ``Fact`` / ``MatrixCell`` ``.key`` -> record (``gptopt_register_vocabulary``)
        self.vocabulary: dict = {}
        #: entry-point name -> the environment variable that keeps it from loading
        self.excluded_by: dict[str, str] = {}
        self.strict = os.environ.get("GPTOPT_STRICT_PLUGINS") == "1" if strict is None else strict
        self.trace = os.environ.get("GPTOPT_TRACE_PLUGINS") == "1"

    @property
    def hook(self):
        return self.pm.hook

    # -- registering ----------------------------------------------------------------------------------
    def register(self, module, name: str, distribution=None, version=None, builtin=False) -> PluginInfo:
        """Register ``module`` (or any object with ``@hookimpl`` methods) as plugin ``name``, all or nothing.

        Returns its :class:`PluginInfo`; when the plugin was rejected, ``info.error`` says why and nothing of it is
        registered. Raises :class:`GptoptError` instead under strict mode.
        """
        info = PluginInfo(name, distribution, version, builtin=builtin, aliases=_aliases(name))
        try:
            if name in self.info:
                raise _Rejected(f"a plugin named {name} is already loaded"
                                + (f" (from {self.info[name].distribution})" if self.info[name].distribution else ""))
            self._register(module, info)
        except _Rejected as exc:
            self._drop(name, module)
            for what in ("steps", "save_formats", "writers", "columns", "hooks", *_RECORD_TABLES):
                setattr(info, what, [])
            info.error = _one_line(str(exc))
            self.info.setdefault(name, info)
            self._complain(info, info.error)
            return info
        self.info[name] = info
        if not info.hooks and not info.steps:
            info.warning = "provides no hooks and no steps (does the entry point name the right module?)"
            self._complain(info, info.warning)
        return info

    def _register(self, module, info: PluginInfo) -> None:
        name = info.name
        if self.pm.is_blocked(name):  # pluggy would register nothing and say nothing
            raise _Rejected(f"the name {name} is excluded by {self.excluded_by.get(name, 'a block list')}; "
                            "register it under another name or change that variable")
        _check_unmarked(module)
        try:
            self.pm.register(module, name=name)
        except pluggy.PluginValidationError as exc:
            raise _Rejected(_one_line(str(exc))) from None
        except ValueError as exc:  # the same object registered under another name, or a name clash in pluggy
            raise _Rejected(str(exc)) from None
        callers = self.pm.get_hookcallers(module) or []
        for caller in callers:
            if caller.spec is None:
                for impl in caller.get_hookimpls():
                    if impl.plugin is module and not impl.optionalhook:
                        raise _Rejected(f"implements unknown hook {caller.name}{_did_you_mean(caller.name)}")
        info.hooks = sorted(c.name for c in callers)
        info.steps = self._register_steps(module, name)
        info.writers = self._register_writers(module, name)
        info.save_formats = [n for n in info.writers if getattr(self.formats[n][1], "kind", DIRECTORY) == DIRECTORY]
        info.columns = self._register_columns(module, name)
        for what, (registry, key) in _RECORD_TABLES.items():  # gptopt_register_architectures, ...
            setattr(info, what, self._register_records(module, name, f"gptopt_register_{what}", getattr(self, what),
                                                       registry.refusal, key))
        self._wrap(module, name, callers)

    def _register_steps(self, module, name: str) -> list[str]:
        new: dict[str, type] = {}

        def register(step_cls):
            if not (isinstance(step_cls, type) and issubclass(step_cls, Step)):
                raise _Rejected(f"registered {step_cls!r}, which is not a gptopt_core.Step subclass")
            step_name = getattr(step_cls, "name", "")
            if not step_name or not isinstance(step_name, str):
                raise _Rejected(f"registered step class {step_cls.__name__} without a name")
            if step_name in self.steps:
                raise _Rejected(f"step '{step_name}' is already registered by plugin {self.steps[step_name].plugin}")
            if step_name in new:
                raise _Rejected(f"registers step '{step_name}' twice")
            new[step_name] = step_cls

        self._call_registry_hook(module, "gptopt_register_steps", register)
        for step_name, step_cls in new.items():  # only now: a rejected plugin leaves no step behind
            step_cls.plugin = name
            self.steps[step_name] = step_cls
        return list(new)

    def _register_writers(self, module, name: str) -> list[str]:
        new: dict[str, type] = {}

        def register(fmt_cls):
            why = writers.refusal(fmt_cls, self.formats, new)
            if why:
                raise _Rejected(why)
            new[fmt_cls.name] = fmt_cls

        for hook in ("gptopt_register_writers", "gptopt_register_save_formats"):  # the first contract's name too
            self._call_registry_hook(module, hook, register)
        for fmt_name, fmt_cls in new.items():  # only now: a rejected plugin leaves no writer behind
            self.formats[fmt_name] = (name, fmt_cls)
        return list(new)

    def _register_columns(self, module, name: str) -> list[str]:
        new: dict[str, tuple] = {}

        def register(key, title, spec=""):
            if not all(isinstance(v, str) for v in (key, title, spec)) or not key or not title:
                raise _Rejected(f"registered column {key!r}: give register(key, title, spec='') as strings")
            if key in COLUMNS or key in self.columns or key in new:
                owner = ("the core" if key in COLUMNS else "this plugin" if key in new else
                         f"plugin {self.columns[key][0]}")
                raise _Rejected(f"column '{key}' is already shown by {owner}")
            try:
                format(0.5, spec)
            except ValueError:
                raise _Rejected(f"column '{key}': '{spec}' is not a format spec for numbers (e.g. '.1%')") from None
            new[key] = (title, spec)

        self._call_registry_hook(module, "gptopt_register_columns", register)
        for key, (title, spec) in new.items():
            self.columns[key] = (name, title, spec)
        return list(new)

    def _register_records(self, module, name: str, hook: str, table: dict, refusal, key: str) -> list[str]:
        """A registry hook whose ``register`` takes a frozen record (an :class:`gptopt_core.Architecture`, an
        :class:`gptopt_core.Observer`) keyed by its attribute ``key``; ``refusal(record, table, new)`` says why not."""
        new: dict = {}

        def register(record):
            why = refusal(record, table, new)
            if why:
                raise _Rejected(why)
            new[getattr(record, key)] = record

        self._call_registry_hook(module, hook, register)
        for k, record in new.items():  # only now: a rejected plugin leaves nothing behind
            object.__setattr__(record, "plugin", name)
            table[k] = record
        return list(new)

    def _call_registry_hook(self, module, hook: str, register) -> None:
        """Call ``module``'s implementation of the registry hook ``hook`` with the ``register`` callback (the one
        way the core calls a ``gptopt_register_*`` hook); anything it raises rejects the plugin."""
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if impl.plugin is not module:
                continue
            try:
                impl.function(*[{"register": register}[a] for a in impl.argnames])  # hooks may take any subset
            except (Exception, SystemExit) as exc:
                if isinstance(exc, _Rejected):
                    raise
                raise _Rejected(f"{hook} raised {type(exc).__name__}: {exc}") from None

    def _wrap(self, module, name: str, callers) -> None:
        """Blame and trace: every hook implementation of this plugin names it when it raises."""
        for caller in callers:
            for impl in caller.get_hookimpls():
                if impl.plugin is module and not (impl.hookwrapper or getattr(impl, "wrapper", False)):
                    impl.function = _blamed(impl.function, name, caller.name, self.trace)

    def _complain(self, info: PluginInfo, reason: str) -> None:
        where = f" ({info.distribution})" if info.distribution and info.distribution != info.name else ""
        message = f"plugin {info.name}{where}: {reason}"
        if reason.startswith(LOAD_FAILED):  # the first contract's sentence, kept (docs/contract.md)
            message = f"plugin {info.name} {reason}" + (f" (distribution {info.distribution})" if where else "")
        if self.strict:
            raise GptoptError(message + " (GPTOPT_STRICT_PLUGINS=1)")
        warnings.warn(message, PluginLoadWarning, stacklevel=3)

    def _drop(self, name: str, module=None) -> None:
        """Remove everything plugin ``name`` registered (hooks, steps and save formats)."""
        plugin = self.pm.get_plugin(name)
        if module is not None and plugin is not module:  # not this plugin's registrations (a name clash)
            return
        if plugin is not None:
            self.pm.unregister(plugin)
        owners = [(self.steps, lambda cls: cls.plugin), (self.formats, lambda v: v[0]), (self.columns, lambda v: v[0]),
                  *((getattr(self, what), lambda r: r.plugin) for what in _RECORD_TABLES)]
        for table, owner in owners:
            for key in [k for k, v in table.items() if owner(v) == name]:
                del table[key]

    def unregister(self, name: str) -> None:
        """Remove plugin ``name`` entirely: its hooks, its steps, its save formats and its listing."""
        if name in self.info and self.info[name].error is None:
            self._drop(name)
        self.info.pop(name, None)

    # -- entry points ---------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every ``gptopt`` entry point not excluded by ``GPTOPT_LOAD_PLUGINS`` / ``GPTOPT_BLOCK_PLUGINS``."""
        only = _env_list("GPTOPT_LOAD_PLUGINS")
        blocked = _env_list("GPTOPT_BLOCK_PLUGINS") or set()
        eps = sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name)
        known = {ep.name for ep in eps}
        for var, names in (("GPTOPT_LOAD_PLUGINS", only or set()), ("GPTOPT_BLOCK_PLUGINS", blocked)):
            for unknown in sorted(names - known):
                why = ("is the core and always loads" if unknown == CORE else
                       f"is not an installed plugin (installed: {', '.join(sorted(known)) or 'none'})")
                warnings.warn(f"{var}: '{unknown}' {why}", PluginLoadWarning, stacklevel=2)
        for ep_name in known:
            if ep_name in blocked or (only is not None and ep_name not in only):
                self.pm.set_blocked(ep_name)
                self.excluded_by[ep_name] = ("GPTOPT_BLOCK_PLUGINS" if ep_name in blocked else
                                             "GPTOPT_LOAD_PLUGINS (not in the list)")
        for ep in eps:
            if self.pm.is_blocked(ep.name) or ep.name == CORE:
                continue
            if ep.name in self.info:  # the same name from a second distribution on the path: first one wins
                continue
            dist = getattr(ep, "dist", None)
            dist_name, version = (dist.name, dist.version) if dist else (None, None)
            try:
                module = ep.load()
            except (Exception, SystemExit) as exc:  # any import-time fault of a plugin is isolated
                what = "called sys.exit" if isinstance(exc, SystemExit) else type(exc).__name__
                info = PluginInfo(ep.name, dist_name, version, error=_one_line(f"{LOAD_FAILED}{what}: {exc}"),
                                  aliases=_aliases(ep.name))
                self.info[ep.name] = info
                self._complain(info, info.error)
                continue
            self.register(module, ep.name, dist_name, version)

    def listing(self) -> list[PluginInfo]:
        """What ``gptopt plugins`` lists: every plugin, each followed by an entry under every old name it had
        (:data:`RENAMED`; ``renamed_to`` set, its other fields the plugin's), until the next major version."""
        return [entry for info in self.info.values() for entry in
                [info, *(replace(info, name=old, aliases=[], renamed_to=info.name) for old in info.aliases)]]

    def step_class(self, name: str):
        if name not in self.steps:
            known = ", ".join(sorted(self.steps))
            raise GptoptError(f"unknown step '{name}'; known steps: {known} (see `gptopt steps`)")
        return self.steps[name]


def _check_unmarked(module) -> None:
    """A function named like a known hook but not marked ``@hookimpl`` would be skipped silently by pluggy."""
    specs = set(hookspecs.hook_names())
    for attr in dir(module):
        if attr in specs:
            value = getattr(module, attr, None)
            if callable(value) and not hasattr(value, "gptopt_impl"):
                raise _Rejected(f"{attr} is not marked @hookimpl (from gptopt_core import hookimpl)")


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, hookspecs.hook_names(), n=1)
    return f" (did you mean {close[0]}?)" if close else " (see docs/hooks.md for the hooks that exist)"


def _aliases(name: str) -> list:
    return sorted(old for old, now in RENAMED.items() if now == name)


def _env_list(var: str):
    """Names in a comma-separated environment variable (old names of renamed plugins as their names now, see
    :data:`RENAMED`); ``None`` when it is not set."""
    value = os.environ.get(var)
    if value is None:
        return None
    return {RENAMED.get(v.strip(), v.strip()) for v in value.split(",") if v.strip()}


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use (core built-ins + entry points)."""
    global _plugins
    if _plugins is None:
        plugins = Plugins()
        plugins.register(builtin, CORE, "gptopt", installed_version(), builtin=True)
        plugins.load_entry_points()
        _plugins = plugins
    return _plugins


for _registry, _ in _RECORD_TABLES.values():  # their tables are the plugins' registrations
    _registry.use_registry(get_plugins)
