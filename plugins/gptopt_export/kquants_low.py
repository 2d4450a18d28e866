"""numpy encoders for GGML's 3- and 2-bit K-quants (q3_K, q2_K), after ggml's ``ggml-quants.c``.

Both follow llama.cpp's reference functions step for step (what its quantizer runs without an importance
matrix; with one, ``quantize_row_q2_K_impl`` / ``quantize_row_q3_K_impl``), vectorized over sub-blocks, float32 throughout,
``nearest_int`` = round half to even:

* ``q3_k``: ``quantize_row_q3_K_ref``: 256-weight super-blocks of sixteen 16-weight sub-blocks; each sub-block's
  scale fitted by ``make_q3_quants`` (codes in [-4, 3], weights ``x^2``, five passes of one-code-at-a-time
  refinement), the scales quantized to 6 bits against the super-block's fp16 ``d`` (``-32 / `` the largest),
  the codes re-rounded on the quantized scales. ``w = d * (sc - 32) * q``. Layout: ``hmask`` (32 bytes, the codes'
  third bit), ``qs`` (64 bytes, two low bits each), 12 bytes of 6-bit scales, ``d``: 110 bytes (3.4375 bits).
* ``q2_k``: ``quantize_row_q2_K_ref``: sixteen 16-weight sub-blocks, each scale and min fitted by
  ``make_qkx2_quants`` (codes in [0, 3], weights ``|x|``, weighted absolute error, 16 candidate scales), both
  quantized to 4 bits against fp16 ``d`` / ``dmin``, codes re-rounded. ``w = d * sc * q - dmin * m``. Layout:
  16 bytes of scale | min << 4, ``qs`` (64 bytes), ``d``, ``dmin``: 84 bytes (2.625 bits).

Rows must be whole 256-weight super-blocks; llama.cpp (and :mod:`.ggml_types`) falls back to iq4_nl otherwise.
"""
from __future__ import annotations

from .kquants import QK_K, _f16, make_qkx2, make_qx

GROUP_MAX_EPS = 1e-15


def _nearest(v, lo: int, hi: int):
    """``nearest_int`` clamped to ``[lo, hi]`` (clamped before the integer cast: no overflow on huge values)."""
    import numpy as np

    return np.clip(np.rint(v), lo, hi).astype(np.int32)


def make_q3(x, nmax: int = 4):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)`` over blocks ``x (B, n)``: ``(scale (B,), codes + nmax)``."""
    import numpy as np

    f32 = np.float32
    B, n = x.shape
    mx = x[np.arange(B), np.abs(x).argmax(1)]
    zero = np.abs(mx) < GROUP_MAX_EPS
    iscale = f32(-nmax) / np.where(zero, f32(1), mx)
    L = _nearest(iscale[:, None] * x, -nmax, nmax - 1)
    w = x * x
    lf = L.astype(f32)
    sumlx, suml2 = (w * x * lf).sum(1), (w * lf * lf).sum(1)
    for _ in range(5):  # a pass that changes nothing leaves the state as it is: five passes == ggml's early stop
        for i in range(n):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(f32)
            slx = sumlx - wi * xi * li
            pos = slx > 0
            sl2 = suml2 - wi * li * li
            new = _nearest(xi * sl2 / np.where(pos, slx, f32(1)), -nmax, nmax - 1)
            nf = new.astype(f32)
            slx2, sl22 = slx + wi * xi * nf, sl2 + wi * nf * nf
            take = pos & (new != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new, L[:, i])
            sumlx, suml2 = np.where(take, slx2, sumlx).astype(f32), np.where(take, sl22, suml2).astype(f32)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(f32)
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, L + nmax)


def _pack_2bit(L):
    """``(S, 256)`` codes in [0, 3] -> ``(S, 64)`` bytes: byte ``32 h + l`` holds codes ``128 h + 32 k + l`` at bits
    ``2 k`` (k = 0..3)."""
    import numpy as np

    q = L.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _q3_scale_bytes(ls):
    """``(S, 16)`` 6-bit scales (offset by 32) -> ``(S, 12)`` bytes in q3_K's layout."""
    import numpy as np

    ls = ls.astype(np.uint8)
    low, high = ls & 0xF, (ls >> 4).reshape(-1, 4, 4)  # high[:, j // 4, j % 4]
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, :8] = low[:, :8] | (low[:, 8:] << 4)
    out[:, 8:] = high[:, 0] | (high[:, 1] << 2) | (high[:, 2] << 4) | (high[:, 3] << 6)
    return out


