"""l1 on the real SmolLM2-135M (Llama, tied embeddings): the prunable half reaches zero, the head is untouched."""
import pytest
import torch

from gptopt_core import Pipeline


@pytest.mark.slow
def test_l1_prunable_on_smollm2_zeroes_the_half_a_magnitude_prune_removes():
    res = (Pipeline(model="smollm2-135m", data="builtin:pydoc", seed=0, device="cpu", quiet=True)
           .add("l1", weight=4000.0, targets=["*mlp*"])
           .add("finetune", steps=2, batch_size=1, seq_len=32, warmup_steps=0, lr=1e-4)
           .add("prune", method="magnitude", sparsity=0.5, include=["*mlp*"])
           .run())
    ft = next(r for r in res.records if r["name"] == "finetune")["metrics"]
    assert ft["l1_select"] == "prunable" and ft["l1_mode_used"] == "proximal"
    assert ft["l1_layers_regularized"] == 3 * 30
    # threshold 4000·1e-4 = 0.4 at step 1 (no warmup) > every |w| of the lower half: that half is exactly zero
    assert ft["l1_selected_zero_fraction"] >= 0.99
    assert 0.49 < ft["l1_zero_fraction"] <= 0.5 + 1e-6  # ... and the kept half is not shrunk to zero
    model = res.model
    mlp = [m.weight for n, m in model.named_modules() if n.endswith("mlp.up_proj")]
    assert all(float((w == 0).float().mean()) == pytest.approx(0.5, abs=1e-3) for w in mlp)  # after the prune
    assert torch.isfinite(model.get_output_embeddings().weight).all()
