"""The one OBS solver (``gptopt_core.kit.obs``): quantize's GPTQ and prune's SparseGPT are two rules on one column loop.

Equality with the textbook algorithms is in tests/test_gptq.py and tests/test_sparsegpt.py; here: the solver with
a plugin's own rule equals the textbook OBS loop, and the two built-in rules agree where they must (SparseGPT
with nothing to prune is GPTQ), to the last bit."""
import pytest
import torch

from gptopt_core import ColumnRule, GroupSize, obs_solve, prepare_obs
from gptopt_prune.sparsegpt import sparsegpt_prune
from gptopt_quantize.gptq import gptq_quantize
from test_gptq import random_layer


class HalfSteps(ColumnRule):
    """A rule a plugin could write: round every weight to a multiple of 0.5."""

    def column(self, W1, i, col):
        return torch.round(W1[:, i] * 2) / 2


def textbook_obs(W, H, rule, damp=0.01):
    """One column at a time with the explicit inverse Hessian, downdated after each column."""
    W, H = prepare_obs(W, H)
    cols = W.shape[1]
    Hinv = torch.linalg.inv(H + damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype))
    Q = torch.zeros_like(W)
    for c in range(cols):
        Q[:, c] = rule(W[:, c])
        err = (W[:, c] - Q[:, c]) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    return Q


@pytest.mark.parametrize("block", [1, 24, 128])
def test_obs_solve_with_a_plugin_rule_equals_the_textbook_loop(block):
    W, H = random_layer()
    Wp, Hp = prepare_obs(W, H)
    Q, loss, damp = obs_solve(Wp, Hp, HalfSteps(), 0.01, block)
    torch.testing.assert_close(Q, textbook_obs(W, H, lambda w: torch.round(w * 2) / 2), rtol=0, atol=1e-9)
    assert damp == 0.01 and loss > 0 and torch.equal(Q, torch.round(Q * 2) / 2)


@pytest.mark.parametrize("group_size,symmetric,block", [(16, True, 32), (32, False, 128), (None, True, 64),
                                                        ("channel", False, 128)])
def test_sparsegpt_with_nothing_to_prune_is_gptq_to_the_last_bit(group_size, symmetric, block):
    W, H = random_layer(cols=128, seed=3)
    pruned, keep, grid, info = sparsegpt_prune(W, H, 0.0, None, 4, group_size, symmetric, 0.01, block)
    Q, grid_q, info_q = gptq_quantize(W, H, 4, GroupSize.of(group_size), symmetric, False, 0.01, block)
    assert keep.all() and torch.equal(pruned, Q) and info["loss"] == info_q["loss"]
    assert torch.equal(grid.scale, grid_q.scale) and grid.describe() == grid_q.describe()