def quantize_q3_k(x):
    """float32 ``(rows, cols)``, cols a multiple of 256 -> uint8 ``(rows, cols / 256 * 110)``."""
    import numpy as np

    f32 = np.float32
    sb = x.astype(f32).reshape(-1, QK_K)
    S = sb.shape[0]
    scales, L = make_q3(sb.reshape(S * 16, 16), 4)
    scales = scales.reshape(S, 16)
    max_scale = scales[np.arange(S), np.abs(scales).argmax(1)]
    nz = max_scale != 0
    iscale = np.where(nz, f32(-32) / np.where(nz, max_scale, f32(1)), f32(1)).astype(f32)
    ls = np.where(nz[:, None], _nearest(iscale[:, None] * scales, -32, 31) + 32, 0)
    return _q3_blocks(x.shape, sb, L, ls, _f16(np.where(nz, f32(1) / iscale, f32(0))))


def quantize_q3_k_weighted(x, qw):
    """``quantize_row_q3_K_impl`` with an importance ``qw (cols,)``: sub-block scales fitted by ``make_qx_quants``
    with weights ``qw * sqrt(sigma2 + x^2)`` (``sigma2``: twice the super-block's mean ``x^2``), then the sixteen
    scales themselves quantized to 6 bits by ``make_qx_quants`` weighted by their sub-blocks' summed weights."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    sb = x.astype(f32).reshape(-1, QK_K)
    S = sb.shape[0]
    sigma2 = f32(2) * (sb * sb).sum(1, keepdims=True) / f32(QK_K)
    w = np.tile(np.asarray(qw, dtype=f32).reshape(-1, QK_K), (rows, 1)) * np.sqrt(sigma2 + sb * sb)
    scales, L = make_qx(sb.reshape(S * 16, 16), 4, w.reshape(S * 16, 16))
    d, ls = make_qx(scales.reshape(S, 16), 32, w.reshape(S, 16, 16).sum(2))
    return _q3_blocks(x.shape, sb, L, ls, _f16(d))


def _q3_blocks(shape, sb, L, ls, d):
    """q3_K bytes of super-blocks ``sb (S, 256)``: codes ``L`` (+4) re-rounded on the 6-bit scales ``ls`` (+32)
    and fp16 ``d``, where a sub-block's scale is not zero."""
    import numpy as np

    f32 = np.float32
    S = sb.shape[0]
    L = L.reshape(S, 16, 16)
    dl = d.astype(f32)[:, None] * (ls - 32).astype(f32)
    q = _nearest(sb.reshape(S, 16, 16) / np.where(dl == 0, f32(1), dl)[..., None], -4, 3) + 4
    L = np.where((dl == 0)[..., None], L, q).reshape(S, QK_K)
    high = L > 3
    L = np.where(high, L - 4, L)
    hmask = (high.reshape(S, 8, 32).astype(np.uint8) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(
        1).astype(np.uint8)  # distinct bits: sum == or
    out = np.concatenate([hmask, _pack_2bit(L), _q3_scale_bytes(ls), d.reshape(-1, 1).view(np.uint8)], axis=1)
    return np.ascontiguousarray(out.reshape(shape[0], -1))


def quantize_q2_k(x):
    """float32 ``(rows, cols)``, cols a multiple of 256 -> uint8 ``(rows, cols / 256 * 84)``."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    sb = x.astype(f32).reshape(-1, QK_K)
    S = sb.shape[0]
    sub = sb.reshape(S * 16, 16)
    scales, mins, L = make_qkx2(sub, np.abs(sub), 3, -0.5, 0.1, 15, mad=True)
    scales, mins = scales.reshape(S, 16), mins.reshape(S, 16)
    max_scale, max_min = np.maximum(scales.max(1), f32(0)), np.maximum(mins.max(1), f32(0))

    def four_bits(values, top):
        inv = np.where(top > 0, f32(15) / np.where(top > 0, top, f32(1)), f32(0)).astype(f32)
        return np.where((top > 0)[:, None], np.rint(inv[:, None] * values), 0).astype(np.int64)

    ls, lm = four_bits(scales, max_scale), four_bits(mins, max_min)
    sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)  # uint8 stores, as ggml's
    d = _f16(np.where(max_scale > 0, max_scale / f32(15), f32(0)))
    dmin = _f16(np.where(max_min > 0, max_min / f32(15), f32(0)))
    return _q2_blocks(sb, L, sc, d, dmin, rows)


def _q2_blocks(sb, L, sc, d, dmin, rows):
    """q2_K bytes of super-blocks ``sb (S, 256)``: codes ``L`` re-rounded on the 4-bit scales and mins ``sc`` and
    fp16 ``d`` / ``dmin``, where a sub-block's scale is not zero."""
    import numpy as np

    f32 = np.float32
    S = sb.shape[0]
    dl = d.astype(f32)[:, None] * (sc & 0xF).astype(f32)
    ml = dmin.astype(f32)[:, None] * (sc >> 4).astype(f32)
    q = _nearest((sb.reshape(S, 16, 16) + ml[..., None]) / np.where(dl == 0, f32(1), dl)[..., None], 0, 3)
    L = np.where((dl == 0)[..., None], L.reshape(S, 16, 16), q).reshape(S, QK_K)
    out = np.concatenate([sc, _pack_2bit(L), d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8)],
                         axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def make_qp(x, w, nmax: int):
    """``make_qp_quants(n, nmax, x, L, quant_weights)`` over rows ``x (S, n)`` of non-negative values (the
    sub-block scales or mins of a super-block), weights ``w``: ``(scale (S,), codes in [0, nmax])``."""
    import numpy as np

    f32 = np.float32
    top = np.maximum(x.max(1), f32(0))
    zero = top < GROUP_MAX_EPS
    top = np.where(zero, f32(1), top)

    def codes(iscale):
        return np.minimum(nmax, np.rint(iscale[:, None] * x)).astype(np.int32)

    iscale = (f32(nmax) / top).astype(f32)
    best = (w * (x - (f32(1) / iscale)[:, None] * codes(iscale)) ** 2).sum(1)
    for step in range(-4, 5):
        if step == 0:
            continue
        trial = ((f32(0.1) * step + nmax) / top).astype(f32)
        mse = (w * (x - (f32(1) / trial)[:, None] * codes(trial)) ** 2).sum(1)
        iscale = np.where(mse < best, trial, iscale).astype(f32)
        best = np.minimum(mse, best)
    L = codes(iscale)
    lf = L.astype(f32)
    sumlx, suml2 = (w * x * lf).sum(1), (w * lf * lf).sum(1)
    for _ in range(5):  # as make_q3: a pass that changes nothing changes nothing after it
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], L[:, i].astype(f32)
            slx, sl2 = sumlx - wi * xi * li, suml2 - wi * li * li
            ok = (slx > 0) & (sl2 > 0)
            new = np.minimum(nmax, np.rint(xi * sl2 / np.where(ok, slx, f32(1)))).astype(np.int32)
            nf = new.astype(f32)
            slx2, sl22 = slx + wi * xi * nf, sl2 + wi * nf * nf
            take = ok & (new != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = np.where(take, new, L[:, i])
            sumlx, suml2 = np.where(take, slx2, sumlx).astype(f32), np.where(take, sl22, suml2).astype(f32)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(f32)
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, L)


def quantize_q2_k_weighted(x, qw):
    """``quantize_row_q2_K_impl`` with an importance ``qw (cols,)``: sub-block scale and min fitted by
    ``make_qkx3_quants`` (weights ``qw * sqrt(sigma2 + x^2)``, squared error, 37 candidates), the sixteen scales
    and mins quantized to 4 bits by ``make_qp_quants`` weighted by their sub-blocks' summed weights."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    sb = x.astype(f32).reshape(-1, QK_K)
    S = sb.shape[0]
    sigma2 = (sb * sb).sum(1, keepdims=True) / f32(QK_K)
    w = (np.tile(np.asarray(qw, dtype=f32).reshape(-1, QK_K), (rows, 1)) * np.sqrt(sigma2 + sb * sb)).reshape(
        S * 16, 16)
    scales, mins, L = make_qkx2(sb.reshape(S * 16, 16), w, 3, -0.9, 0.05, 36)  # make_qkx3_quants with weights
    sw = w.sum(1).reshape(S, 16)
    dm, ls = make_qp(scales.reshape(S, 16), sw, 15)
    mm, lm = make_qp(mins.reshape(S, 16), sw, 15)
    sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
    return _q2_blocks(sb, L, sc, _f16(dm), _f16(mm), rows)
