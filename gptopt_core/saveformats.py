"""Save formats: what ``save --format`` can write.

A format is a :class:`SaveFormat` subclass that a plugin registers through the
``gptopt_register_save_formats(register)`` hook; the core registers ``safetensors`` (transformers'
``save_pretrained``, through the ``gptopt_save_model`` hook chain, so bitsandbytes, cpu-fast and PEFT models keep
saving as they did). ``save --format auto`` (the default) takes the first format, plugins' before the core's,
that *claims* the model (it is what the format is for, e.g. integer grids for compressed-tensors) and does not
*refuse* it. A format refuses what it cannot hold with one sentence that names a format or option that can; the
``save`` step turns that into a one-line error (exit 2) before anything is written.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import GptoptError, PlanError
from .grids import grid_layers
from .metrics import model_bytes

AUTO = "auto"


class SaveFormat:
    """One way of writing a model directory. Subclass it, set :attr:`name` and :attr:`summary`, implement
    :meth:`write`, and override the checks where the format cannot hold every model.

    ``options`` is the ``save`` step's parameters as a dict (``to``, ``format``, ``allow_dequantized``, ...).
    """

    #: the ``--format`` value, e.g. ``"compressed-tensors"``
    name: str = ""
    #: one line for ``gptopt steps save`` and docs: what the format holds
    summary: str = ""

    def plan_refusal(self, facts: set, options: dict) -> str | None:
        """Before any model loads: a sentence saying why a model with these facts cannot be held, or ``None``."""
        return None

    def claims(self, ctx, model) -> bool:
        """Whether ``--format auto`` should pick this format for ``model`` (the core's safetensors claims all)."""
        return False

    def refusal(self, ctx, model, options: dict) -> str | None:
        """On the model, before writing: a sentence saying what this format cannot hold and which format or
        option can, or ``None``."""
        return None

    def write(self, ctx, model, path, options: dict) -> None:
        """Write ``model`` into ``path`` (an empty temporary directory the ``save`` step renames afterwards).
        The tokenizer, recipe.yaml and run.json are written by the core. Raise :class:`gptopt_core.GptoptError`
        for a model this format cannot hold after all; the temporary directory is removed."""
        raise NotImplementedError


def save_formats(plugins) -> dict:
    """``{name: SaveFormat instance}`` of the formats ``plugins`` (a :class:`gptopt_core.plugins.Plugins`) registered
    through ``gptopt_register_save_formats`` when each plugin loaded, plugins' formats first and the core's last
    (the order ``auto`` tries them in)."""
    def core(owner):
        info = plugins.info.get(owner)
        return bool(info and info.builtin)

    ordered = sorted(plugins.formats.items(), key=lambda item: core(item[1][0]))  # stable: registration order
    return {name: fmt_cls() for name, (_, fmt_cls) in ordered}


def format_names(plugins) -> list[str]:
    return [AUTO] + sorted(save_formats(plugins))


def check_plan(plugins, options: dict, facts: set) -> None:
    """Plan-time checks of ``save --format``: a known name, and facts the chosen format can hold."""
    name = options.get("format", AUTO)
    formats = save_formats(plugins)
    if name != AUTO and name not in formats:
        raise PlanError(f"save: unknown format '{name}'; known formats: {', '.join([AUTO] + sorted(formats))}")
    if name != AUTO:
        reason = formats[name].plan_refusal(set(facts), options)
        if reason:
            raise PlanError(f"save --format {name}: {reason}")


def choose(ctx, model, options: dict) -> SaveFormat:
    """The format to write ``model`` with: the named one if it holds the model, else (``auto``) the first that
    claims it and holds it. Raises :class:`GptoptError` with the reason otherwise (nothing has been written)."""
    name = options.get("format", AUTO)
    formats = save_formats(ctx.plugins)
    if name != AUTO:
        if name not in formats:
            raise GptoptError(f"save: unknown format '{name}'; known formats: {', '.join(format_names(ctx.plugins))}")
        reason = formats[name].refusal(ctx, model, options)
        if reason:
            raise GptoptError(f"save --format {name}: {reason}")
        return formats[name]
    reasons = []
    for fmt in formats.values():
        if not fmt.claims(ctx, model):
            continue
        reason = fmt.refusal(ctx, model, options)
        if reason is None:
            return fmt
        reasons.append(f"{fmt.name}: {reason}")
    raise GptoptError("save: no format holds this model (" + "; ".join(reasons or ["no format claims it"]) + ")")


def tensor_bytes(path) -> int:
    """Bytes of tensor data in every ``*.safetensors`` file under ``path`` (headers not counted)."""
    total = 0
    for f in sorted(Path(path).rglob("*.safetensors")):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total


class SafetensorsFormat(SaveFormat):
    """transformers' ``save_pretrained`` (the ``gptopt_save_model`` hook chain): float models, pruned models
    (zeros stored dense), bitsandbytes models one ``BitsAndBytesConfig`` describes, cpu-fast models, PEFT
    adapters. Refuses to write quantized layers de-quantized unless ``--allow-dequantized``."""

    name = "safetensors"
    summary = "save_pretrained safetensors: float, pruned (dense zeros), single-precision bitsandbytes, cpu-fast"

    GRID_HINT = ("its integer-grid layers would be written de-quantized; use --format compressed-tensors "
                 "(or auto), or pass --allow-dequantized")

    MIXED_HINT = ("one BitsAndBytesConfig cannot describe int8 layers beside 4-bit ones: the int8 layers would be "
                  "written de-quantized; quantize with one precision, or pass --allow-dequantized")

    def plan_refusal(self, facts, options):
        if "quantized:grid" in facts and not options.get("allow_dequantized"):
            return self.GRID_HINT
        return None

    def claims(self, ctx, model):
        return True

    def refusal(self, ctx, model, options):
        if grid_layers(model) and not options.get("allow_dequantized"):
            return self.GRID_HINT
        kinds = {type(m).__name__ for m in model.modules()} & {"Linear8bitLt", "Linear4bit"}
        if len(kinds) == 2 and not options.get("allow_dequantized"):  # the byte count below misses small models
            return self.MIXED_HINT
        return None

    def write(self, ctx, model, path, options):
        ctx.hook.gptopt_save_model(ctx=ctx, model=model, path=path)
        if options.get("allow_dequantized"):
            return
        held, written = model_bytes(model), tensor_bytes(path)
        if written > held * 1.02 + 65536:  # a module stored wider than it is held: written de-quantized
            raise GptoptError(
                f"save --format safetensors would write this model de-quantized ({written / 1e6:.1f} MB of tensors "
                f"vs {held / 1e6:.1f} MB held: one BitsAndBytesConfig cannot describe int8 layers beside 4-bit ones, "
                "quantized embeddings or a head tied to them); quantize with one precision and no --embeddings, "
                "use quantize --method rtn|gptq with --format compressed-tensors, or pass --allow-dequantized")
