"""Plugin manager: entry points, block/load lists, per-plugin error isolation, step registry."""
from __future__ import annotations

import importlib.metadata
import os
import warnings
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .errors import GptoptError

GROUP = "gptopt"


class PluginLoadWarning(UserWarning):
    pass


@dataclass
class PluginInfo:
    name: str
    distribution: str | None = None
    version: str | None = None
    steps: list = field(default_factory=list)
    hooks: list = field(default_factory=list)
    error: str | None = None
    builtin: bool = False


class Plugins:
    """The loaded plugins: a pluggy manager plus what each plugin gave and what failed."""

    def __init__(self):
        self.pm = pluggy.PluginManager("gptopt")
        self.pm.add_hookspecs(hookspecs)
        self.info: dict[str, PluginInfo] = {}
        self.steps: dict[str, type] = {}

    @property
    def hook(self):
        return self.pm.hook

    def register(self, module, name: str, distribution=None, version=None, builtin=False) -> None:
        self.pm.register(module, name=name)
        self.info[name] = PluginInfo(name, distribution, version, builtin=builtin)

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.info.pop(name, None)
        self.collect_steps()

    def load_entry_points(self) -> None:
        strict = os.environ.get("GPTOPT_STRICT_PLUGINS") == "1"
        only = _env_list("GPTOPT_LOAD_PLUGINS")
        blocked = _env_list("GPTOPT_BLOCK_PLUGINS")
        for ep in sorted(importlib.metadata.entry_points(group=GROUP), key=lambda e: e.name):
            if ep.name in self.info or (only is not None and ep.name not in only) or ep.name in blocked:
                continue
            dist = getattr(ep, "dist", None)
            dist_name, version = (dist.name, dist.version) if dist else (None, None)
            try:
                module = ep.load()
                self.register(module, ep.name, dist_name, version)
            except Exception as exc:  # any import-time fault of a plugin is isolated
                message = f"plugin {ep.name} failed to load: {type(exc).__name__}: {exc}"
                if strict:
                    raise GptoptError(message + " (GPTOPT_STRICT_PLUGINS=1)") from None
                self.info[ep.name] = PluginInfo(ep.name, dist_name, version, error=f"{type(exc).__name__}: {exc}")
                warnings.warn(message, PluginLoadWarning, stacklevel=2)
        self.pm.check_pending()

    def collect_steps(self) -> None:
        """Ask every plugin for its steps, remembering who registered what."""
        self.steps = {}
        for info in self.info.values():
            info.steps = []
        for impl in reversed(self.pm.hook.gptopt_register_steps.get_hookimpls()):
            name = impl.plugin_name
            info = self.info.setdefault(name, PluginInfo(name))

            def register(step_cls, _plugin=name, _info=info):
                if not getattr(step_cls, "name", ""):
                    raise GptoptError(f"plugin {_plugin} registered a step without a name")
                if step_cls.name in self.steps and self.steps[step_cls.name].plugin != _plugin:
                    _info.error = (f"step '{step_cls.name}' already registered by plugin "
                                   f"{self.steps[step_cls.name].plugin}")
                    return
                step_cls.plugin = _plugin
                self.steps[step_cls.name] = step_cls
                _info.steps.append(step_cls.name)

            try:
                impl.function(register=register)
            except GptoptError:
                raise
            except Exception as exc:
                info.error = f"gptopt_register_steps raised {type(exc).__name__}: {exc}"
                warnings.warn(f"plugin {name}: {info.error}", PluginLoadWarning, stacklevel=2)
        for info in self.info.values():
            plugin = self.pm.get_plugin(info.name)
            info.hooks = sorted(h.name for h in self.pm.get_hookcallers(plugin) or []) if plugin else []

    def step_class(self, name: str):
        if name not in self.steps:
            known = ", ".join(sorted(self.steps))
            raise GptoptError(f"unknown step '{name}'; known steps: {known} (see `gptopt steps`)")
        return self.steps[name]


def _env_list(var: str):
    value = os.environ.get(var)
    if value is None:
        return None if var == "GPTOPT_LOAD_PLUGINS" else set()
    return {v.strip() for v in value.split(",") if v.strip()}


_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """The process-wide plugin set, loaded on first use (core built-ins + entry points)."""
    global _plugins
    if _plugins is None:
        from . import builtin

        plugins = Plugins()
        plugins.register(builtin, "gptopt-core", "gptopt", _version(), builtin=True)
        plugins.load_entry_points()
        plugins.collect_steps()
        _plugins = plugins
    return _plugins


def reset_plugins() -> None:
    global _plugins
    _plugins = None


def _version() -> str:
    try:
        return importlib.metadata.version("gptopt")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
