"""gptopt-ctensors: the ``compressed-tensors`` save format (``save --format compressed-tensors``) and its loader.

Integer weight grids (:mod:`gptopt_core.kit.grids`, e.g. from ``quantize --method rtn|gptq``) are written packed with
their fp16 scales (``pack-quantized``, one config group per scheme and layer kind, full-precision layers in
``ignore``), as llm-compressor writes W4A16 / W8A16 checkpoints; embeddings / heads as ``naive-quantized`` int8,
GPT-2 Conv1D layers in column blocks (:mod:`.layout`). Plain ``AutoModelForCausalLM.from_pretrained(dir)`` reads
them back through transformers' compressed-tensors quantizer (where it cannot, ``save`` says so in one line:
:func:`plain_note`). A pruned model without grids is written sparse (``sparse-24-bitmask`` where every mask is
2:4, else ``sparse-bitmask``), which ``gptopt run --model DIR`` reads and plain transformers does not (upstream
dropped these layouts); pruned layers on grids keep their zeros inside the packed codes, which every reader reads.
bitsandbytes nf4/fp4/int8 and cpu-fast layers are refused with a line naming what can hold them.

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.saveformat` the format (its
checks), :mod:`.writer` / :mod:`.reader` / :mod:`.layout` / :mod:`.packing` the torch and compressed_tensors work
(imported inside their functions), :mod:`.moe` the per-expert layout of mixture-of-experts models. See
docs/save-formats.md.
"""
from gptopt_core import hookimpl
from gptopt_core.vocabulary import MatrixCell

from .reader import load_model, resolve
from .saveformat import CompressedTensorsFormat, plain_note

__all__ = ["CompressedTensorsFormat", "load_model", "plain_note"]


@hookimpl
def gptopt_register_writers(register):
    register(CompressedTensorsFormat)


@hookimpl
def gptopt_register_vocabulary(register):
    register(MatrixCell("save compressed-tensors"))


@hookimpl
def gptopt_resolve_model(spec, options):
    """A directory whose config.json says ``quant_method: compressed-tensors``: read it with :mod:`.reader`."""
    return resolve(spec, options)
