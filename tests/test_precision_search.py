"""gptopt_core's one swap-and-binary-search over module precisions (used by quantize --plan auto and cpu-fast's
guard): the search finds the smallest passing k with few measurements, swaps always restore the model."""
import pytest
import torch
import torch.nn as nn

from gptopt_core import calibration_nll, nll_with_modules, smallest_within, swapped_modules


@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_smallest_within_finds_the_first_passing_k_in_few_measurements(n):
    for first in range(n + 1):  # measure(k) falls below the limit from k == first on
        calls = []

        def measure(k):
            calls.append(k)
            return 0.0 if k >= first else 1.0

        k, values = smallest_within(measure, 0.5, 0, n)
        assert k == first
        assert len(calls) == len(set(calls)) <= 2 + n.bit_length()  # hi first, then a bisection
        assert calls[0] == n and set(values) == set(calls)


def test_smallest_within_none_when_even_the_top_fails_and_known_values_are_not_measured():
    calls = []
    assert smallest_within(lambda k: calls.append(k) or 1.0, 0.5, 0, 8) == (None, {8: 1.0})
    assert calls == [8]
    calls.clear()
    k, values = smallest_within(lambda k: calls.append(k) or (0.0 if k >= 3 else 1.0), 0.5, 0, 8,
                                known={0: 1.0, 8: 0.0})
    assert k == 3 and 0 not in calls and 8 not in calls and values[0] == 1.0


def test_swapped_modules_restores_in_order_also_after_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    originals = [model[0], model[1][0]]
    with pytest.raises(RuntimeError):
        with swapped_modules(model, {"0": nn.Identity(), "1.0": nn.Identity()}) as m:
            assert m is model and isinstance(model[0], nn.Identity) and isinstance(model[1][0], nn.Identity)
            raise RuntimeError("boom")
    assert [model[0], model[1][0]] == originals


def test_nll_with_modules_measures_the_swapped_model_and_restores_it():
    from gptopt_core.kit.testing import make_context

    ctx = make_context(model="tiny-random-llama")
    model, blocks = ctx.model, ctx.calibration_blocks(2, 32)
    head = model.lm_head
    zero = nn.Linear(head.in_features, head.out_features, bias=False)
    nn.init.zeros_(zero.weight)
    uniform = nll_with_modules(model, blocks, {"lm_head": zero})
    assert uniform == pytest.approx(torch.log(torch.tensor(float(head.out_features))).item(), rel=1e-5)
    assert model.lm_head is head and nll_with_modules(model, blocks, {}) == calibration_nll(model, blocks)
