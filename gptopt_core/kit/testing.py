"""Helpers for testing gptopt plugins (also used by gptopt's own tests).

``register_plugin`` registers a module or object with hook implementations for the duration of a ``with``
block (or a pytest fixture body) and unregisters it in ``finally``::

    from gptopt_core.kit.testing import register_plugin

    def test_my_step(tmp_path):
        with register_plugin(my_plugin_module, "my-plugin"):
            Pipeline(model="tiny-random-gpt2", quiet=True).add("my-step").run()
"""
from __future__ import annotations

import contextlib
import warnings

from ..errors import GptoptError
from ..pipeline import Pipeline
from ..plugins import get_plugins


@contextlib.contextmanager
def register_plugin(module, name: str):
    """Register ``module`` as plugin ``name`` in the process-wide plugin set; unregister afterwards.

    Registration is checked as for an installed plugin (hooks against the hookspecs, step names unique); a plugin
    the core would reject raises :class:`gptopt_core.GptoptError` with the reason here, so a test sees it at once.
    """
    plugins = get_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = plugins.register(module, name)
    if info.error:
        if plugins.info.get(name) is info:
            plugins.info.pop(name)
        raise GptoptError(f"plugin {name}: {info.error}")
    try:
        yield plugins
    finally:
        plugins.unregister(name)


def make_context(model: str = "tiny-random-llama", data: str = "builtin:pydoc", seed: int = 0,
                 device: str = "cpu", **kwargs):
    """A ready :class:`gptopt_core.RunContext` on a loaded model, as a step sees it (no steps run).

    Build a step as the CLI would (its params validated) and call it directly::

        ctx = make_context("tiny-random-gpt2")
        step = MyStep(sparsity=0.5)          # or get_plugins().step_class("prune")(sparsity=0.5)
        metrics = step.apply(ctx)            # ctx.model, ctx.state, ctx.facts as the pipeline leaves them

    ``kwargs`` go to :class:`gptopt_core.Pipeline` (e.g. ``out=``); the context is the one
    :meth:`gptopt_core.Pipeline.run` builds before its first step (:meth:`~gptopt_core.Pipeline.prepare`). Facts a
    step adds are not applied by ``apply``; use ``ctx.facts = step.next_facts(ctx.facts)`` to follow it with another
    step.
    """
    return Pipeline(model=model, data=data, seed=seed, device=device, quiet=True, **kwargs).prepare()
