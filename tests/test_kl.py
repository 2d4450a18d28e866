"""KL divergence from a base model (llama-perplexity --kl-divergence semantics): zero against itself, equal to a
direct full-vocabulary torch computation, llama.cpp's percentiles, seeded paired bootstrap intervals, the base
logits cached once per (model, tokens), and eval and llamacpp agreeing on an f32 GGUF of a tiny model."""
import math
import shutil

import numpy as np
import pytest
import torch

from gptopt_core.kit.models import tiny_model

BLOCK = 64


def ids_for(tok, n=400):
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values())[:6000]
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"][:n])


def noisy_copy(model, scale=0.02, seed=1):
    import copy

    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return other


def test_kl_of_a_model_with_itself_is_zero_and_top1_is_100():
    """Zero up to llama.cpp's uint16 storage of the base (log-probs to ~1e-4 nats); perplexity exactly the same."""
    from gptopt_core.kit.evaluate import perplexity

    model, tok = tiny_model("tiny-random-llama")
    ids = ids_for(tok)
    base = perplexity(model, ids, BLOCK, BLOCK, 400, keep_base=True)["base_logits"]
    assert base.codes.shape == (sum(base.window_tokens), model.config.vocab_size) and base.codes.dtype == np.uint16
    got = perplexity(model, ids, BLOCK, BLOCK, 400, base=base)
    assert abs(got["kl_mean"]) < 1e-6 and abs(got["kl_max"]) < 1e-5 and got["same_top1"] == 100
    assert got["perplexity_ratio"] == 1 and got["perplexity_base"] == pytest.approx(got["perplexity"], rel=1e-12)
    assert got["kl_tokens"] == got["tokens"] == sum(base.window_tokens)


def direct_kl(base_model, model, ids, block, stride):
    """KL(base || model) over the whole vocabulary, target by target, from full logits (no top-k)."""
    from gptopt_core.kit.evaluate import eval_windows

    out = []
    with torch.inference_mode():
        for begin, end, scored_from in eval_windows(ids.numel(), block, stride):
            x = ids[begin:end].unsqueeze(0)
            p = torch.log_softmax(base_model(input_ids=x).logits[0, :-1].double(), -1)[scored_from:]
            q = torch.log_softmax(model(input_ids=x).logits[0, :-1].double(), -1)[scored_from:]
            out.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(out)


