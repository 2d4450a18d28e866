"""gptopt-ctensors: the ``compressed-tensors`` save format (``save --format compressed-tensors``) and its loader.

Integer weight grids (:mod:`gptopt_core.grids`, e.g. from ``quantize --method rtn|gptq``) are written packed with
their fp16 scales (``pack-quantized``, one config group per scheme and layer kind, full-precision layers in
``ignore``), as llm-compressor writes W4A16 / W8A16 checkpoints; embeddings / heads as ``naive-quantized`` int8,
GPT-2 Conv1D layers in column blocks (:mod:`.layout`). Plain ``AutoModelForCausalLM.from_pretrained(dir)`` reads
them back through transformers' compressed-tensors quantizer (where it cannot, ``save`` says so in one line:
:func:`plain_note`). A pruned model without grids is written sparse (``sparse-24-bitmask`` where every mask is
2:4, else ``sparse-bitmask``), which ``gptopt run --model DIR`` reads and plain transformers does not (upstream
dropped these layouts); pruned layers on grids keep their zeros inside the packed codes, which every reader reads.
bitsandbytes nf4/fp4/int8 and cpu-fast layers are refused with a line naming what can hold them.

Heavy imports (torch, compressed_tensors, transformers) happen inside the hooks only. See docs/save-formats.md.
"""
from __future__ import annotations

from gptopt_core import SaveFormat, hookimpl

BNB_HINT = ("bitsandbytes nf4/fp4/int8 layers are codebook / absmax formats compressed-tensors does not hold; "
            "quantize with --method rtn or --method gptq (integer grids) to save them here, or save --format "
            "safetensors")


def _unholdable(model) -> str | None:
    """What in ``model`` compressed-tensors cannot hold, as a sentence, or ``None``."""
    if type(model).__module__.split(".")[0] == "peft":
        return "LoRA adapters are not held; merge them first (lora --merge) or save --format safetensors"
    for name, module in model.named_modules():
        cls = type(module)
        if cls.__module__.split(".")[0] == "bitsandbytes" or getattr(getattr(module, "weight", None),
                                                                      "quant_state", None) is not None:
            return f"{name} is a bitsandbytes layer: {BNB_HINT}"
        if type(module).__name__ == "LinearPackedParams" or getattr(model, "gptopt_cpu", None) is not None:
            return "cpu-fast layers (bf16 / torch or torchao int8) are not held; save --format safetensors"
        weight = getattr(module, "weight", None)
        if weight is not None and hasattr(weight, "dtype") and not weight.dtype.is_floating_point:
            return f"{name} holds {weight.dtype} weights that are not an integer grid gptopt knows; {BNB_HINT}"
    return None


class CompressedTensorsFormat(SaveFormat):
    """compressed-tensors (vLLM / transformers / llm-compressor): packed integer grids, bitmask sparsity."""

    name = "compressed-tensors"
    summary = "packed int4/int8 grids with fp16 scales (pack-quantized), bitmask / 2:4 sparsity"

    def plan_refusal(self, facts, options):
        if any(f in facts for f in ("quantized:4bit", "quantized:8bit")):
            return BNB_HINT
        if any(f.startswith("quantized:cpu") for f in facts):
            return "cpu-fast layers (bf16 / torch or torchao int8) are not held; save --format safetensors"
        if "adapter" in facts:
            return "LoRA adapters are not held; merge them first (lora --merge) or save --format safetensors"
        return None

    def claims(self, ctx, model):
        from gptopt_core import grid_layers

        return bool(grid_layers(model))

    def refusal(self, ctx, model, options):
        from gptopt_core import grid_layers, on_grid

        reason = _unholdable(model)
        if reason:
            return reason
        grids = grid_layers(model)
        for name, module, grid in grids:
            if not on_grid(module, grid):
                return (f"{name}'s weights left their {grid.describe()} grid (changed by a later step); quantize "
                        "after the steps that change weights")
        masks = (getattr(ctx, "state", None) or {}).get("masks")
        if not grids and not masks:
            return ("the model has no integer grids and no pruning masks, so there is nothing to compress; "
                    "save --format safetensors (or auto)")
        return None

    def write(self, ctx, model, path, options):
        from .writer import write

        info = write(ctx, model, path)
        parts = [f"{info['packed_layers']} packed layer(s) ({', '.join(info['schemes'])})"] if info["schemes"] else []
        if info["sparsity_format"]:
            parts.append(f"sparsity {info['sparsity_format']} ({info['sparse_layers']} bitmask layer(s))")
        if info["zeros_in_codes"]:
            parts.append(f"pruned zeros held in the codes of {info['zeros_in_codes']} packed layer(s)")
        ctx.log("  compressed-tensors: " + ", ".join(parts))
        note = plain_note(info)
        if note:
            if getattr(ctx, "quiet", False):  # a note on what a reader gets is said even in a quiet run
                import sys

                print(note.strip(), file=sys.stderr)
            else:
                ctx.log(note)


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
        return (f"  note: plain transformers from_pretrained ({version}) reads it de-quantized to float "
                "(quantization_config.dequantize: true; it cannot hold "
                + ("GPT-2 Conv1D grids" if info.get("conv1d") else "asymmetric packed zero points")
                + " compressed); `gptopt run --model DIR` reloads it compressed")
    return None


def load_model(path, trust_remote_code: bool = False):
    """``(model, tokenizer, info)`` from a compressed-tensors directory (grids re-attached); see :mod:`.reader`."""
    from .reader import load

    return load(path, trust_remote_code=trust_remote_code)


@hookimpl
def gptopt_register_save_formats(register):
    register(CompressedTensorsFormat)


@hookimpl
def gptopt_resolve_model(spec, options):
    """A directory whose config.json says ``quant_method: compressed-tensors``: read it with :mod:`.reader`."""
    from pathlib import Path

    path = Path(spec).expanduser()
    if not path.is_dir():
        return None
    from .reader import is_compressed_dir

    if not is_compressed_dir(path):
        return None
    from gptopt_core import GptoptError, LoadedModel, SourceError, check_local_dir

    check_local_dir(path, allow_pickle=bool(options.get("allow_pickle")))
    if not any(path.glob("*.safetensors")):
        raise SourceError(f"{spec}: a compressed-tensors model is read from *.safetensors files only; pickle "
                          "weights are not read (with or without --allow-pickle)")
    try:
        model, tokenizer, info = load_model(path, trust_remote_code=bool(options.get("trust_remote_code")))
    except GptoptError:
        raise
    except Exception as exc:  # safetensors / compressed_tensors / transformers raise many types for bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load the compressed-tensors model in {spec}: {first}") from None
    return LoadedModel(model, tokenizer, "compressed-tensors", {"quantized:grid"} if info["grids"] else set())
