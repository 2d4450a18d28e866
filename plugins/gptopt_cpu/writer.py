"""The ``cpu-fast`` writer: a model ``cpu-fast`` converted (bf16, torch dynamic int8, torchao int8), in the files
:mod:`.serialize` describes (``gptopt_cpu.json`` + weights), so ``gptopt run --model DIR`` loads it converted.
Chosen by the model's facts (``cpu-only``, ``quantized:cpu-int8``, ``quantized:cpu-bf16``); it specializes
``safetensors``, so ``save`` (``auto`` or ``--format safetensors``) writes such a model this way.
"""
from __future__ import annotations

from gptopt_core.writers import Writer


class CpuFastWriter(Writer):
    """cpu-fast's converted layers: the int8 weights exactly (no standard Hugging Face format holds them) and the
    conversion record the model source reads back."""

    name = "cpu-fast"
    summary = "a cpu-fast model: gptopt_cpu.json + int8 / bf16 weights, reloaded converted by gptopt run --model DIR"
    kind = "directory"
    facts = frozenset({"cpu-only", "quantized:cpu-int8", "quantized:cpu-bf16"})
    specializes = "safetensors"

    def plan_refusal(self, facts, options):
        if not self.claims_facts(facts):
            return "the model was not converted by cpu-fast; save --format safetensors or auto"
        return None

    def refusal(self, ctx, model, options):
        if getattr(model, "gptopt_cpu", None) is None:  # this plugin's own record of the conversion
            return ("the model was not converted by cpu-fast in this run or loaded from its files; save --format "
                    "safetensors")
        return self.plan_refusal(set(getattr(ctx, "facts", None) or ()), options)

    def write(self, ctx, model, path, options):
        from .serialize import save_converted

        save_converted(model, path)
