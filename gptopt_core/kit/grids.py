"""Integer weight grids: the one description of "this layer's weights are b-bit integers times a scale".

A quantizer that puts a layer's weights on an integer grid (round-to-nearest, GPTQ, SparseGPT's joint
quantization) keeps the layer a plain ``nn.Linear`` / ``Conv1D`` whose weight holds the *de-quantized* values
exactly, and attaches a :class:`WeightGrid` with :func:`attach_grid`. Everything that writes or measures the
model reads the grid back with :func:`grid_of` / :func:`grid_codes`, so the integers are never re-rounded:

* ``eval`` / ``bench`` run the de-quantized weights (same numbers a packed kernel would compute with);
* :func:`gptopt_core.kit.metrics.model_bytes` counts a grid layer's weight as its packed storage
  (:meth:`WeightGrid.stored_bytes`), which is what a serving format writes;
* savers and exporters (compressed-tensors, GGUF) write :func:`grid_codes` and the grid's scales.

Conventions (all tensors in the ``(out_features, in_features)`` orientation of ``nn.Linear``; GPT-2's
``Conv1D`` weight is transposed to it):

* ``group_size``: consecutive input columns sharing one scale; ``None`` = one group per output row
  (per-channel). It must divide ``in_features``.
* symmetric: codes are signed, ``q in [-2**(bits-1), 2**(bits-1) - 1]``, ``w = q * scale``.
* asymmetric: codes are unsigned, ``q in [0, 2**bits - 1]``, ``w = (q - zero) * scale`` with integer ``zero``
  in the same range.
* ``scale`` is float32 holding float16-representable values (formats store fp16 scales, so writing them is
  exact); shape ``(out_features, n_groups)``; ``zero`` is int32 of the same shape, or ``None`` when symmetric.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .groupsize import GroupSize, parse_group_size  # noqa: F401 (parse_group_size: public here)
from .modules import weight_matrix
from .observers import get_observer

GRID_ATTR = "gptopt_grid"


@dataclass
class WeightGrid:
    """One layer's integer grid; see the module docstring for the conventions."""

    bits: int
    group_size: Optional[int]
    symmetric: bool
    scale: Any  # torch.Tensor float32 [out, n_groups]
    zero: Any = None  # torch.Tensor int32 [out, n_groups] (asymmetric) or None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    def describe(self) -> str:
        """Short name such as ``int4-g64-asym`` or ``int8-channel-sym``."""
        group = f"g{self.group_size}" if self.group_size else "channel"
        return f"int{self.bits}-{group}-{'sym' if self.symmetric else 'asym'}"

    def _expand(self, t, in_features: int):
        size = self.group_size or in_features
        return t.repeat_interleave(size, dim=1)

    def codes(self, weight):
        """Integer codes (int32, ``(out, in)``) of ``weight`` (``(out, in)``) on this grid, round-to-nearest."""
        import torch

        w = weight.detach().float()
        scale = self._expand(self.scale.to(w.device), w.shape[1])
        q = torch.round(w / scale)
        if not self.symmetric:
            q = q + self._expand(self.zero.to(w.device), w.shape[1])
        return q.clamp_(self.qmin, self.qmax).to(torch.int32)

    def dequantize(self, codes):
        """float32 ``(out, in)`` weights of integer ``codes``."""
        q = codes.float()
        if not self.symmetric:
            q = q - self._expand(self.zero.to(q.device), q.shape[1]).float()
        return q * self._expand(self.scale.to(q.device), q.shape[1])

    def stored_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes of the packed codes plus fp16 scales (and packed zero points) for an ``out x in`` weight."""
        groups = self.scale.numel()
        total = (out_features * in_features * self.bits + 7) // 8 + groups * 2
        if not self.symmetric:
            total += (groups * self.bits + 7) // 8
        return int(total)


def check_group_size(in_features: int, group_size, name: str = "layer") -> None:
    """Raise ``ValueError`` naming the width when ``group_size`` (a :class:`~gptopt_core.GroupSize` or its older
    spellings) does not divide ``in_features``."""
    GroupSize.of(group_size).check(in_features, name)


#: the mse observer's search, as in the GPTQ reference quantizer (and compressed-tensors' ``mse`` observer): shrink
#: the min-max range by up to 80 % and keep, per group, the range whose rounding error has the smallest sum of
#: ``|w - q|^2.4``. The reference tries every 1 % step (80 roundings); here a coarse pass every 4 % is refined
#: per group by 1 % steps around its best (26 roundings; the minimum found is the same or within 1 % of range).
MSE_COARSE, MSE_FINE, MSE_MAX_SHRINK, MSE_NORM = 0.04, 0.01, 0.8, 2.4


def _scale_zero(lo, hi, bits: int, symmetric: bool):
    """fp16-exact scale (and int zero point) of the ranges ``[lo, hi]`` (``lo <= 0 <= hi``)."""
    import torch

    if symmetric:
        scale = torch.maximum(-lo, hi) / ((2 ** bits - 1) / 2)
    else:
        scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.half().float()  # fp16-representable: formats store fp16 scales exactly
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))  # fp16 underflow
    zero = None if symmetric else torch.round(-lo / scale).clamp(0, 2 ** bits - 1).to(torch.int32)
    return scale, zero


def _round_error(g, scale, zero, bits: int, symmetric: bool, buf, importance=None):
    """Per group ``sum |w - q|^MSE_NORM`` of ``g`` ``(out, groups, size)`` rounded to the grid (``buf``: scratch
    of ``g``'s shape), each column's term times ``importance`` ``(1, groups, size)`` when given."""
    import torch

    s = scale[..., None]
    torch.div(g, s, out=buf).round_()
    if symmetric:
        buf.clamp_(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        z = zero[..., None].float()
        buf.add_(z).clamp_(0, 2 ** bits - 1).sub_(z)
    err = buf.mul_(s).sub_(g).abs_().pow_(MSE_NORM)
    return (err if importance is None else err.mul_(importance)).sum(-1)


def _mse_search(g, lo, hi, bits: int, symmetric: bool, importance=None):
    """Per-group shrink factor of ``[lo, hi]`` with the lowest rounding error (coarse, then fine around each
    best), ``lo``'s shape."""
    import torch

    buf = torch.empty_like(g)
    best_p = torch.ones_like(lo)
    best = _round_error(g, *_scale_zero(lo, hi, bits, symmetric), bits, symmetric, buf, importance)

    def trial(p):
        nonlocal best, best_p
        s, z = _scale_zero(p * lo, p * hi, bits, symmetric)
        err = _round_error(g, s, z, bits, symmetric, buf, importance)
        better = err < best
        best = torch.where(better, err, best)
        best_p = torch.where(better, p, best_p)

    low = 1 - MSE_MAX_SHRINK
    for i in range(1, round(MSE_MAX_SHRINK / MSE_COARSE)):
        trial(torch.full_like(lo, 1 - i * MSE_COARSE))
    centre = best_p.clone()
    steps = round(MSE_COARSE / MSE_FINE)
    for k in range(1, steps):
        for sign in (1, -1):
            p = centre + sign * k * MSE_FINE
            trial(torch.where((p <= 1) & (p > low), p, centre))
    return best_p


def minmax_range(groups, bits: int, symmetric: bool, importance=None):
    """The ``minmax`` observer: each group's range as it is."""
    return groups.amin(dim=2), groups.amax(dim=2)


def mse_range(groups, bits: int, symmetric: bool, importance=None):
    """The ``mse`` / ``hmse`` observer: each group's range shrunk to where its rounding error is lowest (see
    ``MSE_COARSE``), each column's error weighted by ``importance`` when given (``hmse``)."""
    lo, hi = groups.amin(dim=2).clamp(max=0), groups.amax(dim=2).clamp(min=0)
    p = _mse_search(groups, lo, hi, bits, symmetric, importance)
    return p * lo, p * hi


def fit_grid(weight, bits: int, group_size=None, symmetric: bool = True,
             observer: str = "minmax", importance=None) -> WeightGrid:
    """Scales for ``weight`` (``(out, in)``): the round-to-nearest grid, ``group_size`` a
    :class:`~gptopt_core.GroupSize` (or an int; ``None`` / ``"channel"``: per channel).

    Symmetric: ``scale = max|w| / ((2**bits - 1) / 2)`` per group (as GPTQ and compressed-tensors do).
    Asymmetric: the group's range, widened to include 0, split into ``2**bits - 1`` steps.
    ``observer`` names a registered :class:`gptopt_core.Observer` that picks each group's range:
    ``"minmax"`` takes it as it is; ``"mse"`` shrinks it per group where clipping the extremes lowers the rounding
    error (see ``MSE_COARSE``), as the ``mse`` observers of the GPTQ reference code and llm-compressor do;
    ``"hmse"`` is mse with ``importance``; a plugin adds more (``gptopt_register_observers``). ``importance``
    ``(in,)``: weight each input column's rounding error by it, e.g. the calibration Hessian's diagonal (the mean
    squared activation, llama.cpp's imatrix); ``minmax`` ignores it.
    """
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = GroupSize.of(group_size)
    groups.check(in_features)
    size = groups.columns(in_features)
    g = w.reshape(out_features, in_features // size, size)
    obs = get_observer(observer)
    imp = None if importance is None else importance.detach().float().reshape(1, in_features // size, size)
    lo, hi = obs.fit(g, bits, symmetric, imp)
    if getattr(lo, "shape", None) != g.shape[:2] or getattr(hi, "shape", None) != g.shape[:2]:
        raise ValueError(f"observer '{observer}' (plugin {obs.plugin}) returned ranges shaped "
                         f"{tuple(getattr(lo, 'shape', ()))}, not (out_features, n_groups) = {tuple(g.shape[:2])}")
    scale, zero = _scale_zero(lo.float().clamp(max=0), hi.float().clamp(min=0), bits, symmetric)
    return WeightGrid(bits=bits, group_size=groups.grid_size, symmetric=symmetric, scale=scale, zero=zero)


def attach_grid(module, grid: WeightGrid, check: bool = True) -> None:
    """Mark ``module`` as holding ``grid``; its weight must already hold the de-quantized values.

    With ``check``, raise ``ValueError`` when the weight is not exactly on the grid.
    """
    if check and not on_grid(module, grid):
        raise ValueError("the layer's weight is not on the grid it is attached to")
    setattr(module, GRID_ATTR, grid)


def grid_of(module) -> Optional[WeightGrid]:
    """The :class:`WeightGrid` attached to ``module``, or ``None``."""
    return getattr(module, GRID_ATTR, None)


def detach_grid(module) -> None:
    """Forget ``module``'s grid (e.g. after a merge changed its weight)."""
    if hasattr(module, GRID_ATTR):
        delattr(module, GRID_ATTR)


def grid_codes(module):
    """The integer codes of a grid layer's weight, ``(out, in)`` int32 (``Conv1D`` transposed)."""
    grid = grid_of(module)
    if grid is None:
        raise ValueError("the layer has no integer grid")
    return grid.codes(weight_matrix(module))


def on_grid(module, grid: Optional[WeightGrid] = None) -> bool:
    """Whether the layer's weight equals the de-quantization of its codes (it was not changed since)."""
    grid = grid or grid_of(module)
    if grid is None:
        return False
    w = weight_matrix(module).detach().float()
    return bool((grid.dequantize(grid.codes(w)) == w).all())


def grid_layers(model):
    """``[(qualified_name, module, grid)]`` of every layer carrying a grid, in model order."""
    return [(name, m, grid_of(m)) for name, m in model.named_modules() if grid_of(m) is not None]


def round_to_grid(module, grid: WeightGrid) -> None:
    """Round ``module``'s weight to ``grid`` in place (round-to-nearest) and attach the grid."""
    import torch

    with torch.no_grad():
        view = weight_matrix(module)
        view.copy_(grid.dequantize(grid.codes(view)).to(view.dtype))
    attach_grid(module, grid, check=False)


# -- helpers for quantizers that fit a grid group by group (GPTQ, SparseGPT's joint quantization) -----------------
def fit_group(columns, bits: int, symmetric: bool = True, observer: str = "minmax", importance=None):
    """``(scale, zero)`` of one group: ``columns`` is ``(out, k)``, the group's input columns (``importance``
    ``(k,)``: see :func:`fit_grid`).

    The same numbers :func:`fit_grid` gives that group (``scale`` float32, fp16-exact; ``zero`` int32 or ``None``),
    each shaped ``(out,)``; assemble a layer's groups with :func:`grid_from_groups`.
    """
    g = fit_grid(columns, bits, None, symmetric, observer, importance)
    return g.scale[:, 0], (g.zero[:, 0] if g.zero is not None else None)


def fake_quantize(w, scale, zero, bits: int, symmetric: bool = True):
    """Round ``w`` (``(out,)`` or ``(out, k)``) to the grid of one group (``scale`` / ``zero`` shaped ``(out,)``) and
    return the de-quantized values in ``w``'s dtype: exactly what :meth:`WeightGrid.dequantize` of
    :meth:`WeightGrid.codes` gives for those weights."""
    import torch

    s = scale.to(w.device, w.dtype)
    if w.dim() == 2:
        s = s[:, None]
    q = torch.round(w / s)
    if symmetric:
        q = q.clamp(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    else:
        z = zero.to(w.device, w.dtype)
        if w.dim() == 2:
            z = z[:, None]
        q = (q + z).clamp(0, 2 ** bits - 1) - z
    return q * s


def grid_from_groups(bits: int, group_size, symmetric: bool, scales, zeros=None) -> WeightGrid:
    """A :class:`WeightGrid` from per-group ``(out,)`` scales (and zero points), in input-column order;
    ``group_size``: a :class:`~gptopt_core.GroupSize` (or an int, ``None`` per channel)."""
    import torch

    scale = torch.stack([s.float() for s in scales], dim=1)
    zero = None if symmetric else torch.stack([z.to(torch.int32) for z in zeros], dim=1)
    return WeightGrid(bits=bits, group_size=GroupSize.of(group_size).grid_size, symmetric=symmetric, scale=scale,
                      zero=zero)
