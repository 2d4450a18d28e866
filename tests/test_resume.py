"""Training checkpoints and --resume: a run killed mid-training continues to the same result."""
import json
import os
import signal
import subprocess
import time

import pytest
from conftest import error_lines, gptopt_exe, run_gptopt

from gptopt_core import Pipeline, hookimpl
from gptopt_core.plugins import get_plugins

ARGS = ["--model", "tiny-random-llama", "--seed", "3", "--device", "cpu"]
LORA = ["lora", "--steps", "40", "--batch-size", "2", "--seq-len", "64", "--checkpoint-every", "5", "eval"]


def manifest(out):
    return json.loads((out / "run.json").read_text())


def test_kill_9_during_lora_then_resume_ends_with_the_same_ppl(tmp_path):
    whole = run_gptopt("run", *ARGS, "--out", tmp_path / "whole", *LORA)
    assert whole.returncode == 0, whole.stderr

    cut = tmp_path / "cut"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([gptopt_exe(), "run", *ARGS, "--out", str(cut), *LORA], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cut / "checkpoints" / "step01-lora"
    deadline = time.time() + 300
    while not (ckpt / "00000015").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    assert not (cut / "run.json").exists()
    killed_at = max(int(d.name) for d in ckpt.iterdir() if d.name.isdigit())
    assert 15 <= killed_at < 40

    resumed = run_gptopt("run", *ARGS, "--out", cut, "--resume", *LORA)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {killed_at}" in resumed.stderr
    a, b = manifest(tmp_path / "whole"), manifest(cut)
    assert b["steps"][1]["metrics"]["perplexity"] == pytest.approx(a["steps"][1]["metrics"]["perplexity"], abs=1e-4)
    # the whole loss curve is the same: the resumed run continued with the same data, optimizer and RNG state
    assert b["steps"][0]["metrics"]["loss_history"] == a["steps"][0]["metrics"]["loss_history"]
    assert len(b["steps"][0]["metrics"]["loss_history"]) == 40
    assert [d.name for d in ckpt.iterdir()] == ["00000040"]  # older checkpoints are removed


class StopAt:
    """A plugin that interrupts training after optimizer step ``n`` (as Ctrl-C would)."""

    def __init__(self, n):
        self.n = n

    @hookimpl
    def gptopt_after_optimizer_step(self, ctx, model, step):
        if step == self.n:
            raise KeyboardInterrupt


def finetune_pipeline(out, resume=False):
    pipe = Pipeline(model="tiny-random-gpt2", seed=1, device="cpu", out=out, quiet=True, resume=resume)
    return (pipe.add("prune", method="magnitude", sparsity=0.5)
            .add("finetune", steps=12, batch_size=2, seq_len=32, lr=1e-3, checkpoint_every=4).add("eval"))


def test_finetune_interrupted_then_resumed_in_python_matches_and_keeps_masks(tmp_path):
    whole = finetune_pipeline(tmp_path / "whole").run()

    plugins = get_plugins()
    plugins.register(StopAt(6), "stop-at-6")
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune_pipeline(tmp_path / "cut").run()
    finally:
        plugins.unregister("stop-at-6")
    assert manifest(tmp_path / "cut")["steps"][1]["status"] == "interrupted"
    assert (tmp_path / "cut/checkpoints/step02-finetune/00000004").is_dir()  # step 6 was not a checkpoint

    resumed = finetune_pipeline(tmp_path / "cut", resume=True).run()
    assert resumed.records[2]["metrics"]["perplexity"] == pytest.approx(whole.records[2]["metrics"]["perplexity"],
                                                                        abs=1e-4)
    assert resumed.records[1]["metrics"]["loss_history"] == whole.records[1]["metrics"]["loss_history"]
    assert resumed.records[2]["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)  # masks held after resume


@pytest.mark.parametrize("extra, expected", [
    ([], "holds no training checkpoints"),
    (["--seed", "4"], "different chain (seed differs)"),
])
def test_resume_refuses_a_directory_it_cannot_continue(tmp_path, extra, expected):
    out = tmp_path / "out"
    if extra:
        first = run_gptopt("run", *ARGS, "--out", out, "lora", "--steps", "2", "--seq-len", "32",
                           "--checkpoint-every", "1")
        assert first.returncode == 0, first.stderr
    else:
        out.mkdir()
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    args = [a for a in ARGS if a not in ("--seed", "3")] + (extra or ["--seed", "3"])
    proc = run_gptopt("run", *args, "--out", out, "--resume", "lora", "--steps", "2", "--seq-len", "32",
                      "--checkpoint-every", "1")
    assert proc.returncode == 2
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and expected in lines[0], proc.stderr
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