def test_kl_matches_a_direct_torch_computation():
    """Per-token KL(base || model) as a direct full-vocabulary computation from both models' logits (sliding
    windows, so the scored positions must line up); KL(model || base) differs by 7 % here, so a swapped direction
    fails."""
    from gptopt_core.kit.evaluate import perplexity

    base_model, tok = tiny_model("tiny-random-llama")
    model = noisy_copy(base_model, scale=3.0)
    ids = ids_for(tok)
    want = direct_kl(base_model, model, ids, BLOCK, 48)
    base = perplexity(base_model, ids, BLOCK, 48, 400, keep_base=True)["base_logits"]
    got = perplexity(model, ids, BLOCK, 48, 400, base=base)
    assert got["kl_tokens"] == want.numel()
    assert got["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-4)
    assert got["kl_p99"] == pytest.approx(float(torch.quantile(want, 0.99)), rel=1e-3)
    assert got["kl_mean"] > 0.5


def test_other_windows_are_refused():
    from gptopt_core import GptoptError
    from gptopt_core.kit.evaluate import perplexity

    model, tok = tiny_model("tiny-random-llama")
    ids = ids_for(tok)
    base = perplexity(model, ids, BLOCK, BLOCK, 400, keep_base=True)["base_logits"]
    with pytest.raises(GptoptError, match="other windows"):
        perplexity(model, ids, BLOCK, 32, 400, base=base)


def test_percentiles_as_llamacpp():
    from gptopt_core.kit.divergence import percentile

    values = np.random.default_rng(0).exponential(size=1001)
    for f in (0.5, 0.99, 0.999):
        assert percentile(values, f) == pytest.approx(np.percentile(values, 100 * f), rel=1e-12)
    assert percentile([3.0, 1.0], 0.5) == 2.0 and percentile([1.0, 2.0, 9.0], 1.0) == 9.0


def test_paired_bootstrap_is_seeded_and_covers():
    from gptopt_core.kit.divergence import paired_bootstrap, ppl_ratio

    rng = np.random.default_rng(0)
    tokens = np.full(40, 512)
    nll_b = rng.normal(2.0, 0.3, 40) * tokens
    nll_a = nll_b + rng.normal(0.05, 0.02, 40) * tokens  # A is worse by ~5 % in perplexity, window by window
    ratio, lo, hi = ppl_ratio(nll_a, nll_b, tokens)
    assert lo < ratio < hi and lo > 1.0 and hi < 1.08  # paired: the window-to-window spread of B cancels
    assert (ratio, lo, hi) == ppl_ratio(nll_a, nll_b, tokens)
    assert math.exp(0.05) == pytest.approx(ratio, abs=0.01)

    def mean(x):
        return x.mean(-1)

    assert paired_bootstrap(mean, nll_a, seed=1) != paired_bootstrap(mean, nll_a, seed=2)
    # coverage: over 200 samples of 30 windows from N(0, 1), the 95 % interval holds the true mean 0 ~95 % of the time
    hits = sum(lo <= 0 <= hi for lo, hi in (paired_bootstrap(mean, rng.normal(size=30), resamples=500, seed=s)
                                            for s in range(200)))
    assert 0.88 * 200 <= hits <= 0.99 * 200


def test_eval_after_quantize_reports_kl_and_the_base_is_cached(tmp_path, monkeypatch):
    """eval quantize eval: the first eval's log-probs are the base (no extra pass), the second eval reports KL;
    a second run finds the base on disk; without the first eval the base is computed before quantize."""
    import gptopt_core.kit.evaluate as evaluate
    from gptopt_core.pipeline import Pipeline

    monkeypatch.setenv("GPTOPT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    import pydoc_data.topics

    text.write_text("\n".join(pydoc_data.topics.topics.values())[:8000])
    calls = []
    real = evaluate.perplexity_of
    monkeypatch.setattr(evaluate, "perplexity_of", lambda *a, **k: calls.append(k) or real(*a, **k))

    def run(with_first_eval=True):
        p = Pipeline(model="tiny-random-llama", data=str(text), quiet=True)
        if with_first_eval:
            p.add("eval", block_size=BLOCK, max_tokens=256)
        return p.add("quantize", method="rtn", bits=4).add("eval", block_size=BLOCK, max_tokens=256).run()

    m = run().records[-1]["metrics"]
    assert len(calls) == 2 and m["kl_mean"] > 0 and 0 < m["same_top1"] <= 100
    assert m["kl_p999"] >= m["kl_p99"] >= m["kl_median"] >= 0 and m["kl_tokens"] == m["eval_tokens"]
    lo, hi = m["perplexity_ratio_ci95"]
    assert lo <= m["perplexity_ratio"] <= hi and m["kl_base"] == "model before the first lossy step"
    assert len(list((tmp_path / "cache" / "kl-base").iterdir())) == 1  # one base, one folder
    calls.clear()
    again = run(with_first_eval=False).records[-1]["metrics"]
    assert len(calls) == 1  # the base came from the disk cache: only the measured eval ran
    assert again["kl_mean"] == m["kl_mean"]
    shutil.rmtree(next((tmp_path / "cache" / "kl-base").iterdir()))
    calls.clear()
    assert run(with_first_eval=False).records[-1]["metrics"]["kl_mean"] == m["kl_mean"]
    assert len(calls) == 2  # computed from the model just before quantize


def test_eval_and_llamacpp_agree_on_kl_for_an_f32_gguf(tmp_path, monkeypatch):
    pytest.importorskip("llama_cpp")
    from gptopt_core.pipeline import Pipeline

    monkeypatch.setenv("GPTOPT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    import pydoc_data.topics

    text.write_text("\n".join(pydoc_data.topics.topics.values())[:8000])
    result = (Pipeline(model="tiny-random-llama", data=str(text), quiet=True)
              .add("quantize", method="rtn", bits=4)
              .add("eval", block_size=BLOCK, max_tokens=256)
              .add("export", to=str(tmp_path / "q.gguf"), type="f32")
              .add("llamacpp", block_size=BLOCK, max_tokens=256, bench=False, threads=2)
              .run())
    torch_m, llama_m = result.records[1]["metrics"], result.records[-1]["metrics"]
    assert llama_m["kl_tokens"] == torch_m["kl_tokens"]
    assert llama_m["kl_mean"] == pytest.approx(torch_m["kl_mean"], rel=2e-2, abs=1e-6)
    assert llama_m["same_top1"] == pytest.approx(torch_m["same_top1"], abs=1.0)
    assert llama_m["perplexity_base"] == torch_m["perplexity_base"]  # one base, computed once


def test_builtin_stdlib_docs_reads_docstrings_in_source_order(tmp_path, monkeypatch):
    """builtin:stdlib-docs: one document per module, its docstrings in source order; tests and syntax errors skipped
    (a fake standard library, so the test does not parse the real one)."""
    import sysconfig

    from gptopt_core.kit.data import load_documents

    (tmp_path / "json").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "a.py").write_text('"""Module a."""\nclass C:\n    """Class C."""\n    def f(self):\n'
                                   '        """Method f."""\n\ndef g():\n    """Function g."""\n')
    (tmp_path / "json" / "b.py").write_text('"""Module b."""\n')
    (tmp_path / "test" / "t.py").write_text('"""A test."""\n')
    (tmp_path / "bad.py").write_text('"""Broken.\n')
    (tmp_path / "nodoc.py").write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    assert load_documents("builtin:stdlib-docs") == ["Module a.\n\nClass C.\n\nMethod f.\n\nFunction g.", "Module b."]
