"""Writing a model out: the core's ``safetensors`` writer and the atomic directory and file writes every writer
goes through (``save``'s directory, ``export``'s file).

The registry itself (:class:`gptopt_core.Writer`, which is also ``SaveFormat``, its first name; ``auto``; the
choice by facts) is :mod:`gptopt_core.writers`; this module keeps the first contract's names for it
(``save_formats``, ``check_save_format``, ``choose_save_format``). ``safetensors`` is transformers'
``save_pretrained`` through the ``gptopt_save_model`` hook chain, whose last link, the core's, hands a model a
specializing writer claims by its facts (bitsandbytes, cpu-fast) to that writer.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import GptoptError
from .kit.grids import grid_layers
from .kit.locks import OutputLock, publish_file
from .kit.metrics import model_bytes
from .kit.paths import clean_stale_partials, remove_stale_temporaries
from .writers import (AUTO, DIRECTORY, FILE, Writer, check_plan, choose, format_names,  # noqa: F401 (first names)
                      registered_writers)

#: the first contract's name of :class:`gptopt_core.Writer` (a directory writer unless ``kind = "file"``)
SaveFormat = Writer


def save_formats(plugins) -> dict:
    """``{name: SaveFormat instance}`` of the directory writers ``plugins`` registered, plugins' first and the
    core's last (:func:`gptopt_core.registered_writers` with ``kind="directory"``)."""
    return registered_writers(plugins, DIRECTORY)


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
    (zeros stored dense), PEFT adapters; bitsandbytes models one ``BitsAndBytesConfig`` describes and cpu-fast
    models through the writers that specialize it (``bitsandbytes``, ``cpu-fast``: chosen by the model's facts).
    Refuses to write quantized layers de-quantized unless ``--allow-dequantized``."""

    name = "safetensors"
    summary = "save_pretrained safetensors: float, pruned (dense zeros), single-precision bitsandbytes, cpu-fast"
    fallback = True  # auto: every model no writer of particular facts claims

    GRID_HINT = ("its integer-grid layers would be written de-quantized; use --format compressed-tensors "
                 "(or auto), or pass --allow-dequantized")

    MIXED_HINT = ("one BitsAndBytesConfig cannot describe int8 layers beside 4-bit ones: the int8 layers would be "
                  "written de-quantized; quantize with one precision, or pass --allow-dequantized")

    def plan_refusal(self, facts, options):
        if "quantized:grid" in facts and not options.get("allow_dequantized"):
            return self.GRID_HINT
        return None

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


def write_model_dir(ctx, target: Path, write, overwrite: bool = False) -> list[str]:
    """Write model + tokenizer + recipe.yaml + run.json into a temp dir beside ``target``, then rename; returns
    the names in ``target``. ``write(path)`` writes the model (a directory writer's :meth:`Writer.write`)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(target, "save --to"):  # a second save to this directory fails at once
        return _write_model_dir(ctx, target, overwrite, write)


def _write_model_dir(ctx, target: Path, overwrite: bool, write) -> list[str]:
    import yaml

    from .report import build_manifest, write_json_atomic

    clean_stale_partials(target)  # left by a save that was killed (-9) in an earlier run
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        ctx.tokenizer.save_pretrained(str(tmp))
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(ctx.recipe, sort_keys=False))
        write_json_atomic(tmp / "run.json", build_manifest(ctx))
        if target.exists():
            if not overwrite and (not target.is_dir() or any(target.iterdir())):
                raise GptoptError(f"save --to {target} appeared while saving (another program wrote it); pass "
                                  "--overwrite or choose another --to")
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
            tmp.rename(target)
            if old.is_symlink():  # --to named a link: the link is replaced, what it pointed to is left
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sorted(p.name for p in target.iterdir())


def write_model_file(ctx, writer: Writer, target: Path, options: dict, overwrite: bool = False) -> dict:
    """A file writer's :meth:`Writer.write` into an empty temporary file beside ``target``, then moved onto it
    atomically (:func:`gptopt_core.publish_file`: without ``overwrite`` a file that appeared meanwhile is never
    replaced); returns the writer's metrics. A failed write leaves nothing. An ``atomic`` writer writes ``target``
    itself."""
    target = Path(target)
    if writer.atomic:
        return dict(writer.write(ctx, ctx.model, target, {**options, "overwrite": overwrite}) or {})
    remove_stale_temporaries(target.parent, f".{target.name}.", ".writing")  # left by an export killed with -9
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".writing", dir=str(target.parent))
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; the output gets the user's usual mode
        metrics = writer.write(ctx, ctx.model, tmp, options) or {}  # writes (or replaces) the empty file ``tmp``
        if not tmp.is_file():
            raise GptoptError(f"export --format {writer.name} left no file to publish")
        publish_file(tmp, target, overwrite, "export --to")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dict(metrics)
