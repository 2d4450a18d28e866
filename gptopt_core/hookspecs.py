"""The gptopt plugin contract.

Every hook a plugin may implement is declared here; the docstrings are the plugin-author reference
(``docs/hooks.md`` quotes them, nothing is written twice). Implement a hook with ``@gptopt_core.hookimpl``
and register the module through an entry point in the ``gptopt`` group. Hooks are always called with
keyword arguments and only ever gain arguments, so an implementation may accept any subset of them.
"""
import pluggy

hookspec = pluggy.HookspecMarker("gptopt")
hookimpl = pluggy.HookimplMarker("gptopt")


@hookspec
def gptopt_register_steps(register):
    """Register the steps this plugin provides.

    :param register: callable taking a :class:`gptopt_core.Step` subclass. The core remembers which plugin
        registered which step; a step name registered twice is reported as an error of the second plugin.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gptopt_resolve_model(spec, options):
    """Turn a model spec (``--model``) into a loaded model and tokenizer.

    firstresult: the first implementation that returns something other than ``None`` wins, so return
    ``None`` for specs you do not handle. Plugins run before the core's built-in sources (local directory,
    ``.gguf`` file, ``smollm2-135m``, ``tiny-random-*``, hub id).

    :param spec: the string the user gave, e.g. ``"smollm2-135m"`` or ``"./out/model"``.
    :param options: dict with ``device`` (str), ``allow_pickle`` (bool), ``trust_remote_code`` (bool).
    :returns: a :class:`gptopt_core.models.LoadedModel` or ``None``.
    :raises gptopt_core.SourceError: the spec is yours but cannot be loaded (one clear sentence).

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_step_started(ctx, step):
    """Observe a step about to run.

    :param ctx: the :class:`gptopt_core.RunContext`.
    :param step: the :class:`gptopt_core.Step` instance.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_step_finished(ctx, step, record):
    """Observe a step that has run.

    :param record: the step's record dict (``name``, ``plugin``, ``params``, ``seconds``, ``metrics``,
        ``status``); implementations may add keys to ``record["metrics"]``.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_collect_metrics(ctx):
    """Contribute metrics measured after every step.

    :returns: a dict of metric name to JSON-serialisable value, or ``None``. All results are merged into the
        step record's ``metrics``; the core contributes ``model_bytes``, ``num_params`` and ``sparsity``.

    .. versionadded:: 0.1
    """


@hookspec(firstresult=True)
def gptopt_save_model(ctx, model, path):
    """Write the model to ``path`` (a fresh temporary directory the ``save`` step later renames).

    firstresult: return ``True`` when you wrote the model (e.g. a PEFT adapter, a format without a standard
    Hugging Face representation); return ``None`` to let the next implementation, finally the core's
    ``save_pretrained`` with safetensors, do it. The tokenizer, recipe and run.json are written by the core.

    :param path: a :class:`pathlib.Path` to an empty directory.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_register_save_formats(register):
    """Register the formats ``save --format NAME`` can write.

    :param register: callable taking a :class:`gptopt_core.saveformats.SaveFormat` subclass (its ``name`` is the
        ``--format`` value). A name registered twice is reported as an error of the second plugin. ``--format
        auto`` tries plugins' formats before the core's ``safetensors``, taking the first whose ``claims(ctx,
        model)`` is true and whose ``refusal(ctx, model, options)`` is ``None``; a format that cannot hold a model
        refuses it with one sentence naming a format or option that can, and nothing is written.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_training_loss(ctx, model, batch, outputs):
    """Add extra loss terms to every training batch (L1 penalties, distillation, ...).

    :param model: the model being trained (possibly wrapped by PEFT / Accelerate).
    :param batch: dict with ``input_ids`` and ``labels`` tensors.
    :param outputs: the model's forward outputs for ``batch`` (``outputs.loss``, ``outputs.logits``).
    :returns: a scalar tensor to add to the loss, or ``None``.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_after_optimizer_step(ctx, model, step):
    """Called after every optimizer step of a training step (e.g. to keep pruned weights at zero).

    :param model: the model being trained.
    :param step: the 1-based optimizer step number.

    .. versionadded:: 0.1
    """


@hookspec
def gptopt_run_finished(ctx, records, out_dir):
    """Called once after the last step (also after a failed run), before run.json and report.md are written.

    :param records: the list of step records.
    :param out_dir: the run's ``--out`` directory (:class:`pathlib.Path`) or ``None``; write extra artifacts
        (plots, tables) there.
    :returns: ``None``, or a list of markdown sections (strings) to append to ``report.md``.

    .. versionadded:: 0.1
    """
