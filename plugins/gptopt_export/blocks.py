"""gptopt's integer grids written exactly: the block bytes of a grid's codes and fp16 scales, no re-rounding.

ggml's block layouts (``ggml-common.h``) for the types :mod:`.ggml_types` marks as holding a grid exactly:

* ``q8_0``: 32 weights per block, ``d`` fp16 then 32 int8 codes; ``w = q * d`` (8-bit symmetric, group 32);
* ``q4_0``: ``d`` fp16 then 16 bytes, byte ``j`` holds ``q[j] + 8`` (low nibble) and ``q[j + 16] + 8`` (high);
  ``w = (nibble - 8) * d`` (4-bit symmetric, group 32);
* ``q4_1``: ``d`` fp16, ``m`` fp16, 16 bytes of unsigned nibbles as above; ``w = nibble * d + m`` (4-bit
  asymmetric, group 32, with ``m = -zero * scale``; exact where ``m`` is an fp16 value, elsewhere the codes and
  scale are kept and ``m`` is rounded to fp16: :func:`gptopt_export.types.q4_1_min_inexact`).

Everything else is quantized from its float values by the type's encoder (:mod:`.ggml_types`).
"""
from __future__ import annotations

BLOCK = 32  # the legacy types' block: the group size a grid needs to be written exactly


def _fp16_bytes(t, n_rows, n_blocks):
    import numpy as np

    return t.detach().cpu().float().numpy().astype(np.float16).reshape(n_rows, n_blocks, 1).view(np.uint8)


def _nibbles(codes):
    """uint8 ``(rows, blocks, 16)``: byte j = codes[j] | codes[j + 16] << 4 within each block of 32."""
    import numpy as np

    rows, cols = codes.shape
    q = codes.detach().cpu().numpy().astype(np.uint8).reshape(rows, cols // BLOCK, BLOCK)
    return q[:, :, :16] | (q[:, :, 16:] << 4)


def _rows(parts):
    import numpy as np

    rows = parts[0].shape[0]
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(rows, -1))


def pack_q8_0(grid, codes):
    """uint8 ``(rows, bytes per row)``: ``codes`` (int8 range) on a symmetric 8-bit group-32 ``grid`` as q8_0."""
    import numpy as np

    rows, cols = codes.shape
    qs = codes.detach().cpu().numpy().astype(np.int8).reshape(rows, cols // BLOCK, BLOCK).view(np.uint8)
    return _rows([_fp16_bytes(grid.scale, rows, cols // BLOCK), qs])


def pack_q4_0(grid, codes):
    """``codes`` in [-8, 7] on a symmetric 4-bit group-32 ``grid`` as q4_0 (nibbles offset by 8)."""
    rows, cols = codes.shape
    return _rows([_fp16_bytes(grid.scale, rows, cols // BLOCK), _nibbles(codes + 8)])


def pack_q4_1(grid, codes):
    """``codes`` in [0, 15] on an asymmetric 4-bit group-32 ``grid`` as q4_1 (min ``-zero * scale`` in fp16)."""
    rows, cols = codes.shape
    m = -(grid.zero.float() * grid.scale.float())
    return _rows([_fp16_bytes(grid.scale, rows, cols // BLOCK), _fp16_bytes(m, rows, cols // BLOCK),
                  _nibbles(codes)])
