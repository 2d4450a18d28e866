from gptopt_core import Pipeline, grid_layers

GPTQ = {"calib_blocks": 2, "calib_seq_len": 32}


def scales(method, observer, **options):
    model = (Pipeline(model="tiny-random-llama", quiet=True)
             .add("quantize", method=method, bits=4, group_size=32, observer=observer, **options).run().model)
    return {name: grid.scale for name, _, grid in grid_layers(model)}


def test_clip99_narrows_rtn_scales_and_changes_gptq():
    full, clipped = scales("rtn", "minmax"), scales("rtn", "clip99")
    assert clipped.keys() == full.keys() and len(full) == 14
    assert all((clipped[n] <= full[n]).all() for n in full)  # a percentile never exceeds the maximum
    assert all((clipped[n] < full[n]).float().mean() > 0.9 for n in full)
    gptq_full, gptq_clipped = scales("gptq", "minmax", **GPTQ), scales("gptq", "clip99", **GPTQ)
    assert all(not gptq_clipped[n].equal(gptq_full[n]) for n in gptq_full)
