"""Integer weight grids (gptopt_core.kit.grids): codes, de-quantization, attachment and their size."""
import pytest
import torch

from gptopt_core.kit.grids import (WeightGrid, attach_grid, fit_grid, grid_codes, grid_layers, grid_of, on_grid,
                               round_to_grid)
from gptopt_core.kit.metrics import model_bytes
from gptopt_core.kit.modules import weight_matrix, weight_modules


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, None, True), (4, None, False)])
def test_round_trip_codes_and_ranges(bits, group, sym):
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    grid = fit_grid(w, bits, group, sym)
    q = grid.codes(w)
    assert int(q.min()) >= grid.qmin and int(q.max()) <= grid.qmax
    deq = grid.dequantize(q)
    assert torch.equal(grid.codes(deq), q)  # de-quantized values are exactly on the grid
    step = grid.scale.repeat_interleave(group or 128, dim=1)
    # round to nearest; a symmetric grid clips its positive extreme (+7.5 steps -> 7) by half a step
    assert float(((deq - w).abs() / step).max()) <= (0.5 + 1e-3 if not sym else 0.55)
    assert torch.equal(grid.scale.half().float(), grid.scale)  # fp16-exact scales


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (8, None, True)])
def test_mse_observer_never_rounds_worse(bits, group, sym):
    """The mse observer keeps min-max where it is best and shrinks the range where clipping an extreme lowers the
    rounding error; its scales are fp16-exact and its codes in range, like min-max's."""
    from gptopt_core.kit.grids import MSE_NORM

    torch.manual_seed(1)
    w = torch.randn(32, 128) * 0.02
    w[0, 3] = 0.1  # an outlier
    mm, mse = fit_grid(w, bits, group, sym), fit_grid(w, bits, group, sym, observer="mse")

    def err(grid):
        size = group or 128
        d = (grid.dequantize(grid.codes(w)) - w).abs().pow(MSE_NORM)
        return d.reshape(32, -1, size).sum(-1)

    assert bool((err(mse) <= err(mm)).all())
    assert float(err(mse).sum()) < float(err(mm).sum())
    assert bool((mse.scale <= mm.scale).all()) and bool((mse.scale < mm.scale).any())  # ranges only shrink
    assert torch.equal(mse.scale.half().float(), mse.scale)
    q = mse.codes(w)
    assert int(q.min()) >= mse.qmin and int(q.max()) <= mse.qmax
    with pytest.raises(ValueError, match="observer"):
        fit_grid(w, bits, group, sym, observer="percentile")


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="576"):
        fit_grid(torch.randn(4, 576), 4, 128)


@pytest.mark.parametrize("spec", ["tiny-random-gpt2", "tiny-random-llama"])
def test_attach_checks_and_bytes_on_conv1d_and_linear(spec):
    from gptopt_core.kit.models import tiny_model

    model, _ = tiny_model(spec)
    before = model_bytes(model)
    name, layer = weight_modules(model)[0]
    grid = fit_grid(weight_matrix(layer), 4, 32, False)
    with pytest.raises(ValueError):
        attach_grid(layer, grid)  # the weight is not on the grid yet
    round_to_grid(layer, grid)
    assert on_grid(layer) and grid_of(layer) is grid
    assert [n for n, _, _ in grid_layers(model)] == [name]
    out_features, in_features = weight_matrix(layer).shape
    assert grid_codes(layer).shape == (out_features, in_features)
    saved = layer.weight.numel() * 4 - grid.stored_bytes(out_features, in_features)
    assert model_bytes(model) == before - saved
    with torch.no_grad():
        layer.weight.add_(1e-3)
    assert not on_grid(layer)


def test_stored_bytes():
    grid = WeightGrid(bits=4, group_size=64, symmetric=False, scale=torch.ones(8, 2),
                      zero=torch.zeros(8, 2, dtype=torch.int32))
    assert grid.stored_bytes(8, 128) == 8 * 128 // 2 + 16 * 2 + 8
    assert grid.describe() == "int4-g64-asym"


