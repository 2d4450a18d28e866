"""numpy encoders for GGML's K-quants (q4_K, q5_K, q6_K) and IQ4_NL, after ggml's ``ggml-quants.c``.

gguf-py (``gguf.quants``) de-quantizes these types but does not quantize them; these follow llama.cpp's own
functions step for step, vectorized over blocks (float32 throughout, ``nearest_int`` = round half to even):

* ``q4_k`` / ``q5_k``: ``quantize_row_q{4,5}_K_ref``: 256-weight super-blocks of eight 32-weight sub-blocks; each
  sub-block's scale and min fitted by ``make_qkx2_quants`` (weights ``rms(x) + |x|``, a search over 21 / 16
  candidate scales), then both quantized to 6 bits against the super-block's fp16 ``d`` / ``dmin``, and the codes
  re-rounded on the quantized scales. ``w = d*sc*q - dmin*m``. 144 / 176 bytes per 256 weights (4.5 / 5.5 bits).
* ``q6_k``: ``quantize_row_q6_K_ref``: sixteen 16-weight sub-blocks, each fitted by ``make_qx_quants``
  (weights ``x^2``, 19 candidate scales), 8-bit sub-block scales against an fp16 ``d``; ``w = d*sc*(q - 32)``.
  210 bytes per 256 weights (6.5625 bits).
* ``iq4_nl``: ``quantize_iq4_nl`` as llama.cpp's quantizer calls it without an importance matrix (``ntry = 7``,
  weights ``x^2``): 32-weight blocks, an fp16 scale and 4-bit indices into the non-linear table
  ``kvalues_iq4nl``; 18 bytes per 32 weights (4.5 bits).

Rows must be whole super-blocks (256 weights; 32 for iq4_nl); the type table (:mod:`.ggml_types`) registers these
encoders and says what llama.cpp writes for rows that are not.
"""
from __future__ import annotations

QK_K = 256
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _f16(x):
    import numpy as np

    return np.asarray(x, dtype=np.float32).astype(np.float16)


def _rint(x):
    import numpy as np

    return np.rint(x).astype(np.int32)


