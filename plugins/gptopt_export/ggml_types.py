"""The GGUF tensor types ``export`` writes: one record per type, the one table every part of the export reads.

As gguf-py's ``gguf/quants.py`` has one class per GGML type (block size, bytes, quantize, de-quantize), each type
here is one :class:`GgufType`: its ggml type id and block geometry (ggml's ``ggml-common.h``, the sizes gguf-py's
``GGML_QUANT_SIZES`` lists), llama.cpp's ``general.file_type`` for a file of mostly that type, the encoder that
quantizes float values into it, the encoder that weights the rounding by an importance matrix (or ``None``),
the type llama.cpp's quantizer falls back to when a row is not whole blocks, whether it is a K-/IQ-type, and
which of gptopt's integer grids it holds exactly (written from the codes by :mod:`.blocks`, no re-rounding).

The writer (:mod:`.gguf_writer`), the type chooser (:mod:`.types`), ``--plan`` (:mod:`.mix`), the importance
matrix weighting and the option checks (``--type``, plan files) read this table only; a test checks every record
against gguf-py's ids and sizes. Encoders: gguf-py's reference quantizers for the float and legacy types, and
gptopt's numpy ports of ggml's K-quant and IQ4_NL functions (:mod:`.kquants`, :mod:`.kquants_low`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

from . import blocks, kquants, kquants_low


@dataclass(frozen=True)
class GgufType:
    """One GGML tensor type as the exporter writes it."""

    name: str  # --type / --plan spelling: gguf-py's GGMLQuantizationType name, lower case
    ggml_id: int  # GGMLQuantizationType value (ggml's enum ggml_type)
    block: int  # weights per block along a row (1: a float type)
    block_bytes: int  # bytes per block
    file_type: int  # llama.cpp's general.file_type (LlamaFileType) of a file mostly of this type
    encode: Callable  # float32 numpy (rows, cols) -> the array the writer stores (block bytes, or floats)
    weighted: Optional[Callable] = None  # (x, importance per column) -> block bytes; None: no importance used
    fallback: Optional[str] = None  # llama.cpp's tensor_type_fallback for rows that are not whole blocks
    k_type: bool = False  # a K- or IQ-type (ggml's search-based quantizers, ported in .kquants)
    exact_grid: Optional[tuple] = None  # (bits, symmetric) of the gptopt grid it holds exactly, 32-weight groups
    pack: Optional[Callable] = None  # (grid, codes) -> block bytes of that grid's codes and scales
    native: bool = False  # stored as the numpy dtype itself (f32, f16): gguf-py infers the type

    @property
    def is_float(self) -> bool:
        return self.block == 1

    @property
    def bits(self) -> float:
        """Bits per weight of a tensor stored in this type."""
        return 8 * self.block_bytes / self.block

    def qtype(self):
        """gguf-py's ``GGMLQuantizationType`` of this type."""
        import gguf

        return gguf.GGMLQuantizationType(self.ggml_id)

    def fits(self, row_len: int) -> bool:
        """Whether a row of ``row_len`` weights is whole blocks of this type."""
        return row_len % self.block == 0

    def nbytes(self, shape) -> int:
        """Bytes of a tensor of ``shape`` (rows along the last axis) stored in this type."""
        return int(math.prod(shape[:-1]) * (shape[-1] // self.block) * self.block_bytes)

    def quantize(self, x, importance=None):
        """The array the writer stores for float32 numpy ``x`` (``(rows, cols)``; floats may be 1-D); with an
        ``importance`` (mean squared activation per column) the weighted encoder where the type has one."""
        if not self.fits(x.shape[-1]):
            raise ValueError(f"{self.name}: rows of {x.shape[-1]} are not whole {self.block}-weight blocks")
        if importance is not None and self.weighted is not None:
            return self.weighted(x.reshape(-1, x.shape[-1]), importance)
        return self.encode(x)


def _f32(x):
    import numpy as np

    return x.astype(np.float32)


def _f16(x):
    import numpy as np

    return x.astype(np.float16)


def _gguf_py(ggml_id: int):
    """gguf-py's reference quantizer (ggml's ``quantize_row_*_ref``) for ``ggml_id``."""
    def encode(x):
        import gguf

        return gguf.quants.quantize(x, gguf.GGMLQuantizationType(ggml_id))
    return encode


def _iq4_nl_weighted(x, qw):
    return kquants.quantize_iq4_nl(x, 7, qw)


TYPES: dict[str, GgufType] = {}


def register(record: GgufType) -> GgufType:
    """Add a type to the table (a name given twice is a programming error)."""
    if record.name in TYPES:
        raise ValueError(f"GGUF type '{record.name}' registered twice")
    TYPES[record.name] = record
    return record


QK = 32  # the legacy types' block
QK_K = kquants.QK_K  # the K-quants' super-block
for _record in (
    GgufType("f32", 0, 1, 4, 0, _f32, native=True),
    GgufType("f16", 1, 1, 2, 1, _f16, native=True),
    GgufType("bf16", 30, 1, 2, 32, _gguf_py(30)),
    GgufType("q8_0", 8, QK, 34, 7, _gguf_py(8), exact_grid=(8, True), pack=blocks.pack_q8_0),
    GgufType("q4_0", 2, QK, 18, 2, _gguf_py(2), weighted=kquants.quantize_q4_0_weighted, exact_grid=(4, True),
             pack=blocks.pack_q4_0),
    GgufType("q4_1", 3, QK, 20, 3, _gguf_py(3), exact_grid=(4, False), pack=blocks.pack_q4_1),
    GgufType("q5_0", 6, QK, 22, 8, _gguf_py(6)),
    GgufType("q5_1", 7, QK, 24, 9, _gguf_py(7)),
    GgufType("q2_k", 10, QK_K, 84, 10, kquants_low.quantize_q2_k, weighted=kquants_low.quantize_q2_k_weighted,
             fallback="iq4_nl", k_type=True),
    GgufType("q3_k", 11, QK_K, 110, 11, kquants_low.quantize_q3_k, weighted=kquants_low.quantize_q3_k_weighted,
             fallback="iq4_nl", k_type=True),
    GgufType("q4_k", 12, QK_K, 144, 14, kquants.quantize_q4_k, fallback="q5_0", k_type=True),
    GgufType("q5_k", 13, QK_K, 176, 16, kquants.quantize_q5_k, fallback="q5_1", k_type=True),
    GgufType("q6_k", 14, QK_K, 210, 18, kquants.quantize_q6_k, fallback="q8_0", k_type=True),
    GgufType("iq4_nl", 20, QK, 18, 25, kquants.quantize_iq4_nl, weighted=_iq4_nl_weighted, k_type=True),
):
    register(_record)

#: every type name, in the table's order (``--type``, ``--plan`` files)
NAMES = tuple(TYPES)


def get(name: str) -> GgufType:
    """The record of ``name``; a ``KeyError`` naming the known types otherwise."""
    try:
        return TYPES[name]
    except KeyError:
        raise KeyError(f"GGUF type '{name}' unknown; use one of {', '.join(TYPES)}") from None


def weighted_names() -> tuple:
    """The types whose rounding an importance matrix weights (``--imatrix`` / ``--imatrix-in``)."""
    return tuple(t.name for t in TYPES.values() if t.weighted is not None)


def encode(values, name: str, importance=None):
    """numpy array for the writer from a float torch tensor ``values``: see :meth:`GgufType.quantize`."""
    return get(name).quantize(values.detach().cpu().float().numpy(), importance)
