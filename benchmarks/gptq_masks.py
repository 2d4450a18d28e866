"""GPTQ on a pruned layer: how the pruning mask is kept, on the layer objective ``tr((W - Q) H (W - Q)^T)``.

A random 64 x 128 layer with correlated inputs (``tests/test_gptq.py``'s ``random_layer``), a 2:4 mask (two largest
of every four inputs), int4 / int3 symmetric groups of 16, four seeds. Rows:

* ``gptopt``: ``gptq_quantize(..., mask=)``, SparseGPT's fixed-mask rule (pruned weights quantized to zero, their
  error compensated, every remaining weight updated);
* ``masked update``: llm-compressor's rule (``W_nz_mask``: the pruned weights are never updated), written out here;
* ``rtn``: round-to-nearest of the pruned matrix;
* ``no mask``: GPTQ ignoring the mask (better objective, but the pruned weights come back: non-zeros shown).

    python benchmarks/gptq_masks.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_gptq import random_layer, two_four_mask  # noqa: E402

from gptopt_quantize.gptq import gptq_quantize  # noqa: E402
from gptopt_core.kit.grids import fake_quantize, fit_grid, fit_group  # noqa: E402


def masked_update(W, H, bits, gs, M, damp=0.01):
    """llm-compressor's rule, column by column with the explicit inverse Hessian."""
    W, cols = (W * M).clone(), W.shape[1]
    Hinv = torch.linalg.inv(H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype))
    Q, scales = torch.zeros_like(W), {}
    for c in range(cols):
        g = c // gs
        if g not in scales:
            scales[g] = fit_group(W[:, g * gs:(g + 1) * gs], bits, True)
        Q[:, c] = fake_quantize(W[:, c], *scales[g], bits, True) * M[:, c]
        err = (W[:, c] - Q[:, c]) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :] * M
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return Q


def main():
    print("| seed | bits | gptopt | masked update | rtn | no mask (non-zeros) |\n|---|---|---|---|---|---|")
    for seed in range(4):
        W, H = random_layer(rows=64, cols=128, seed=seed, dead=())
        mask = two_four_mask(W)
        M = mask.to(W.dtype)
        Wm = W * M

        def err(Q):
            return float(torch.trace((Wm - Q) @ H @ (Wm - Q).t()))

        for bits in (4, 3):
            ours, _, _ = gptq_quantize(W, H, bits, 16, True, mask=mask)
            grid = fit_grid(Wm, bits, 16, True)
            free, _, _ = gptq_quantize(Wm, H, bits, 16, True)
            print(f"| {seed} | {bits} | {err(ours):.1f} | {err(masked_update(W, H, bits, 16, M)):.1f} | "
                  f"{err(grid.dequantize(grid.codes(Wm))):.1f} | {err(free):.1f} "
                  f"({int((free != 0).sum()) / free.numel():.1%}) |")


if __name__ == "__main__":
    main()