def make_qkx2(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool = False):
    """``make_qkx2_quants`` over blocks ``x (B, n)``: ``(scale (B,), the_min (B,) >= 0, codes (B, n))``; ``mad``:
    the error is weighted absolute (``use_mad``, q2_K), else weighted squared."""
    import numpy as np

    def error(diff):
        return np.abs(diff) if mad else diff ** 2

    f32 = np.float32
    mn = np.minimum(x.min(1), 0).astype(f32)
    mn0 = mn
    mx = x.max(1)
    flat = mx == mn
    span = np.where(flat, f32(1), mx - mn)
    sum_w = w.sum(1)
    sum_x = (w * x).sum(1)
    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * error(scale[:, None] * L + mn[:, None] - x)).sum(1)
    for step in range(nstep + 1):
        # ggml divides by max - min with the min of the best candidate so far (it updates `min` in the loop)
        iscale = (f32(rmin) + f32(rdelta) * step + nmax) / np.where(flat, f32(1), mx - mn)
        la = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax).astype(f32)
        sum_l, sum_l2, sum_xl = (w * la).sum(1), (w * la * la).sum(1), (w * la * x).sum(1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        this_min = np.where(pos, f32(0), this_min)
        err = (w * error(this_scale[:, None] * la + this_min[:, None] - x)).sum(1)
        better = ok & (err < best)
        L = np.where(better[:, None], la.astype(np.int32), L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale).astype(f32)
        mn = np.where(better, this_min, mn).astype(f32)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(f32), (-np.where(flat, mn0, mn)).astype(f32), L


def make_qx(x, nmax: int, w=None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)`` over blocks ``x (B, n)`` (weights ``w``, default
    ``x^2``): ``(scale (B,), codes + nmax)``."""
    import numpy as np

    f32 = np.float32
    idx = np.abs(x).argmax(1)
    mx = x[np.arange(x.shape[0]), idx]
    zero = np.abs(mx) < 1e-15
    mx = np.where(zero, f32(1), mx)
    w = x * x if w is None else w

    def fit(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(f32)
        return l, (w * x * lf).sum(1), (w * lf * lf).sum(1)

    L, sumlx, suml2 = fit(f32(-nmax) / mx)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, f32(1)), f32(0)).astype(f32)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sumlx, suml2 = fit(-(f32(nmax) + f32(0.1) * step) / mx)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = np.where(better[:, None], l, L)
        new_scale = sumlx / np.where(suml2 > 0, suml2, f32(1))
        scale = np.where(better, new_scale, scale).astype(f32)
        best = np.where(better, new_scale * sumlx, best)
    return np.where(zero, f32(0), scale), np.where(zero[:, None], 0, L + nmax)


def _pack_scale_min(ls, lm):
    """``(S, 8)`` 6-bit scales and mins -> ``(S, 12)`` bytes in the K-quant layout."""
    import numpy as np

    ls, lm = ls.astype(np.uint8), lm.astype(np.uint8)
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _k_scales(x, nmax: int, rmin: float, nstep: int):
    """Sub-block fit and 6-bit scales of q4_K / q5_K for super-blocks ``x (S, 256)``:
    ``(d, dmin fp16 (S,), scale bytes (S, 12), codes (S, 256))``."""
    import numpy as np

    f32 = np.float32
    S = x.shape[0]
    sub = x.reshape(S * 8, 32)
    av = np.sqrt((sub * sub).sum(1) / f32(32))
    w = av[:, None] + np.abs(sub)
    scales, mins, L = make_qkx2(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
    max_scale, max_min = scales.max(1), mins.max(1)
    inv_s = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_m = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(63, _rint(inv_s[:, None] * scales))
    lm = np.minimum(63, _rint(inv_m[:, None] * mins))
    d, dmin = _f16(max_scale / f32(63)), _f16(max_min / f32(63))
    dl = d.astype(f32)[:, None] * ls.astype(f32)
    dml = dmin.astype(f32)[:, None] * lm.astype(f32)
    q = np.clip(_rint((sub.reshape(S, 8, 32) + dml[..., None]) / np.where(dl == 0, f32(1), dl)[..., None]), 0, nmax)
    L = np.where((dl == 0)[..., None], L.reshape(S, 8, 32), q).reshape(S, QK_K)
    return d, dmin, _pack_scale_min(ls, lm), L


def quantize_q4_k(x):
    """float32 ``(rows, cols)``, cols a multiple of 256 -> uint8 ``(rows, cols / 256 * 144)``."""
    import numpy as np

    rows, cols = x.shape
    sb = x.astype(np.float32).reshape(-1, QK_K)
    d, dmin, sc, L = _k_scales(sb, 15, -1.0, 20)
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), sc, qs], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def quantize_q5_k(x):
    """float32 ``(rows, cols)``, cols a multiple of 256 -> uint8 ``(rows, cols / 256 * 176)``."""
    import numpy as np

    rows, cols = x.shape
    sb = x.astype(np.float32).reshape(-1, QK_K)
    d, dmin, sc, L = _k_scales(sb, 31, -0.5, 15)
    L = L.astype(np.uint8).reshape(-1, 4, 2, 32)  # (S, pair n/64, half, j)
    high = (L >> 4) & 1
    shifts = (2 * np.arange(4)).reshape(1, 4, 1, 1) + np.arange(2).reshape(1, 1, 2, 1)
    qh = (high << shifts.astype(np.uint8)).sum(axis=(1, 2)).astype(np.uint8)  # distinct bits: sum == or
    low = L & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), sc, qh, qs], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def quantize_q6_k(x):
    """float32 ``(rows, cols)``, cols a multiple of 256 -> uint8 ``(rows, cols / 256 * 210)``."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    sb = x.astype(f32).reshape(-1, QK_K)
    S = sb.shape[0]
    scales, L = make_qx(sb.reshape(S * 16, 16), 32)
    scales, L = scales.reshape(S, 16), L.reshape(S, 16, 16)
    pick = np.abs(scales).argmax(1)
    max_scale = scales[np.arange(S), pick]
    empty = np.abs(max_scale) < 1e-15
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d = _f16(np.where(empty, f32(0), f32(1) / iscale))
    sc = np.minimum(127, _rint(iscale[:, None] * scales))
    sc = np.where(empty[:, None], 0, sc)
    dl = d.astype(f32)[:, None] * sc.astype(f32)
    q = np.clip(_rint(sb.reshape(S, 16, 16) / np.where(dl == 0, f32(1), dl)[..., None]), -32, 31) + 32
    L = np.where((dl == 0)[..., None], L, q).reshape(S, 2, 4, 32).astype(np.uint8)  # (S, half, quarter, l)
    low, high = L & 0xF, L >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(S, 128), qh.reshape(S, 64), sc.astype(np.int8).view(np.uint8),
                          d.reshape(-1, 1).view(np.uint8)], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def _best_index(values, a):
    """``best_index_int8``: index of the table value nearest ``a`` (ties to the lower one)."""
    import numpy as np

    hi = np.clip(np.searchsorted(values, a, side="right"), 1, len(values) - 1)
    lo = hi - 1
    return np.where(a - values[lo] < values[hi] - a, lo, hi)


