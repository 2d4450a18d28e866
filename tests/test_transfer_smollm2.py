"""SmolLM2-135M integration: Wanda 50% -> lora recovery -> merge -> save -> plain from_pretrained keeps 50%."""
import pytest


@pytest.mark.slow
def test_smollm2_wanda_lora_merge_keeps_exact_sparsity(tmp_path):
    from transformers import AutoModelForCausalLM

    from gptopt_core import Pipeline
    from gptopt_core.kit.metrics import sparsity

    out = tmp_path / "m"
    r = (Pipeline(model="smollm2-135m", quiet=True, device="cpu")
         .add("prune", method="wanda", sparsity=0.5, calib_samples=8, calib_seq_len=128)
         .add("lora", r=8, steps=2, batch_size=2, seq_len=128, lr=1e-3, merge=True)
         .add("save", to=str(out)).run())
    lora = r.records[1]["metrics"]
    assert lora["masked_sparsity_kept"] and lora["loss_last"] < 10
    assert 0.5 < lora["trainable_percent"] < 2.0  # r8 on all 7 projections of every block
    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert sparsity(plain) == pytest.approx(0.5, abs=1e-6)
    assert sparsity(plain) == pytest.approx(r.records[0]["metrics"]["sparsity"], abs=1e-12)
