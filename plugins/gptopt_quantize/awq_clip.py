"""``quantize --awq --awq-clip``: AWQ's per-group weight clipping (``llm-awq`` ``auto_clip.py``), on the scaled weights.

Per output row and group of ``group_size`` input columns, the weights are clamped to ``[-m, m]`` with
``m = max|w_g| * (1 - i / 20)``, ``i = 0 .. 9`` (shrinking the range by up to 45 %), and the ``m`` whose rounded
group gives the lowest output error is kept:

    error(row, g) = d H_gg d^T,   d = Q(clamp(w_g, -m, m)) - w_g,   H_gg: the group's block of E[x x^T]

(each group's share of the row's output error, as the reference measures it on the group's partial outputs; the
terms between groups are left out, as there). ``Q`` is round-to-nearest on the step's grid. The query and key
projections are not clipped (nor fused projections that hold them), as in the reference: attention scores are
sensitive to them. Unlike the scales, clipping changes the float model: that is its point.
"""
from __future__ import annotations

from gptopt_core.kit.groupsize import GroupSize

CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5
#: leaf names the reference leaves unclipped (query / key, and fused projections holding them)
NOT_CLIPPED = ("q_proj", "k_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv")


def clipped_name(name: str) -> bool:
    """Whether the layer ``name`` (qualified) is clipped."""
    return name.rsplit(".", 1)[-1] not in NOT_CLIPPED


def _rounded(W, spec):
    from gptopt_core.kit.grids import fit_grid

    bits, gs, symmetric, observer = spec
    grid = fit_grid(W, bits, gs, symmetric, observer)
    return grid.dequantize(grid.codes(W))


def layer_error(W, Q, H) -> float:
    """``tr(D H D^T)``, ``D = Q - W``: the layer's mean squared output error (summed over outputs)."""
    D = Q - W
    return float(((D @ H) * D).sum())


def clip_search(W, H, spec):
    """The clipped weights ``(out, in)`` of ``W`` (float) given ``H = E[x x^T]`` of its input; returns
    ``(clipped W, error before, error after)`` (errors of round-to-nearest, :func:`layer_error`)."""
    import torch

    bits, gs, symmetric, observer = spec
    out, cols = W.shape
    size = GroupSize.of(gs).columns(cols)
    G = cols // size
    blocks = torch.stack([H[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(G)])
    w = W.reshape(out, G, size)
    org_max = w.abs().amax(-1, keepdim=True)
    best_max, best_err = org_max.clone(), None
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        m = org_max * (1 - i / CLIP_GRID)
        cur = torch.maximum(torch.minimum(w, m), -m).reshape(out, cols)
        d = (_rounded(cur, spec) - W).reshape(out, G, size)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better[..., None], m, best_max)
    clipped = torch.maximum(torch.minimum(w, best_max), -best_max).reshape(out, cols)
    return clipped, layer_error(W, _rounded(W, spec), H), layer_error(W, _rounded(clipped, spec), H)
