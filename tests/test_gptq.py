"""GPTQ and round-to-nearest on integer grids: the blocked GPTQ equals a textbook column-by-column version, and the
``quantize --method rtn|gptq`` step leaves every layer exactly on a grid the exporters read."""
import pytest
import torch

from gptopt_core.kit.grids import fake_quantize, fit_grid, fit_group, grid_of, on_grid
from gptopt_core.kit.modules import weight_matrix, weight_modules
from gptopt_core.kit.testing import make_context
from gptopt_quantize.gptq import gptq_quantize
from gptopt_quantize.step import QuantizeStep


def random_layer(rows=24, cols=64, n=400, seed=0, dead=(5,)):
    """A weight matrix and the Hessian 2/n X^T X of correlated inputs (some input channels never active)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols ** 0.5 + torch.eye(cols, dtype=torch.float64)
    X = torch.randn(n, cols, generator=g, dtype=torch.float64) @ mix
    X[:, list(dead)] = 0
    return W, 2 * X.t() @ X / n


def textbook_gptq(W, H, bits, group_size, symmetric, act_order, damp=0.01, observer="minmax", mask=None):
    """GPTQ as the paper states it: one column at a time, the OBS update of every remaining weight with the explicit
    inverse Hessian, which is then downdated (Gaussian elimination of the quantized column). No Cholesky, no lazy
    batches. With a ``mask``, SparseGPT's fixed-mask rule: a pruned weight is quantized to zero, its error
    compensated like any other; group scales are fitted on the kept weights."""
    W, H = W.clone(), H.clone()
    M = torch.ones_like(W) if mask is None else mask.to(W.dtype)
    W = W * M
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = group_size or cols
    scales = {}
    if act_order or group_size is None:
        for g in range(cols // gs):
            scales[g] = fit_group(W[:, g * gs:(g + 1) * gs], bits, symmetric, observer)
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = torch.argsort(torch.diag(H), descending=True).tolist() if act_order else range(cols)
    Q = torch.zeros_like(W)
    for c in order:
        g = c // gs
        if g not in scales:  # the group's first column: scale from the weights as updated so far
            scales[g] = fit_group((W * M)[:, g * gs:(g + 1) * gs], bits, symmetric, observer)
        q = fake_quantize(W[:, c], *scales[g], bits, symmetric) * M[:, c]
        Q[:, c] = q
        err = (W[:, c] - q) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return Q, scales


def two_four_mask(W):
    """2:4 along the inputs: the two largest magnitudes of every four kept."""
    groups = W.abs().reshape(W.shape[0], -1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
    return keep.reshape(W.shape)


@pytest.mark.parametrize("bits,group_size,symmetric,act_order,block", [
    (4, 16, True, False, 16), (4, 16, False, True, 32), (8, None, False, False, 128)])
def test_masked_gptq_equals_textbook_and_keeps_the_mask_exactly(bits, group_size, symmetric, act_order, block):
    W, H = random_layer()
    mask = two_four_mask(W)
    Q, grid, _ = gptq_quantize(W, H, bits, group_size, symmetric, act_order, 0.01, block_size=block, mask=mask)
    Q_ref, _ = textbook_gptq(W, H, bits, group_size, symmetric, act_order, mask=mask)
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=1e-9)
    assert not Q[~mask].any() and torch.equal(grid.dequantize(grid.codes(Q.float())), Q.float())
    # lower error on the pruned layer's output than rounding the pruned matrix to nearest
    W, H = (W * mask).float(), H.float()
    grid = fit_grid(W, bits, group_size, symmetric)
    R = grid.dequantize(grid.codes(W))
    err = lambda Qx: float(torch.trace((W - Qx) @ H @ (W - Qx).t()))  # noqa: E731
    assert err(Q.float()) < err(R), (err(Q.float()), err(R))


@pytest.mark.parametrize("bits,group_size,symmetric,act_order,block,observer", [
    (4, None, True, False, 128, "minmax"),   # per channel
    (4, 16, False, False, 16, "minmax"),     # asymmetric groups, lazy block = group
    (4, 8, True, False, 20, "minmax"),       # lazy block rounded to a multiple of the group (16)
    (4, 32, True, True, 16, "minmax"),       # act-order: static groups
    (8, None, True, True, 128, "minmax"),
    (4, 64, False, False, 16, "minmax"),     # group larger than the lazy block
    (4, 16, True, False, 16, "mse"),         # mse observer: group scales searched on the updated weights
    (4, 16, False, True, 32, "mse"),
])
def test_blocked_gptq_equals_textbook(bits, group_size, symmetric, act_order, block, observer):
    W, H = random_layer()
    Q, grid, info = gptq_quantize(W, H, bits, group_size, symmetric, act_order, 0.01, block_size=block,
                                  observer=observer)
    Q_ref, scales = textbook_gptq(W, H, bits, group_size, symmetric, act_order, observer=observer)
    torch.testing.assert_close(Q, Q_ref, rtol=0, atol=1e-9)
    for g, (s, z) in scales.items():
        assert torch.equal(grid.scale[:, g], s.float())
        if not symmetric:
            assert torch.equal(grid.zero[:, g], z)
    # Q is exactly on the grid it returns
    assert torch.equal(grid.dequantize(grid.codes(Q.float())), Q.float())
    assert info["loss"] > 0


def test_gptq_beats_round_to_nearest_on_the_layer_objective():
    W, H = random_layer(rows=32, cols=128, seed=3)
    W, H = W.float(), H.float()
    for bits, gs, sym in ((4, 32, True), (4, None, True), (4, 32, False)):
        Q, _, _ = gptq_quantize(W, H, bits, gs, sym)
        grid = fit_grid(W, bits, gs, sym)
        R = grid.dequantize(grid.codes(W))
        gptq_err = torch.trace((W - Q) @ H @ (W - Q).t())
        rtn_err = torch.trace((W - R) @ H @ (W - R).t())
        assert gptq_err < 0.8 * rtn_err, (bits, gs, sym, float(gptq_err), float(rtn_err))


@pytest.mark.parametrize("model", ["tiny-random-gpt2", "tiny-random-llama"])
def test_gptq_after_prune_keeps_every_mask_exactly(model):
    """prune 2:4, then GPTQ: the pruned weights stay exactly zero (GPT-2's Conv1D masks in its own orientation)."""
    from gptopt_core import Pipeline

    pipe = Pipeline(model=model, quiet=True, device="cpu")
    pipe.add("prune", method="wanda", pattern="2:4", calib_samples=4, calib_seq_len=32)
    pipe.add("quantize", method="gptq", bits=4, group_size="32", calib_blocks=4, calib_seq_len=32)
    res = pipe.run()
    masks = res.ctx.state["masks"]
    assert res.records[1]["metrics"]["masked_layers"] == len(masks) > 0
    for name, module in weight_modules(res.model):
        if name in masks:
            assert not module.weight[~masks[name]].any(), name  # (a kept weight may round to zero too)
            assert on_grid(module)


@pytest.mark.parametrize("model,method", [("tiny-random-gpt2", "gptq"), ("tiny-random-llama", "gptq"),
                                          ("tiny-random-gpt2", "rtn")])
def test_quantize_step_puts_every_layer_on_a_grid(model, method):
    ctx = make_context(model)
    kwargs = dict(calib_blocks=8, calib_seq_len=32, act_order=True) if method == "gptq" else {}
    step = QuantizeStep(method=method, bits=4, group_size=32, symmetric=False, **kwargs)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    names = [n for n, _ in weight_modules(ctx.model)]
    assert metrics["quantized_modules"] == len(names) and metrics["grid"] == "int4-g32-asym"
    assert set(ctx.state["quantized"]) == set(names)
    for name, module in weight_modules(ctx.model):
        grid = grid_of(module)
        assert grid is not None and on_grid(module) and grid.describe() == "int4-g32-asym"
        assert ctx.state["quantized"][name] == "int4-g32-asym"
        codes = grid.codes(weight_matrix(module))
        assert int(codes.min()) >= 0 and int(codes.max()) <= 15
    head = ctx.model.get_output_embeddings()
    assert grid_of(head) is None and grid_of(ctx.model.get_input_embeddings()) is None
    assert step.next_facts(set()) == {"quantized:grid"}
    if method == "gptq":
        assert metrics["engine"]["layers"] == len(names) and metrics["calib_tokens"] == 8 * 32


def test_gptq_step_lowers_the_output_error_against_rtn():
    """On the tiny Llama, the GPTQ-quantized model's logits stay closer to the dense model's than RTN's."""
    ref = make_context("tiny-random-llama")
    ids = ref.data.valid_ids[:256].unsqueeze(0)
    with torch.no_grad():
        dense = ref.model(input_ids=ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        ctx = make_context("tiny-random-llama")
        # the textbook column order: on random weights the Hessian diagonal carries no signal for act-order
        extra = dict(calib_blocks=16, calib_seq_len=64, act_order=False) if method == "gptq" else {}
        QuantizeStep(method=method, bits=4, group_size="channel", **extra).apply(ctx)
        with torch.no_grad():
            errors[method] = float((ctx.model(input_ids=ids).logits - dense).pow(2).mean())
    assert errors["gptq"] < 0.9 * errors["rtn"], errors


def test_grid_options_are_checked():
    from gptopt_core import ParamsError

    for kwargs, text in [
        (dict(method="gptq"), "give --bits 4 or --bits 8"),
        (dict(method="gptq", bits=4, quant_type="nf4"), "--quant-type applies to --method bnb"),
        (dict(method="rtn", bits=4, act_order=True), "--act-order applies to --method gptq only"),
        (dict(bits=4, group_size=64), "--group-size applies to --method rtn/gptq"),
        (dict(method="gptq", bits=4, group_size="sixty"), "group size must be a number"),
    ]:
        with pytest.raises(ParamsError, match=text):
            QuantizeStep(**kwargs)
    from gptopt_core import GroupSize

    assert QuantizeStep(method="rtn", bits=8, group_size="channel").params.grid_group_size == GroupSize(None)
    for given, size in [(None, 64), ("32", 32), (128, 128), ("per-channel", None)]:
        p = QuantizeStep(method="rtn", bits=4, group_size=given).params
        assert p.grid_group_size == GroupSize(size) and p.grid_group_size.columns(256) == (size or 256)
        assert p.model_dump(mode="json")["group_size"] == (None if given is None else size or "channel")


@pytest.mark.parametrize("spec", ["tiny-random-gpt2", "tiny-random-llama"])
def test_embeddings_8_put_embedding_and_head_on_int8_grids(spec):
    """--embeddings 8 with an integer-grid method: token embedding and head on int8 per-row grids (a tied head once)."""
    from gptopt_core.kit.metrics import model_bytes

    ctx = make_context(spec)
    before = model_bytes(ctx.model)
    step = QuantizeStep(method="rtn", bits=4, group_size=32, embeddings="8")
    metrics = step.apply(ctx)
    emb, head = ctx.model.get_input_embeddings(), ctx.model.get_output_embeddings()
    tied = emb.weight.data_ptr() == head.weight.data_ptr()
    assert grid_of(emb).describe() == "int8-channel-sym" and on_grid(emb)
    if tied:
        assert metrics["embeddings"] == [n for n, m in ctx.model.named_modules() if m is emb]
    else:
        assert grid_of(head).describe() == "int8-channel-sym" and on_grid(head) and len(metrics["embeddings"]) == 2
    assert all(ctx.state["quantized"][n] == "int8-channel-sym" for n in metrics["embeddings"])
    layer_only = QuantizeStep(method="rtn", bits=4, group_size=32)
    ctx2 = make_context(spec)
    layer_only.apply(ctx2)
    assert model_bytes(ctx.model) < model_bytes(ctx2.model) < before
