"""gptopt-quantize: the ``quantize`` step: integer grids (``--method rtn|gptq``) and bitsandbytes int8 / nf4 / fp4
(full, partial and sensitivity-planned). Formerly ``gptopt-bnb``; that name still works in ``GPTOPT_LOAD_PLUGINS`` /
``GPTOPT_BLOCK_PLUGINS`` (``gptopt_core.plugins.RENAMED``).

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the step;
the torch work is in the engine modules (:mod:`.grid`, :mod:`.gptq` for the grids; :mod:`.workflow`,
:mod:`.convert`, :mod:`.planner`, :mod:`.saving` for bitsandbytes), imported where they run, so that importing this
module (``gptopt --help``) loads no torch.
"""
from gptopt_core import hookimpl
from gptopt_core.vocabulary import MatrixCell

from .step import QuantizeStep
from .writer import BitsAndBytesWriter

__all__ = ["BitsAndBytesWriter", "QuantizeStep"]


@hookimpl
def gptopt_register_steps(register):
    register(QuantizeStep)


@hookimpl
def gptopt_register_writers(register):
    """``save --format bitsandbytes``; chosen by the facts ``quantized:4bit`` / ``quantized:8bit`` under ``auto`` and
    ``--format safetensors`` (it specializes safetensors)."""
    register(BitsAndBytesWriter)


@hookimpl
def gptopt_register_vocabulary(register):
    for cell in ("bnb int8", "bnb nf4", "rtn int4", "gptq int4"):
        register(MatrixCell(f"quantize {cell}"))

