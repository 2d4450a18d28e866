"""gptopt_core.kit.sensitivity as the quantize planner uses it: replaying cached blocks gives the full-forward result."""
import pytest

from gptopt_core.kit.sensitivity import module_sensitivity
from gptopt_core.kit.testing import make_context


@pytest.mark.parametrize("arch", ["tiny-random-gpt2", "tiny-random-llama"])
def test_block_cache_matches_full_forward(arch):
    from gptopt_quantize.convert import make_linear
    from gptopt_core.kit.modules import weight_modules

    ctx = make_context(model=arch)
    blocks = ctx.calibration_blocks(2, 64)
    s = {"int8_threshold": 6.0, "compute_dtype": "float32", "double_quant": True, "block_size": 64}
    names = [n for n, _ in weight_modules(ctx.model)][-3:] + [n for n, _ in weight_modules(ctx.model)][:2]
    names.append(next(n for n, m in ctx.model.named_modules() if m is ctx.model.get_output_embeddings()))
    reps = {n: (lambda m: make_linear(m, "nf4", s, ctx.device)) for n in names}
    fast = module_sensitivity(ctx.model, blocks, reps, use_cache=True)
    full = module_sensitivity(ctx.model, blocks, reps, use_cache=False)
    assert fast["base_nll"] == pytest.approx(full["base_nll"], abs=1e-6)
    for n in names:
        assert fast["delta_nll"][n] == pytest.approx(full["delta_nll"][n], abs=1e-5)
    assert any(abs(v) > 1e-6 for v in full["delta_nll"].values())
