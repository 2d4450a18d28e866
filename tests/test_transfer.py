"""The lora and finetune steps (plugin gptopt-transfer) on tiny GPT-2 and tiny Llama, through the real CLI and
the Python API."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from gptopt_core import GptoptError, ParamsError, Pipeline, PlanError
from conftest import error_lines

TRAIN = ["--steps", "2", "--seq-len", "32", "--batch-size", "2"]
EV = ["--max-tokens", "600", "--block-size", "128"]
FAST = dict(steps=2, seq_len=32, batch_size=2)


def ppl(model, n=600):
    from gptopt_core.kit.data import TextData
    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.models import byte_tokenizer

    data = TextData.load("builtin:pydoc", byte_tokenizer())
    return perplexity(model, data.valid_ids, 128, 128, n)["perplexity"]


@pytest.mark.parametrize("model", ["tiny-random-gpt2", "tiny-random-llama"])
def test_lora_adapter_save_and_plain_peft_reload(cli, tmp_path, model):
    out = tmp_path / "m"
    r = cli("run", "-q", "--model", model, "--out", tmp_path / "run", "lora", *TRAIN, "--r", "4", "--alpha", "8",
            "--eval-every", "1", "--eval-tokens", "300", "eval", *EV, "save", "--to", out)
    assert r.returncode == 0, r.stderr
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    lora, ev = run["steps"][0], run["steps"][1]
    assert "adapter" in lora["facts"] and lora["metrics"]["train_steps"] == 2
    assert 0 < lora["metrics"]["train_cpu_seconds"] and 0 < lora["metrics"]["train_seconds"]
    assert 0 < lora["metrics"]["trainable_percent"] < 50 and len(lora["metrics"]["eval_history"]) == 2
    assert lora["metrics"]["lora_targets"] == (8 if model.endswith("gpt2") else 14)
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(out))
    assert not any("lora" in k for k in base.state_dict())
    reloaded = PeftModel.from_pretrained(base, str(out / "adapter"))
    assert ppl(reloaded) == pytest.approx(ev["metrics"]["perplexity"], rel=1e-5)
    # gptopt loads the saved directory with its adapter
    r2 = cli("run", "-q", "--model", out, "--out", tmp_path / "run2", "eval", *EV)
    assert r2.returncode == 0, r2.stderr
    again = json.loads((tmp_path / "run2" / "run.json").read_text())["steps"][0]["metrics"]["perplexity"]
    assert again == pytest.approx(ev["metrics"]["perplexity"], rel=1e-5)


@pytest.mark.parametrize("model", ["tiny-random-gpt2", "tiny-random-llama"])
def test_prune_then_finetune_and_lora_merge_keep_sparsity_exact(tmp_path, model):
    out = tmp_path / "m"
    r = (Pipeline(model=model, quiet=True, device="cpu")
         .add("prune", method="wanda", sparsity=0.5, calib_samples=4, calib_seq_len=32)
         .add("finetune", weight_decay=0.1, lr=1e-3, **FAST)
         .add("lora", merge=True, target_modules=["*attn*"], dropout=0.0, lr=1e-2, **FAST)
         .add("save", to=str(out)).run())
    masks = r.ctx.state["masks"]
    prune, ft, lora = r.records[0], r.records[1], r.records[2]
    assert ft["metrics"]["masked_sparsity_kept"] and lora["metrics"]["masked_sparsity_kept"]
    assert "adapter" not in lora["facts"] and "trains" not in lora["facts"]
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.metrics import sparsity

    plain = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(plain).__module__.startswith("transformers")
    assert sparsity(plain) == pytest.approx(prune["metrics"]["sparsity"], abs=1e-9)
    modules = dict(plain.named_modules())
    changed = 0
    for name, keep in masks.items():
        w = modules[name].weight
        assert (w[~keep] == 0).all()
        changed += int("attn" in name)
    assert changed > 0


@pytest.mark.parametrize("model", ["tiny-random-gpt2", "tiny-random-llama"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_merge_on_pruned_model_saves_the_model_it_trained(tmp_path, model, dropout):
    """With masks, the adapters train the masked update (M * s*B@A): the merged, re-masked model is the one the
    training step evaluated last. PEFT's dense update would be cut by the merge's mask (checked: it differs)."""
    def chain(masked):
        return (Pipeline(model=model, quiet=True, device="cpu", seed=0)
                .add("prune", method="magnitude", sparsity=0.5)
                .add("lora", merge=True, dropout=dropout, lr=5e-2, masked_update=masked, eval_every=3,
                     eval_tokens=300, **FAST)
                .add("eval", max_tokens=300, block_size=299).run())

    for masked in (True, False):
        r = chain(masked)
        lora, ev = r.records[1], r.records[2]
        trained = lora["metrics"]["eval_history"][-1]["perplexity"]
        merged = ev["metrics"]["perplexity"]
        assert lora["metrics"]["masked_sparsity_kept"]
        if masked:
            assert lora["metrics"]["lora_masked_layers"] == lora["metrics"]["lora_targets"]
            assert merged == pytest.approx(trained, rel=1e-4)
        else:
            assert lora["metrics"]["lora_masked_layers"] == 0
            assert abs(merged / trained - 1) > 1e-3


def test_qlora_on_4bit_base_saves_and_reloads_same_ppl(cli, tmp_path):
    out = tmp_path / "q"
    r = cli("run", "-q", "--model", "tiny-random-llama", "--out", tmp_path / "run", "quantize", "--bits", "4",
            "lora", *TRAIN, "eval", *EV, "save", "--to", out)
    assert r.returncode == 0, r.stderr
    steps = json.loads((tmp_path / "run" / "run.json").read_text())["steps"]
    assert steps[1]["metrics"]["qlora"] is True
    before = steps[2]["metrics"]["perplexity"]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(out))
    assert getattr(base, "is_loaded_in_4bit", False) or "4bit" in str(base.config.quantization_config)
    assert ppl(PeftModel.from_pretrained(base, str(out / "adapter"))) == pytest.approx(before, rel=1e-4)


def test_lora_on_8bit_base_trains():
    r = (Pipeline(model="tiny-random-gpt2", quiet=True, device="cpu").add("quantize", bits=8)
         .add("lora", **FAST).run())
    m = r.records[1]["metrics"]
    assert m["qlora"] and len(m["loss_history"]) == 2 and all(map(lambda x: x == x, m["loss_history"]))


def test_distillation_adds_a_kl_term_against_the_loaded_model():
    r = (Pipeline(model="tiny-random-llama", quiet=True, device="cpu")
         .add("prune", method="magnitude", sparsity=0.6)
         .add("lora", distill_from="original", distill_weight=2.0, temperature=1.5, **FAST).run())
    m = r.records[1]["metrics"]
    kl = [a - b for a, b in zip(m["loss_history"], m["ce_history"])]
    assert all(k > 0 for k in kl)  # the pruned student differs from the dense teacher
    assert "distill" not in r.ctx.state
    plain = Pipeline(model="tiny-random-llama", quiet=True, device="cpu").add("lora", **FAST).run()
    assert "ce_history" not in plain.records[0]["metrics"]


def test_multi_process_matches_single_process_at_equal_global_batch(tmp_path):
    """accelerate launch, 2 CPU processes (gloo) x batch 2 vs 1 process x batch 4: same loss curve."""
    gptopt = shutil.which("gptopt", path=os.path.dirname(sys.executable))
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    common = ["run", "-q", "--model", "tiny-random-llama", "--out"]
    lora = ["lora", "--steps", "3", "--seq-len", "32", "--dropout", "0"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                            "--mixed_precision", "no", "--dynamo_backend", "no", gptopt, *common, tmp_path / "mp",
                            *lora, "--batch-size", "2", "save", "--to", tmp_path / "saved"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-2000:]
    single = subprocess.run([gptopt, *common, tmp_path / "sp", *lora, "--batch-size", "4"], capture_output=True,
                            text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr
    mp = json.loads((tmp_path / "mp" / "run.json").read_text())["steps"][0]["metrics"]
    sp = json.loads((tmp_path / "sp" / "run.json").read_text())["steps"][0]["metrics"]
    assert mp["num_processes"] == 2 and sp["num_processes"] == 1
    assert mp["global_batch_blocks"] == sp["global_batch_blocks"] == 4
    assert mp["loss_history"] == pytest.approx(sp["loss_history"], abs=1e-3)
    assert (tmp_path / "saved" / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["lora", "--r", "0"], "r: Input should be greater than or equal to 1"),
    (["lora", "--steps", "0"], "steps: Input should be greater than or equal to 1"),
    (["finetune", "--steps", "2", "--epochs", "1"], "not both"),
    (["lora", "--target-modules", "*nothing_here*"], "matched no linear layer"),
    (["quantize", "--bits", "4", "finetune"], "cannot run after quantize"),
    (["lora", "lora"], "already carries an unmerged LoRA adapter"),
    (["lora", "--seq-len", "100000"], "longer than the model's 1024 positions"),
    (["lora", "--seq-len", "1000"], "no train data"),
    (["lora", "--temperature", "2"], "need --distill-from original"),
])
def test_bad_input_is_one_line_exit_2(cli, tmp_path, args, needle):
    extra = ["--data", tmp_path / "tiny.txt"] if "--seq-len" in args else []
    (tmp_path / "tiny.txt").write_text("hello world, a short text. " * 20)  # 540 tokens
    r = cli("run", "--model", "tiny-random-gpt2", *extra, *args)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], r.stderr


def test_plan_errors_in_python():
    with pytest.raises(ParamsError, match="dropout"):
        Pipeline(model="tiny-random-gpt2").add("lora", dropout=1.0)
    with pytest.raises(ParamsError, match="auto"):
        Pipeline(model="tiny-random-gpt2").add("lora", target_modules=["auto", "c_fc"])
    pipe = (Pipeline(model="tiny-random-gpt2").add("prune", sparsity=0.5).add("quantize", bits=4)
            .add("lora", merge=True))
    with pytest.raises(PlanError, match="before quantize"):
        pipe.validate()


def test_glob_targets_and_epochs_on_gpt2():
    r = (Pipeline(model="tiny-random-gpt2", quiet=True, device="cpu")
         .add("lora", target_modules=["*mlp.c_fc"], epochs=0.01, seq_len=32, batch_size=4).run())
    m = r.records[0]["metrics"]
    assert m["lora_targets"] == 2 and m["train_steps"] >= 1
    names = [n for n, _ in r.model.named_modules() if n.endswith("lora_A")]
    assert names and all("mlp.c_fc" in n for n in names)