def quantize_iq4_nl(x, ntry: int = 7, qw=None):
    """float32 ``(rows, cols)``, cols a multiple of 32 -> uint8 ``(rows, cols / 32 * 18)``; with an importance
    ``qw (cols,)`` the weights are ``qw * sqrt(sigma2 + x^2)`` as in ``quantize_row_iq4_nl_impl``."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    b = x.astype(f32).reshape(-1, 32)
    B = b.shape[0]
    values = np.array(KVALUES_IQ4NL, dtype=f32)
    if qw is None:
        w = b * b
    else:
        sigma2 = (b * b).sum(1, keepdims=True) * f32(2.0 / 32)
        w = np.tile(np.asarray(qw, dtype=f32).reshape(-1, 32), (rows, 1)) * np.sqrt(sigma2 + b * b)
    idx = np.abs(b).argmax(1)
    mx = b[np.arange(B), idx]
    zero = np.abs(mx) < 1e-15
    mx = np.where(zero, f32(1), mx)

    def fit(inv):
        q = values[_best_index(values, inv[:, None] * b)]
        return (w * q * b).sum(1), (w * q * q).sum(1)

    d0 = (-mx / values[0]) if ntry > 0 else (mx / values[0])
    sumqx, sumq2 = fit(f32(1) / d0)
    d = np.where(sumq2 > 0, sumqx / np.where(sumq2 > 0, sumq2, f32(1)), f32(0)).astype(f32)
    best = d * sumqx
    for step in range(-ntry, ntry + 1):
        sumqx, sumq2 = fit((f32(step) + values[0]) / mx)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        new_d = sumqx / np.where(sumq2 > 0, sumq2, f32(1))
        d = np.where(better, new_d, d).astype(f32)
        best = np.where(better, new_d * sumqx, best)
    d = np.where(zero, f32(0), d)
    inv = np.where(d != 0, f32(1) / np.where(d != 0, d, f32(1)), f32(0))
    L = _best_index(values, inv[:, None] * b).astype(np.uint8)
    qs = L[:, :16] | (L[:, 16:] << 4)
    out = np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), qs], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))


def quantize_q4_0_weighted(x, qw):
    """``quantize_row_q4_0_impl`` with an importance ``qw (cols,)``: per 32-block, the scale of 19 candidates
    that minimizes ``sum qw * sqrt(sigma2 + x^2) * (x - d*q)^2`` (``sigma2``: the row's mean ``x^2``)."""
    import numpy as np

    f32 = np.float32
    rows, cols = x.shape
    x = x.astype(f32)
    sigma2 = (x * x).sum(1, keepdims=True) / f32(cols)
    w = (np.asarray(qw, dtype=f32).reshape(1, cols) * np.sqrt(sigma2 + x * x)).reshape(-1, 32)
    d, L = make_qx(x.reshape(-1, 32), 8, w)
    L = L.astype(np.uint8)
    qs = L[:, :16] | (L[:, 16:] << 4)
    out = np.concatenate([_f16(d).reshape(-1, 1).view(np.uint8), qs], axis=1)
    return np.ascontiguousarray(out.reshape(rows, -1))
