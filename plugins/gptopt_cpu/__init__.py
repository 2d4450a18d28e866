"""gptopt-cpu: the ``cpu-fast`` step (fast CPU inference: bf16, torch dynamic int8, torchao int8; ``auto`` picks
the fastest format within a perplexity budget), saving/loading of the converted model, the auto table in
report.md.

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the step,
:mod:`.report` the auto table; the torch work is in :mod:`.run`, :mod:`.convert`, :mod:`.guard`, :mod:`.timing`, and
:mod:`.serialize` (saving, loading: torch imported inside its functions), imported where they run.
"""
from gptopt_core import hookimpl
from gptopt_core.vocabulary import Fact, MatrixCell

from .report import report_sections
from .serialize import load_converted, resolve
from .step import CpuFastStep
from .writer import CpuFastWriter

__all__ = ["CpuFastStep", "CpuFastWriter", "load_converted"]


@hookimpl
def gptopt_register_steps(register):
    register(CpuFastStep)


@hookimpl
def gptopt_register_writers(register):
    """``save --format cpu-fast``: int8 weights + conversion record (no standard HF format exists for them); chosen
    by the facts ``cpu-only`` / ``quantized:cpu-*`` under ``auto`` and ``--format safetensors``."""
    register(CpuFastWriter)


@hookimpl
def gptopt_register_vocabulary(register):
    register(Fact("cpu-only", "the model was converted for CPU inference (torch dynamic int8, torchao, compile)",
                  lossy=True))
    register(MatrixCell("cpu-fast"))


@hookimpl
def gptopt_resolve_model(spec, options):
    """Load a directory written by ``save`` after ``cpu-fast`` (it holds ``gptopt_cpu.json``), converted again."""
    return resolve(spec, options)


@hookimpl
def gptopt_run_finished(ctx, records, out_dir):
    return report_sections(records)
