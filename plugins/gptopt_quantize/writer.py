"""The ``bitsandbytes`` writer: a model quantized to bitsandbytes int8 / nf4 / fp4, saved so plain
``AutoModelForCausalLM.from_pretrained(dir)`` loads it back quantized (a ``BitsAndBytesConfig`` in config.json).
Chosen by the model's facts (``quantized:4bit``, ``quantized:8bit``); it specializes ``safetensors``, so ``save``
(``auto`` or ``--format safetensors``) writes such a model this way. The work is :mod:`.saving` (bitsandbytes and
torch, imported when it writes).
"""
from __future__ import annotations

from gptopt_core.writers import Writer

ADAPTER_HINT = ("an unmerged LoRA adapter is written by --format safetensors (the base here, the adapter in "
                "adapter/); or merge it first (lora --merge)")


class BitsAndBytesWriter(Writer):
    """bitsandbytes int8 / nf4 / fp4 layers: ``save_pretrained`` with the ``BitsAndBytesConfig`` that describes
    them (layers it cannot describe stand in de-quantized: :func:`.saving.plain_stand_ins`)."""

    name = "bitsandbytes"
    summary = "bitsandbytes int8 / nf4 / fp4 (save_pretrained + BitsAndBytesConfig; plain from_pretrained reloads it)"
    kind = "directory"
    facts = frozenset({"quantized:4bit", "quantized:8bit"})
    specializes = "safetensors"

    def plan_refusal(self, facts, options):
        if not self.claims_facts(facts):
            return ("the model has no bitsandbytes layers (quantize --method bnb makes them); save --format "
                    "safetensors or auto")
        if "adapter" in facts:
            return ADAPTER_HINT
        return None

    def refusal(self, ctx, model, options):
        return self.plan_refusal(set(getattr(ctx, "facts", None) or ()), options)

    def write(self, ctx, model, path, options):
        from .saving import save_quantized  # bitsandbytes and torch: imported when such a model is saved

        save_quantized(model, path)
