"""The gptopt plugin contract.

Every hook a plugin may implement is declared here; the docstrings are the plugin-author reference
(``docs/hooks.md`` is generated from them, nothing is written twice). Implement a hook with
``@gptopt_core.hookimpl`` and register the module through an entry point in the ``gptopt`` group. Hooks are
always called with keyword arguments and only ever gain arguments, so an implementation may accept any subset of
them. The annotations are documentation (nothing imports torch here): ``RunContext`` is
:class:`gptopt_core.RunContext`, ``Step`` :class:`gptopt_core.Step`, ``LoadedModel``
:class:`gptopt_core.LoadedModel`, ``Model`` a ``torch.nn.Module`` (usually a transformers ``PreTrainedModel``),
``Tensor`` a ``torch.Tensor``.

Every ``ctx`` argument is the run's :class:`gptopt_core.RunContext`: the current model (``ctx.model``), tokenizer,
device, data, seed, the model's facts (``ctx.facts``), data shared between plugins by documented key
(``ctx.state``, see :data:`gptopt_core.STATE_KEYS`), the records so far and the output directory.

An exception a hook raises is reported with the plugin's name and the hook's (``plugin X failed in HOOK: ...``);
raise :class:`gptopt_core.GptoptError` for something the user can fix (one line, exit code 2).

The hooks come in four kinds; one example of each (all from one plugin module, ``gptopt_depth/__init__.py``,
registered by an entry point ``gptopt-depth = "gptopt_depth"`` in the ``gptopt`` group):

```python
from gptopt_core import LoadedModel, hookimpl, tiny_model

from .step import DropBlocksStep   # Params + Step (docs/plugin-guide.md)


# 1. registry: called once as the plugin loads, with a register callback (gptopt_register_steps,
#    gptopt_register_writers, gptopt_register_save_formats, gptopt_register_columns, gptopt_register_architectures,
#    gptopt_register_observers, gptopt_register_vocabulary); a bad registration rejects the plugin then
@hookimpl
def gptopt_register_steps(register):
    register(DropBlocksStep)


@hookimpl
def gptopt_register_columns(register):
    register("depth", "blocks")          # metric "depth" shown as column "blocks" (numbers and text)


# 2. firstresult: the first implementation that returns something other than None answers
#    (gptopt_resolve_model, gptopt_save_model); return None for what is not yours
@hookimpl
def gptopt_resolve_model(spec, options):
    if not spec.startswith("depth-zoo:"):
        return None
    model, tokenizer = tiny_model("tiny-random-llama")
    return LoadedModel(model, tokenizer, source="depth-zoo")


# 3. observers: every implementation is called, the return value is ignored (gptopt_step_started,
#    gptopt_step_finished, gptopt_after_optimizer_step)
@hookimpl
def gptopt_step_finished(ctx, step, record):
    ctx.log(f"  {step.name}: {len(record['metrics'])} metrics")


# 4. collected: every implementation is called and the core merges what they return (a dict of metrics,
#    loss terms to add, report sections: gptopt_collect_metrics, gptopt_training_loss, gptopt_run_finished)
@hookimpl
def gptopt_collect_metrics(ctx):
    layers = getattr(ctx.model.config, "num_hidden_layers", None)
    return {"depth": layers} if layers is not None else None
```
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import pluggy

if TYPE_CHECKING:  # names for the annotations only
    from .architectures import Architecture
    from .context import RunContext
    from .kit.models import LoadedModel
    from .kit.observers import Observer
    from .kit.pretokenizers import PreTokenizer
    from .steps import Step
    from .vocabulary import Fact, MatrixCell, StateKey

    Model = Any
    Tensor = Any

hookspec = pluggy.HookspecMarker("gptopt")
hookimpl = pluggy.HookimplMarker("gptopt")


@hookspec
def gptopt_register_steps(register: Callable[[type[Step]], None]) -> None:
    """Register the steps this plugin provides.

    :param register: callable taking a :class:`gptopt_core.Step` subclass with a ``name``. The core remembers which
        plugin registered which step. A name the core or an earlier plugin already has (e.g. ``eval``), a class
        without a name or not a ``Step`` rejects the whole plugin (it is listed by ``gptopt plugins`` with the
        reason, and none of its hooks or steps load).

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gptopt_resolve_model(spec: str, options: dict) -> Optional[LoadedModel]:
    """Turn a model spec (``--model``) into a loaded model and tokenizer.

    firstresult: the first implementation that returns something other than ``None`` wins, so return
    ``None`` for specs you do not handle. Plugins run before the core's built-in sources (local directory,
    ``.gguf`` file, ``smollm2-135m``, ``tiny-random-*``, hub id).

    :param spec: the string the user gave, e.g. ``"smollm2-135m"`` or ``"./out/model"``.
    :param options: dict with ``device`` (str), ``allow_pickle`` (bool), ``trust_remote_code`` (bool).
    :returns: a :class:`gptopt_core.LoadedModel` (``model``, ``tokenizer``, ``source``: a short name for the
        manifest, ``facts``: what the model already is, e.g. ``{"quantized:4bit"}``, so the plan is checked against
        it; a model with no facts is moved to the run's device by the core) or ``None``.
    :raises gptopt_core.SourceError: the spec is yours but cannot be loaded (one clear sentence).

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_step_started(ctx: RunContext, step: Step) -> None:
    """Observe a step about to run.

    :param ctx: the run's :class:`gptopt_core.RunContext` (``ctx.model`` is the model the step will get).
    :param step: the :class:`gptopt_core.Step` instance (``step.name``, ``step.params``, ``step.plugin``).

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_step_finished(ctx: RunContext, step: Step, record: dict) -> None:
    """Observe a step that has run.

    :param ctx: the run's :class:`gptopt_core.RunContext` (``ctx.model`` is the step's result, ``ctx.facts`` its
        facts after the step).
    :param step: the :class:`gptopt_core.Step` instance.
    :param record: the step's record dict (``name``, ``plugin``, ``params``, ``seconds``, ``metrics``,
        ``facts``, ``status``); implementations may add keys to ``record["metrics"]``.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_collect_metrics(ctx: RunContext) -> Optional[dict]:
    """Contribute metrics measured after every step (and once on the model as loaded).

    :param ctx: the run's :class:`gptopt_core.RunContext`; measure ``ctx.model``.
    :returns: a dict of metric name to JSON-serialisable value, or ``None``. All results are merged into the
        step record's ``metrics``; the core contributes ``model_bytes``, ``num_params`` and ``sparsity``. A metric
        is shown in the summary table and report.md only where a column is registered for its name
        (:func:`gptopt_register_columns`, or a step's ``columns``); every metric is kept in run.json.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_register_columns(register: Callable[..., None]) -> None:
    """Show metrics as columns of the end-of-run summary table and report.md (and the one-line step log).

    :param register: callable ``register(key, title, spec="")``: the metric named ``key`` (from any step's metrics
        or from :func:`gptopt_collect_metrics`) gets the column ``title``. An ``int`` / ``float`` value is written
        with the format spec ``spec`` (``".1%"``, ``".3f"``, ``""``: as ``str()``), a ``str`` value as it is
        (shortened to 40 characters); other values (``None``, ``bool``, lists, dicts) leave the cell empty. A key the
        core shows (``perplexity``, ``model_bytes``, ``sparsity``, ...) or another plugin registered rejects the
        plugin as it loads. A step may instead declare columns for its own metrics with ``Step.columns``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gptopt_save_model(ctx: RunContext, model: Model, path: Path) -> Optional[bool]:
    """Write the model to ``path`` (a fresh temporary directory the ``save`` step later renames): the chain the
    core's ``safetensors`` writer runs.

    firstresult: return ``True`` when you wrote the model (e.g. a PEFT adapter, a format without a standard
    Hugging Face representation); return ``None`` to let the next implementation do it. The last one is the
    core's: the writer that specializes ``safetensors`` for the model's facts (``bitsandbytes``, ``cpu-fast``),
    else ``save_pretrained`` with safetensors. The tokenizer, recipe and run.json are written by the core.

    :param ctx: the run's :class:`gptopt_core.RunContext` (``ctx.facts`` / ``ctx.state`` say e.g. which layers
        are quantized).
    :param model: the model to write (``ctx.model``, or a part of it when a plugin delegates, e.g. a PEFT base).
    :param path: a :class:`pathlib.Path` to an empty directory.
    :returns: ``True`` when written, else ``None``.

    .. versionadded:: 0.1
    .. deprecated:: 0.2
        Register a :class:`gptopt_core.Writer` instead (``gptopt_register_writers``), chosen by ``--format`` or by
        the model's facts. Implementations keep being called (only under ``--format safetensors``, and ``auto``
        where it picks safetensors) until 1.0.
    """


@hookspec
def gptopt_register_writers(register: Callable[[type], None]) -> None:
    """Register ways to write a model out: directories (``save --format NAME``) and files (``export --format
    NAME``), one registry.

    :param register: callable taking a :class:`gptopt_core.Writer` subclass: its ``name`` is the ``--format``
        value, its ``kind`` (``"directory"`` or ``"file"``) says which step offers it, its ``facts`` (fact
        patterns such as ``quantized:cpu-int8``) which models ``--format auto`` picks it for (``fallback = True``:
        any model no other writer claims). A name registered twice (either kind) is reported as an error of the
        second plugin. ``auto`` tries plugins' writers before the core's, writers of particular facts before
        fallbacks, and takes the first whose ``claims(ctx, model)`` is true and whose ``refusal(ctx, model,
        options)`` is ``None``; a writer that cannot hold a model refuses it with one sentence naming a format or
        option that can, and nothing is written.

    .. versionadded:: 0.2
    """


@hookspec
def gptopt_register_save_formats(register: Callable[[type], None]) -> None:
    """The first contract's name of :func:`gptopt_register_writers`: the same ``register`` into the same registry
    (a :class:`gptopt_core.SaveFormat` is a :class:`gptopt_core.Writer`, a directory writer unless its ``kind``
    says ``"file"``).

    :param register: callable taking a :class:`gptopt_core.SaveFormat` subclass (its ``name`` is the ``--format``
        value); see :func:`gptopt_register_writers`.

    .. versionadded:: 0.1
    .. deprecated:: 0.2
        Implement ``gptopt_register_writers`` (same argument); this name keeps working until 1.0.
    """


@hookspec
def gptopt_register_architectures(register: Callable[[Architecture], None]) -> None:
    """Add model families to the architecture table (:class:`gptopt_core.Architecture`).

    :param register: callable taking an :class:`gptopt_core.Architecture`: the family's ``config.model_type``, where
        its blocks are, its linear layers in compute order (the calibration engine's groups, LoRA's ``auto``
        targets), norms, rotary layout, a tiny config for tests (``tiny-random-<name>``) and, in ``gguf``, how
        llama.cpp's converter writes it. The core registers its families first; a ``model_type`` registered twice is
        an error of the second plugin. ``docs/architectures.md`` lists the table and which step runs on which family.

    .. versionadded:: 0.2
    """


@hookspec
def gptopt_register_observers(register: Callable[[Observer], None]) -> None:
    """Add observers: ways to choose an integer grid's range per group, for ``quantize --method rtn|gptq
    --observer NAME`` (and every caller of :func:`gptopt_core.fit_grid`).

    :param register: callable taking an :class:`gptopt_core.Observer`: its ``name``, its ``fit(groups, bits,
        symmetric, importance) -> (lo, hi)`` and whether it needs the per-column ``importance`` only ``--method
        gptq`` collects. The core registers ``minmax``, ``mse`` and ``hmse`` first, through this hook; a name
        registered twice is an error of the second plugin.

    .. versionadded:: 0.3
    """


@hookspec
def gptopt_register_pre_tokenizers(register: Callable[[PreTokenizer], None]) -> None:
    """Add names to the table of llama.cpp's byte-level BPE pre-tokenizers (:class:`gptopt_core.PreTokenizer`):
    ``export --format gguf`` writes a ``gpt2`` vocabulary's ``tokenizer.ggml.pre`` from it.

    :param register: callable taking a :class:`gptopt_core.PreTokenizer`: the name llama.cpp reads, the hashes
        llama.cpp's converter computes for tokenizers that use it (``gptopt_core.pre_tokenizer_hash``) and/or
        the ``tokenizer.json`` signatures (``gptopt_core.pre_tokenizer_signature``) of vocabularies with the same
        rules. The export plugin registers llama.cpp's whole table; a name, hash or signature registered twice is an
        error of the second plugin. A tokenizer matching no row is refused in one line naming what it is.

    .. versionadded:: 0.2
    """


@hookspec
def gptopt_register_vocabulary(register: Callable[[StateKey | Fact | MatrixCell], None]) -> None:
    """Declare the words a plugin shares: its ``ctx.state`` keys, fact families and family-matrix cells.

    :param register: callable taking a :class:`gptopt_core.StateKey` (a ``ctx.state`` key and what its value is),
        a :class:`gptopt_core.Fact` (a fact family its steps provide, require or forbid; ``lossy=True`` when a step
        providing it changes the model's outputs on purpose) or a :class:`gptopt_core.MatrixCell` (a family-matrix
        cell its tests run on every family, with the :class:`gptopt_core.Architecture` field it ``needs``). The
        registering plugin owns the word; a word the core or another plugin declared is an error of the second
        plugin. ``gptopt_core.STATE_KEYS`` / ``FACTS`` list what the loaded plugins declared, and ``ctx.state``
        refuses to store a key nobody declared. The core declares its own words (``trainer``, ``original_model``,
        ``kl_base``, ``kl_base_hash``, the shared ``quantized`` key and fact) first, through this hook.

    .. versionadded:: 0.3
    """


@hookspec
def gptopt_training_loss(ctx: RunContext, model: Model, batch: dict, outputs: Any) -> Optional[Tensor]:
    """Add extra loss terms to every training batch (L1 penalties, distillation, ...).

    :param ctx: the run's :class:`gptopt_core.RunContext`; ``ctx.state["trainer"]`` is the running
        :class:`gptopt_core.Trainer` (``.step``, ``.total_steps``, ``.params``).
    :param model: the model being trained (possibly wrapped by PEFT / Accelerate).
    :param batch: dict with ``input_ids`` and ``labels`` tensors.
    :param outputs: the model's forward outputs for ``batch`` (``outputs.loss``, ``outputs.logits``).
        ``outputs.loss`` still carries its autograd graph: a term may be built from it (e.g. the robust step's
        ``torch.autograd.grad(outputs.loss, weights, create_graph=True)``, keeping the graph for the loop's
        backward), since the loop backpropagates the loss plus all returned terms once, after every hook ran.
    :returns: a scalar tensor to add to the loss, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_after_optimizer_step(ctx: RunContext, model: Model, step: int) -> None:
    """Called after every optimizer step of a training step. The prune plugin's implementation keeps pruned
    weights at zero (it runs first, ``tryfirst``); l1's applies its proximal update.

    :param ctx: the run's :class:`gptopt_core.RunContext`; ``ctx.state["trainer"]`` is the running
        :class:`gptopt_core.Trainer`.
    :param model: the model being trained (unwrapped from Accelerate; may be a PEFT model).
    :param step: the 1-based optimizer step number.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_run_finished(ctx: RunContext, records: list, out_dir: Optional[Path]) -> Optional[list]:
    """Called once after the last step (also after a failed run), before run.json and report.md are written.

    One implementation failing does not stop the others: its failure becomes a warning and a line in report.md,
    and the other plugins' sections are kept.

    :param ctx: the run's :class:`gptopt_core.RunContext`.
    :param records: the list of step records.
    :param out_dir: the run's ``--out`` directory (:class:`pathlib.Path`) or ``None``; write extra artifacts
        (plots, tables) there.
    :returns: ``None``, or a list of markdown sections (strings) to append to ``report.md``.

    .. versionadded:: 0.1
    """


def hook_names() -> list[str]:
    """Every hook of the contract, in the order declared here (what docs/hooks.md lists)."""
    return [name for name, fn in globals().items() if name.startswith("gptopt_") and hasattr(fn, "gptopt_spec")]