def test_gptopt_register_observers_adds_an_observer_rtn_and_gptq_use():
    """An observer a plugin registers decides the grid's range for fit_grid, quantize --method rtn and gptq; the
    built-ins are registered the same way; a taken name or a wrong shape is one clear error."""
    import types

    from gptopt_core import GptoptError, Observer, ParamsError, Pipeline, fit_grid, get_observer, hookimpl
    from gptopt_core.plugins import get_plugins
    from gptopt_core.kit.testing import register_plugin

    seen = []

    def half_range(groups, bits, symmetric, importance):
        seen.append(importance is not None)
        return groups.amin(dim=2) / 2, groups.amax(dim=2) / 2

    @hookimpl
    def gptopt_register_observers(register):
        register(Observer("half", half_range))
        register(Observer("half-weighted", half_range, importance=True))

    assert {n: get_observer(n).plugin for n in ("minmax", "mse", "hmse")} == dict.fromkeys(
        ("minmax", "mse", "hmse"), "gptopt-core")
    with register_plugin(types.SimpleNamespace(gptopt_register_observers=gptopt_register_observers), "test-half"):
        assert get_plugins().info["test-half"].observers == ["half", "half-weighted"]
        w = torch.randn(8, 64)
        full, half = fit_grid(w, 4, 32, True, "minmax"), fit_grid(w, 4, 32, True, "half")
        assert torch.allclose(half.scale, full.scale / 2, rtol=1e-3)  # fp16-exact halves of the full range
        rtn = Pipeline(model="tiny-random-llama", quiet=True).add("quantize", method="rtn", bits=4, observer="half")
        assert rtn.run().records[0]["metrics"]["observer"] == "half" and seen and not any(seen)
        seen.clear()
        Pipeline(model="tiny-random-llama", quiet=True).add("quantize", method="gptq", bits=4, calib_blocks=1,
                                                            calib_seq_len=16, observer="half-weighted").run()
        assert seen and all(seen)  # gptq hands the Hessian diagonal to an importance observer
        with pytest.raises(ParamsError, match="--observer half-weighted weights by the calibration Hessian"):
            Pipeline(model="tiny-random-llama").add("quantize", method="rtn", bits=4, observer="half-weighted")
        with pytest.raises(GptoptError, match="observer 'mse' is already registered by gptopt-core"):
            with register_plugin(types.SimpleNamespace(gptopt_register_observers=hookimpl(lambda register: register(
                    Observer("mse", half_range)))), "test-taken"):
                pass
    with pytest.raises(ParamsError, match="unknown observer 'half'; registered: hmse, minmax, mse"):
        Pipeline(model="tiny-random-llama").add("quantize", method="rtn", bits=4, observer="half")
    wrong = types.SimpleNamespace(gptopt_register_observers=hookimpl(
        lambda register: register(Observer("flat", lambda g, b, s, i: (g.amin(), g.amax())))))
    with register_plugin(wrong, "test-flat"):
        with pytest.raises(ValueError, match=r"observer 'flat' \(plugin test-flat\) returned ranges shaped \(\)"):
            fit_grid(torch.randn(8, 64), 4, 32, True, "flat")


def test_hmse_observer_is_gptq_only_and_weights_by_the_hessian():
    """hmse is refused by rtn, weights the rounding error by its importance (strictly better on the weighted
    columns), and gptq hands it the Hessian's diagonal. (It lived in test_export_ktypes.py, which skips without
    llama.cpp; it needs none.)"""
    from gptopt_core import ParamsError, fit_grid, grid_layers
    from gptopt_core.pipeline import Pipeline

    with pytest.raises(ParamsError, match="observer hmse weights by the calibration Hessian"):
        Pipeline(model="tiny-random-llama", quiet=True).add("quantize", method="rtn", bits=4, observer="hmse")
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    imp = torch.ones(32)
    imp[:4] = 1e6  # four columns that matter: their rounding error decides the scale
    plain, weighted = fit_grid(w, 4, 32, True, "mse"), fit_grid(w, 4, 32, True, "mse", importance=imp)

    def err(grid, cols=slice(0, 4)):
        return float(((grid.dequantize(grid.codes(w)) - w)[:, cols] ** 2).sum())

    # the importance is used: the four columns come out strictly better, the others pay for it
    assert err(weighted) < 0.9 * err(plain) and err(weighted, slice(4, None)) > err(plain, slice(4, None))
    assert torch.equal(fit_grid(w, 4, 32, True, "hmse", importance=imp).scale, weighted.scale)
    # and quantize --method gptq hands hmse the Hessian's diagonal: its grids differ from mse's on every layer
    gptq = {"method": "gptq", "bits": 4, "group_size": "32", "calib_blocks": 2, "calib_seq_len": 32}
    runs = {obs: {n: g.scale for n, _, g in grid_layers(Pipeline(model="tiny-random-llama", quiet=True).add(
        "quantize", observer=obs, **gptq).run().model)} for obs in ("mse", "hmse")}
    assert runs["mse"].keys() == runs["hmse"].keys() and len(runs["mse"]) == 14
    assert all(not runs["mse"][n].equal(runs["hmse"][n]) for n in runs["mse"])
