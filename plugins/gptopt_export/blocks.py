"""GGML tensor types for each weight, and their bytes.

A weight whose integer grid is exactly a GGUF block type is written from its codes and fp16 scales, without
re-rounding (ggml's block layouts, ``ggml-common.h``):

* ``q8_0``: 32 weights per block, ``d`` fp16 then 32 int8 codes; ``w = q * d`` (8-bit symmetric, group 32);
* ``q4_0``: ``d`` fp16 then 16 bytes, byte ``j`` holds ``q[j] + 8`` (low nibble) and ``q[j + 16] + 8`` (high);
  ``w = (nibble - 8) * d`` (4-bit symmetric, group 32);
* ``q4_1``: ``d`` fp16, ``m`` fp16, 16 bytes of unsigned nibbles as above; ``w = nibble * d + m`` (4-bit
  asymmetric, group 32, with ``m = -zero * scale``; exact where ``m`` is an fp16 value, elsewhere the codes and
  scale are kept and ``m`` is rounded to fp16).

Everything else is quantized from its float values by gguf-py (``gguf.quants``, ggml's reference rounding), and
the K-quants and IQ4_NL by :mod:`.kquants` (ggml's functions in numpy; gguf-py only de-quantizes those).
"""
from __future__ import annotations

FLOAT_TYPES = ("f32", "f16", "bf16")
QUANT_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
K_TYPES = ("q4_k", "q5_k", "q6_k", "iq4_nl")  # .kquants (q*_k: 256-weight super-blocks)
WEIGHTED = ("q4_0", "iq4_nl")  # encoders that take an importance vector (imatrix), .kquants.WEIGHTED
TYPES = FLOAT_TYPES + QUANT_TYPES + K_TYPES
BLOCK = 32  # the 32-weight block every type but the q*_k super-blocks quantizes along the row


def ggml_type(name: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, name.upper())


def exact_type(grid, codes) -> tuple[str | None, str]:
    """The GGUF type holding ``grid``'s codes and scales, or ``None``, and a note: ``""`` when the block type
    holds the grid exactly, else why not (for ``None``) or what is rounded (q4_1's min, see :func:`q4_1_min_inexact`)."""
    if grid.group_size != BLOCK:
        return None, f"{grid.describe()}: GGUF blocks are 32 weights"
    if grid.bits == 8 and grid.symmetric:
        return "q8_0", ""
    if grid.bits == 4 and grid.symmetric:
        return "q4_0", ""
    if grid.bits == 4 and not grid.symmetric:
        inexact = q4_1_min_inexact(grid)
        return "q4_1", (f"min -zero*scale rounded to fp16 in {inexact:.1%} of blocks" if inexact else "")
    return None, f"{grid.describe()}: no GGUF block type with these codes"


def nearest_type(grid) -> str:
    """The type a grid that has no exact GGUF form is re-rounded to."""
    if grid.bits >= 8:
        return "q8_0"
    if grid.bits == 5:
        return "q5_0" if grid.symmetric else "q5_1"
    return "q4_0" if grid.symmetric else "q4_1"


def q4_1_min_inexact(grid) -> float:
    """Fraction of blocks whose q4_1 min ``m = -zero * scale`` is not an fp16 value. q4_1 stores ``m`` as fp16, so
    such a block keeps its codes and scale and gets the nearest fp16 ``m``: every weight of the block moves by the
    same offset, at most half an fp16 step of ``m`` (far less than re-rounding the block to a new grid)."""
    m = -(grid.zero.float() * grid.scale.float())
    return float((m.half().float() != m).float().mean())


def _fp16_bytes(t, n_rows, n_blocks):
    import numpy as np

    return t.detach().cpu().float().numpy().astype(np.float16).reshape(n_rows, n_blocks, 1).view(np.uint8)


def _nibbles(codes):
    """uint8 ``(rows, blocks, 16)``: byte j = codes[j] | codes[j + 16] << 4 within each block of 32."""
    import numpy as np

    rows, cols = codes.shape
    q = codes.detach().cpu().numpy().astype(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    return q[:, :, :16] | (q[:, :, 16:] << 4)


def pack_exact(type_name: str, grid, codes):
    """uint8 ``(rows, bytes per row)`` of ``codes`` on ``grid`` in the block layout of ``type_name``."""
    import numpy as np

    rows, cols = codes.shape
    n_blocks = cols // BLOCK
    d = _fp16_bytes(grid.scale, rows, n_blocks)
    if type_name == "q8_0":
        qs = codes.detach().cpu().numpy().astype(np.int8).reshape(rows, n_blocks, BLOCK).view(np.uint8)
        parts = [d, qs]
    elif type_name == "q4_0":
        parts = [d, _nibbles(codes + 8)]
    elif type_name == "q4_1":
        m = _fp16_bytes(-(grid.zero.float() * grid.scale.float()), rows, n_blocks)
        parts = [d, m, _nibbles(codes)]
    else:
        raise ValueError(type_name)
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(rows, -1))


def encode(values, type_name: str, importance=None):
    """numpy array for the writer: float32/float16 values, or uint8 block bytes (bf16 and q types). ``importance``
    (mean squared activation per input column, an imatrix row): q4_0 and iq4_nl pick their block scales weighted
    by it, as llama.cpp's quantizer does with ``--imatrix``."""
    import numpy as np

    data = values.detach().cpu().float().numpy()
    if type_name == "f32":
        return data.astype(np.float32)
    if type_name == "f16":
        return data.astype(np.float16)
    if type_name in K_TYPES or (importance is not None and type_name == "q4_0"):
        from .kquants import quantize

        return quantize(data, type_name, importance)
    import gguf

    return gguf.quants.quantize(data, ggml_type(type_name))


def fits(type_name: str, row_len: int) -> bool:
    """Whether a row of ``row_len`` weights can be stored as ``type_name`` (whole blocks: 32 weights, 256 for the
    q*_k super-blocks)."""
    from .kquants import BLOCK_OF

    return type_name in FLOAT_TYPES or row_len % BLOCK_OF.get(type_name, BLOCK) == 0
