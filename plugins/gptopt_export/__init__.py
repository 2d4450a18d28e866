"""gptopt-export: the ``export`` step, which writes a file with a file writer of the one writer registry, and
its ``gguf`` writer (``export --format gguf``: a GGUF file llama.cpp loads, integer grids written without
re-rounding) and ``llamacpp`` (the file measured in llama.cpp: perplexity on eval's tokens, prefill and decode
speed on bench's workload). See docs/export.md.

Heavy imports (torch, gguf, numpy, llama_cpp) happen inside the steps only.
"""
from gptopt_core import hookimpl
from gptopt_core.vocabulary import Fact, MatrixCell, StateKey

from .fileformat import GgufWriter
from .step import ExportStep, LlamacppStep

__all__ = ["ExportStep", "GgufWriter", "LlamacppStep"]


@hookimpl
def gptopt_register_steps(register):
    register(ExportStep)
    register(LlamacppStep)


@hookimpl
def gptopt_register_writers(register):
    """``export --format gguf`` (the file writers' fallback: ``auto`` picks it where no other claims the model)."""
    register(GgufWriter)


@hookimpl
def gptopt_register_vocabulary(register):
    register(StateKey("gguf", "path of the GGUF file the last export step wrote (llamacpp measures it)"))
    register(Fact("gguf", "a GGUF file of the model was written (ctx.state['gguf'])"))
    why_not = "llama.cpp has no architecture for it (no GGUF layout in the table)"
    for cell in ("export gguf f32 + llamacpp", "rtn int8 -> export gguf q8_0 + llamacpp",
                 "gptq int4 -> export gguf q4_0 + llamacpp"):
        register(MatrixCell(cell, needs="gguf", why_not=why_not))


@hookimpl
def gptopt_register_pre_tokenizers(register):
    from .vocab_pre import builtin_pre_tokenizers

    for pre in builtin_pre_tokenizers():
        register(pre)


@hookimpl
def gptopt_run_finished(ctx, records, out_dir):
    from .measure import report_section

    section = report_section(records)
    return [section] if section else None
