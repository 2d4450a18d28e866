"""The ``compressed-tensors`` save format: what it holds, what it refuses (and why), and the note on what plain
transformers reads; the writing is :mod:`.writer` (torch and compressed_tensors imported there when it writes).
"""
from __future__ import annotations

import sys

from gptopt_core.kit.activations import input_quant_of
from gptopt_core.kit.grids import grid_layers, on_grid
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.saveformats import SaveFormat
from gptopt_core.steps import find_fact

from .writer import write

CPU_HINT = "cpu-fast layers (bf16 / torch or torchao int8) are not held; save --format safetensors"
#: the facts cpu-fast gives a model it converted (its bf16 layers look like any float layer, hence the facts)
CPU_FACTS = ("cpu-only", "quantized:cpu-int8", "quantized:cpu-bf16")

BNB_HINT = ("bitsandbytes nf4/fp4/int8 layers are codebook / absmax formats compressed-tensors does not hold; "
            "quantize with --method rtn or --method gptq (integer grids) to save them here, or save --format "
            "safetensors")


def _unholdable(model, facts) -> str | None:
    """What in ``model`` (whose facts are ``facts``) compressed-tensors cannot hold, as a sentence, or ``None``."""
    if any(find_fact(f, facts) for f in CPU_FACTS):
        return CPU_HINT
    if type(model).__module__.split(".")[0] == "peft":
        return "LoRA adapters are not held; merge them first (lora --merge) or save --format safetensors"
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.split(".")[0] == "bitsandbytes" or getattr(getattr(module, "weight", None),
                                                                      "quant_state", None) is not None:
            return f"{name} is a bitsandbytes layer: {BNB_HINT}"
        if type(module).__name__ == "LinearPackedParams":
            return CPU_HINT
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "dtype") and not weight.dtype.is_floating_point:
            return f"{name} holds {weight.dtype} weights that are not an integer grid gptopt knows; {BNB_HINT}"
    return None


class CompressedTensorsFormat(SaveFormat):
    """compressed-tensors (vLLM / transformers / llm-compressor): packed integer grids, bitmask sparsity."""

    name = "compressed-tensors"
    summary = "packed int4/int8 grids with fp16 scales (pack-quantized), bitmask / 2:4 sparsity"
    kind = "directory"
    facts = frozenset({"quantized:grid"})  # what auto picks it for; a pruned float model stays safetensors

    def plan_refusal(self, facts, options):
        if any(f in facts for f in ("quantized:4bit", "quantized:8bit")):
            return BNB_HINT
        if any(find_fact(f, facts) for f in CPU_FACTS):
            return CPU_HINT
        if "adapter" in facts:
            return "LoRA adapters are not held; merge them first (lora --merge) or save --format safetensors"
        return None

    def refusal(self, ctx, model, options):
        reason = _unholdable(model, set(getattr(ctx, "facts", None) or ()))
        if reason:
            return reason
        grids = grid_layers(model)
        for name, module, grid in grids:
            if input_quant_of(module) is not None and is_conv1d(module):
                return (f"{name} is a GPT-2 Conv1D layer with int8 inputs (W8A8): compressed-tensors' int-quantized "
                        "layout holds nn.Linear layers; save --format safetensors --allow-dequantized writes it float")
            if not on_grid(module, grid):
                return (f"{name}'s weights left their {grid.describe()} grid (changed by a later step); quantize "
                        "after the steps that change weights")
        masks = (getattr(ctx, "state", None) or {}).get("masks")
        if not grids and not masks:
            return ("the model has no integer grids and no pruning masks, so there is nothing to compress; "
                    "save --format safetensors (or auto)")
        return None

    def write(self, ctx, model, path, options):
        info = write(ctx, model, path)
        parts = [f"{info['packed_layers']} packed layer(s) ({', '.join(info['schemes'])})"] if info["schemes"] else []
        if info["sparsity_format"]:
            parts.append(f"sparsity {info['sparsity_format']} ({info['sparse_layers']} bitmask layer(s))")
        if info["zeros_in_codes"]:
            parts.append(f"pruned zeros held in the codes of {info['zeros_in_codes']} packed layer(s)")
        if info.get("moe_experts"):
            how = (f"{info['moe_rounded']} rounded to nearest here, in the model too" if info.get("moe_rounded")
                   else "quantize's codes")
            parts.append(f"{info['moe_experts']} MoE experts one packed layer each ({info['moe_scheme']}, {how}), "
                         "routers float")
        ctx.log("  compressed-tensors: " + ", ".join(parts))
        for note in (experts_note(info), plain_note(info)):
            if not note:
                continue
            if getattr(ctx, "quiet", False):  # a note on what a reader gets is said even in a quiet run
                print(note.strip(), file=sys.stderr)
            else:
                ctx.log(note)


def experts_note(info: dict) -> str | None:
    """The line ``save`` says when it rounded a MoE model's float experts (:mod:`.moe`): what ran before it saw them
    float."""
    if not info.get("moe_rounded"):
        return None
    return (f"  note: quantize left {info['moe_rounded']} of the {info['moe_experts']} MoE experts float; save rounded each to "
            f"{info['moe_scheme']} (round-to-nearest, in the model too): steps before this save measured float "
            "experts, steps after it measure what the file holds")


def plain_note(info: dict) -> str | None:
    """The one line ``save`` says about plain ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` for what
    :func:`.writer.write` wrote (``info``): what it cannot read and what can, or that it reads it de-quantized."""
    import compressed_tensors

    version = f"compressed-tensors {compressed_tensors.__version__}"
    if info.get("plain_unread"):
        return (f"  note: plain transformers from_pretrained ({version}) cannot read "
                + "; ".join(info["plain_unread"]) + ": `gptopt run --model DIR` (gptopt_ctensors.load_model) reads "
                "it exactly" + ("; save --format safetensors writes a dense copy it reads, and quantize --method "
                                "rtn|gptq after prune a smaller one (zeros inside the codes)"
                                if any("sparsity" in u for u in info["plain_unread"]) else ""))
    if info.get("plain_dequantize"):
        held = ("the per-expert layers of a mixture of experts (it fuses them only de-quantized, in float16)"
                if info.get("moe_experts") else "GPT-2 Conv1D grids" if info.get("conv1d")
                else "asymmetric packed zero points")
        return (f"  note: plain transformers from_pretrained ({version}) reads it de-quantized to float "
                f"(quantization_config.dequantize: true; it cannot hold {held} compressed); `gptopt run --model DIR` "
                "reloads it compressed")
    return None

