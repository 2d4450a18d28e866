"""SparseGPT: the blocked implementation equals a textbook column-by-column version (unstructured, N:M, joint
quantization), and ``prune --method sparsegpt`` records masks (and grids) like the other methods."""
import pytest
import torch

from gptopt_core.kit.grids import fake_quantize, fit_group, grid_of, on_grid
from gptopt_core.kit.modules import weight_modules
from gptopt_core.kit.testing import make_context
from gptopt_prune import PruneStep
from gptopt_prune.sparsegpt import drop_lowest, lazy_block_size, sparsegpt_prune
from test_gptq import random_layer


def textbook_sparsegpt(W, H, sparsity, nm, bits, group_size, symmetric, B, damp=0.01):
    """SparseGPT as the paper's Algorithm 1 states it, one column at a time with the explicit inverse Hessian
    downdated after each column. The mask of a B-column block is chosen when the block starts, from
    saliency w_j^2 / [H_j^-1]_jj (H_j^-1: the inverse after eliminating the columns before j, which does not depend on
    the weights, so it is simulated ahead); N:M picks within every M columns when their first one is reached."""
    W, H = W.clone(), H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)

    def diag_ahead(Hinv, start, count):
        Hs, out = Hinv.clone(), []
        for j in range(start, start + count):
            out.append(Hs[j, j].clone())
            Hs = Hs - Hs[:, j:j + 1] @ Hs[j:j + 1, :] / Hs[j, j]
        return torch.stack(out)

    gs = group_size or cols
    scales = {}
    if bits and group_size is None:
        scales[0] = fit_group(W, bits, symmetric)
    pruned = torch.zeros(W.shape, dtype=torch.bool)
    for c in range(cols):
        if nm is None and c % B == 0:
            count = min(B, cols - c)
            d = diag_ahead(Hinv, c, count)
            pruned[:, c:c + count] = drop_lowest(W[:, c:c + count] ** 2 / d[None, :],
                                                 round(sparsity * rows * count))
        if nm is not None and c % nm[1] == 0:
            n, m = nm
            d = diag_ahead(Hinv, c, m)
            score = W[:, c:c + m] ** 2 / d[None, :]
            pruned[:, c:c + m].scatter_(1, score.topk(m - n, dim=1, largest=False).indices, True)
        if bits and (c // gs) not in scales:
            scales[c // gs] = fit_group(W[:, c:c + gs].masked_fill(pruned[:, c:c + gs], 0), bits, symmetric)
        q = W[:, c].masked_fill(pruned[:, c], 0)
        if bits:
            q = fake_quantize(q, *scales[c // gs], bits, symmetric)
        err = (W[:, c] - q) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        W[:, c] = q
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return W, ~pruned


@pytest.mark.parametrize("sparsity,nm,bits,group_size,symmetric,block", [
    (0.5, None, None, None, True, 16),
    (0.3, None, None, None, True, 128),
    (None, (2, 4), None, None, True, 16),
    (None, (1, 4), None, None, True, 24),
    (0.5, None, 4, 16, False, 16),    # joint quantization, asymmetric groups
    (None, (2, 4), 4, None, True, 16),  # 2:4 + per-channel 4-bit
    (None, (2, 4), 8, 32, True, 16),
])
def test_blocked_sparsegpt_equals_textbook(sparsity, nm, bits, group_size, symmetric, block):
    W, H = random_layer(seed=1)
    new, keep, grid, info = sparsegpt_prune(W, H, sparsity, nm, bits, group_size, symmetric, 0.01, block)
    B = lazy_block_size(W.shape[1], nm[1] if nm else None, group_size if bits else None, block)
    ref, ref_keep = textbook_sparsegpt(W, H, sparsity, nm, bits, group_size, symmetric, B)
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(new, ref, rtol=0, atol=1e-9)
    assert (new[~keep] == 0).all()
    if nm:
        assert (keep.reshape(W.shape[0], -1, nm[1]).sum(-1) == nm[0]).all()
    else:
        assert abs((~keep).float().mean().item() - sparsity) < 0.01
    if bits:
        assert torch.equal(grid.dequantize(grid.codes(new.float())), new.float())


def test_sparsegpt_beats_magnitude_and_wanda_on_the_layer_objective():
    W, H = random_layer(rows=32, cols=128, seed=4)
    new, keep, _, _ = sparsegpt_prune(W, H, 0.5)
    err = lambda Q: float(torch.trace((W - Q) @ H @ (W - Q).t()))  # noqa: E731
    norms = torch.sqrt(torch.diag(H))
    wanda_score = W.abs() * norms[None, :]
    wanda = W * ~drop_lowest(wanda_score, W.numel() // 2)
    magnitude = W * ~drop_lowest(W.abs(), W.numel() // 2)
    assert err(new) < 0.95 * err(wanda) < err(magnitude)


@pytest.mark.parametrize("model", ["tiny-random-gpt2", "tiny-random-llama"])
def test_prune_sparsegpt_step_records_masks_and_grids(model):
    ctx = make_context(model)
    step = PruneStep(method="sparsegpt", pattern="2:4", quantize_bits=4, group_size=32, calib_samples=8,
                     calib_seq_len=32)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    names = [n for n, _ in weight_modules(ctx.model)]
    assert set(ctx.state["masks"]) == set(names) and set(ctx.state["quantized"]) == set(names)
    for name, module in weight_modules(ctx.model):
        keep = ctx.state["masks"][name]
        assert keep.shape == module.weight.shape and (module.weight[~keep] == 0).all()
        view = keep.t() if type(module).__name__ == "Conv1D" else keep
        assert (view.reshape(view.shape[0], -1, 4).sum(-1) == 2).all()
        assert on_grid(module) and grid_of(module).describe() == "int4-g32-sym"
    assert metrics["engine"]["layers"] == len(names) and metrics["grid"] == "int4-g32-sym"
    assert step.next_facts(set()) == {"masks", "quantized:grid"}


def test_sparsegpt_options_are_checked():
    from gptopt_core import ParamsError

    for kwargs, text in [
        (dict(method="wanda", sparsity=0.5, quantize_bits=4), "applies to --method sparsegpt only"),
        (dict(method="sparsegpt", sparsity=0.5, group_size=32), "add --quantize-bits"),
        (dict(method="sparsegpt", sparsity=0.3, pattern="2:4"), "contradicts --pattern 2:4"),
        (dict(method="sparsegpt", sparsity=0.5, scope="global"), "--scope global does not apply"),
        (dict(method="sparsegpt", sparsity=0.5, quantize_bits=3), "4 or 8 bits"),
    ]:
        with pytest.raises(ParamsError, match=text):
            PruneStep(**kwargs)
