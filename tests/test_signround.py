"""quantize --method signround: SignRound / AutoRound's block-wise rounding optimization on the layer-wise engine.
Iteration 0 is round-to-nearest exactly; tuning never ends above it and lowers it on a case; the result is exactly
on the grid the exporters write (symmetric q4_0 / q8_0-style, asymmetric q4_1-style, per channel)."""
import pytest
import torch

from gptopt_core import grid_of, make_context, on_grid, weight_matrix, weight_modules
from gptopt_quantize.step import QuantizeStep

#: 8 calibration blocks = one micro-batch: every step is measured on all of them, so "best step kept" is exact
CALIB = dict(calib_blocks=8, calib_seq_len=32)


@pytest.mark.parametrize("bits,symmetric,group", [(4, True, 32), (4, False, 32), (8, True, "channel")])
def test_iteration_zero_is_round_to_nearest(bits, symmetric, group):
    weights = {}
    for method, extra in (("rtn", {}), ("signround", dict(iters=0, **CALIB))):
        ctx = make_context("tiny-random-llama")
        QuantizeStep(method=method, bits=bits, group_size=group, symmetric=symmetric, **extra).apply(ctx)
        weights[method] = {n: weight_matrix(m).detach().clone() for n, m in weight_modules(ctx.model)}
    for name, w in weights["rtn"].items():
        assert torch.equal(w, weights["signround"][name]), name


@pytest.mark.parametrize("symmetric", [True, False])
def test_tuning_lowers_the_block_error_and_stays_on_the_grid(symmetric):
    ctx = make_context("tiny-random-llama")
    step = QuantizeStep(method="signround", bits=4, group_size=32, symmetric=symmetric, iters=30, **CALIB)
    step.preflight(ctx)
    metrics = step.apply(ctx)
    assert metrics["block_loss"] <= metrics["block_loss_rtn"]
    assert metrics["block_loss"] < 0.98 * metrics["block_loss_rtn"] and metrics["blocks_improved"] >= 1, metrics
    kind = f"int4-g32-{'sym' if symmetric else 'asym'}"
    assert metrics["grid"] == kind and metrics["iters"] == 30 and metrics["lr"] == pytest.approx(1 / 30)
    for name, module in weight_modules(ctx.model):
        grid = grid_of(module)
        assert grid is not None and grid.describe() == kind and on_grid(module), name
        assert torch.equal(grid.scale, grid.scale.half().float())  # fp16 scales, as GGUF blocks store them
        assert isinstance(module.weight, torch.nn.Parameter) and "weight" in module._parameters


def test_signround_options_are_checked():
    from gptopt_core import ParamsError

    for bad, msg in ((dict(method="signround", bits=4, act_order=True), "does not apply to --method signround"),
                     (dict(method="signround", bits=4, observer="mse"), "does not apply to --method signround"),
                     (dict(method="gptq", bits=4, iters=10), "applies to --method signround only"),
                     (dict(method="bnb", bits=4, lr=0.1), "not bitsandbytes")):
        with pytest.raises(ParamsError, match=msg):
            QuantizeStep.validate(bad)
