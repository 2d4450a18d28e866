"""gptopt-cpu: the ``cpu-fast`` step (fast CPU inference: bf16, torch dynamic int8, torchao int8; ``auto`` picks
the fastest format within a perplexity budget), saving/loading of the converted model, the auto table in
report.md.

Heavy imports (torch, transformers, torchao) happen inside the step body and the hooks only.
"""
from gptopt_core import hookimpl

from .step import CpuFastStep

__all__ = ["CpuFastStep", "load_converted"]


def load_converted(path, trust_remote_code: bool = False):
    """Load a directory saved after ``cpu-fast``: returns ``(model, tokenizer, record)`` (see docs/cpu.md)."""
    from .serialize import load_converted as _load

    return _load(path, trust_remote_code=trust_remote_code)


@hookimpl
def gptopt_register_steps(register):
    register(CpuFastStep)


@hookimpl
def gptopt_save_model(ctx, model, path):
    """Write a ``cpu-fast`` model: int8 weights + conversion record (no standard HF format exists for them)."""
    if getattr(model, "gptopt_cpu", None) is None:
        return None
    from .serialize import save_converted

    save_converted(model, path)
    return True


@hookimpl
def gptopt_resolve_model(spec, options):
    """Load a directory written by ``save`` after ``cpu-fast`` (it holds ``gptopt_cpu.json``), converted again."""
    from pathlib import Path

    path = Path(spec).expanduser()
    if not (path / "gptopt_cpu.json").is_file():
        return None
    from gptopt_core import LoadedModel, SourceError, check_local_dir

    # FIFOs / devices, config.json, layer count and size against the files (int8 layers are packed: not exact)
    check_local_dir(path, allow_pickle=False, exact=False)
    if not str(options.get("device", "cpu")).startswith("cpu"):
        raise SourceError(f"{spec} holds a cpu-fast model, which runs on CPU only; run with --device cpu")
    try:
        model, tokenizer, record = load_converted(path, trust_remote_code=bool(options.get("trust_remote_code")))
    except Exception as exc:  # safetensors / transformers / torch raise many types for broken files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceError(f"cannot load the cpu-fast model in {spec}: {first}") from None
    facts = {"cpu-only", "quantized:cpu-bf16" if record["format"] == "bf16" else "quantized:cpu-int8"}
    return LoadedModel(model, tokenizer, "gptopt-cpu", facts)


@hookimpl
def gptopt_run_finished(ctx, records, out_dir):
    sections = []
    for index, record in enumerate(records, 1):
        table = record.get("metrics", {}).get("auto_table") if record.get("name") == "cpu-fast" else None
        if table:
            from .run import table_markdown

            params = record.get("params", {})
            sections.append(f"## step {index}: " + table_markdown(table, params.get("max_ppl_increase", 0.1),
                                                                   params.get("select_on", "valid")))
    return sections or None
