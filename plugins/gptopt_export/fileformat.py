"""The ``gguf`` file writer (``export --format gguf``) and how ``export`` chooses among the file writers of the one
writer registry (:class:`gptopt_core.Writer` with ``kind = "file"``; a plugin can register another).

GGUF holds every model the architecture table gives a llama.cpp layout, except cpu-fast's converted layers and an
unmerged LoRA adapter: it is the file writers' fallback, what ``export --format auto`` picks when no writer of
particular facts claims the model. The GGUF work is :mod:`.gguf_writer` (gguf, numpy and torch, imported when it
writes); ``export``'s GGUF-only inputs (``--imatrix``, ``--plan``) reach it as ``options["importance"]`` /
``options["export_plan"]`` (the plan the step built once).
"""
from __future__ import annotations

from gptopt_core import PlanError
from gptopt_core.writers import Writer, plan_choice as plan_writer

GGUF = "gguf"
#: export's options only the gguf writer reads: refused with another --format instead of silently ignored
GGUF_OPTIONS = ("type", "embeddings", "ignore_sliding_window", "imatrix", "imatrix_in", "plan", "max_bpw")
#: what cannot be held in GGUF, by fact (the export step's reasons of the first contract)
REFUSED = {
    "adapter": "the model carries an unmerged LoRA adapter; give lora --merge so the adapter is folded into the "
               "weights, then export",
    "quantized:cpu-int8": "cpu-fast's int8 kernels have no GGUF form; put export before cpu-fast",
    "quantized:cpu-bf16": "cpu-fast converted the model; put export before cpu-fast",
}


class GgufWriter(Writer):
    """A GGUF file for llama.cpp: integer grids written exactly, bitsandbytes layers as q8_0 / q4_1, float layers
    in their dtype (``--type``), tokenizer and chat template with it (docs/export.md)."""

    name = GGUF
    summary = "GGUF for llama.cpp (integer grids written exactly; --type, --imatrix, --plan)"
    kind = "file"
    fallback = True
    suffixes = (".gguf",)
    atomic = True  # write_gguf publishes the file itself (a temporary name, then publish_file)

    def plan_refusal(self, facts, options):
        return next((reason for fact, reason in REFUSED.items() if fact in facts), None)

    def refusal(self, ctx, model, options):
        return self.plan_refusal(set(getattr(ctx, "facts", None) or ()), options)

    def write(self, ctx, model, path, options):
        from .gguf_writer import write_gguf, write_plan  # gguf, numpy, torch

        window, overwrite = bool(options.get("ignore_sliding_window")), bool(options.get("overwrite"))
        if options.get("export_plan") is not None:  # the export step's plan, built once (plan.ExportPlan)
            return write_plan(options["export_plan"], model, ctx.tokenizer, path, name=ctx.model_spec,
                              importance=options.get("importance"), ignore_window=window, overwrite=overwrite)
        return write_gguf(model, ctx.tokenizer, path, options.get("type", "auto"), options.get("embeddings"),
                          name=ctx.model_spec, plugins=ctx.plugins, importance=options.get("importance"),
                          plan=options.get("plan") if isinstance(options.get("plan"), dict) else None,
                          ignore_window=window, overwrite=overwrite)


def planned_format(step, facts) -> str:
    """Before the model loads: the file writer ``export --format`` names or (``auto``) picks for these facts, its
    ``--to`` suffix and, for another writer than gguf, no GGUF-only option given; returns the writer's name."""
    options = step.params_dict()
    writer = plan_writer(step.plugins, options, set(facts), kind="file")
    if writer.suffixes and not step.params.to.endswith(tuple(writer.suffixes)):
        raise PlanError(f"export --format {writer.name}: give a file name ending in {' or '.join(writer.suffixes)}")
    if writer.name != GGUF:
        fields = type(step.params).model_fields
        given = [f"--{k.replace('_', '-')}" for k in GGUF_OPTIONS if options.get(k) != fields[k].default]
        if given:
            raise PlanError(f"export --format {writer.name}: {', '.join(given)} are options of --format gguf")
    return writer.name
