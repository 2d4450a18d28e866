"""Calling plugins' hooks: every implementation names its plugin when it raises (and says how long it took under
``GPTOPT_TRACE_PLUGINS=1``), and hooks where one plugin's failure must not stop the others isolate it."""
from __future__ import annotations

import functools
import sys
import time
import warnings

from .errors import GptoptError


class PluginLoadWarning(UserWarning):
    """A plugin was not loaded (or loaded but provides nothing); the message names it and says why."""


class PluginHookError(Exception):
    """A hook implementation raised something unexpected: a bug in the plugin named by ``plugin``."""

    def __init__(self, plugin: str, hook: str, error: BaseException):
        self.plugin, self.hook, self.error = plugin, hook, error
        detail = " ".join(str(error).split())
        super().__init__(f"plugin {plugin} failed in {hook}: {type(error).__name__}: {detail}")


def _blamed(function, plugin: str, hook: str, trace: bool):
    @functools.wraps(function)
    def call(*args, **kwargs):
        start = time.perf_counter()
        outcome = ""
        try:
            return function(*args, **kwargs)
        except GptoptError as exc:
            outcome = f" raised {type(exc).__name__}"
            if hook in _ISOLATED:
                return _ISOLATED[hook](plugin, exc)
            raise
        except Exception as exc:
            outcome = f" raised {type(exc).__name__}"
            if isinstance(exc, PluginHookError):
                raise
            if hook in _ISOLATED:
                return _ISOLATED[hook](plugin, exc)
            raise PluginHookError(plugin, hook, exc) from exc
        finally:
            if trace:
                ms = (time.perf_counter() - start) * 1000
                print(f"gptopt trace: {plugin} {hook} {ms:.2f} ms{outcome}", file=sys.stderr)

    return call


def _report_hook_failed(plugin: str, error: BaseException) -> list[str]:
    message = _one_line(f"plugin {plugin} failed in gptopt_run_finished: {type(error).__name__}: {error}")
    warnings.warn(message, PluginLoadWarning, stacklevel=2)
    return [f"> {message}"]


#: hooks where one plugin's failure must not stop the others: failure → the returned value
_ISOLATED = {"gptopt_run_finished": _report_hook_failed}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())
