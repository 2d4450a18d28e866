"""The ``llamacpp`` step's measurement and its comparison with the torch figures of the same run."""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

from gptopt_core import GptoptError
from gptopt_core.kit.klbase import cached_kl_base, kl_metrics, kl_plan

from . import llamacpp


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _records(ctx, name):
    return [(i, r) for i, r in enumerate(ctx.records, 1) if r.get("name") == name and r.get("status") == "ok"]


def compare(ctx, params, metrics: dict) -> dict:
    """Ratios against torch: perplexity vs the first and the last ``eval`` on the same windows, decode speed vs
    the first ``bench`` on the same workload, file bytes vs the model as loaded."""
    out = {}
    stride = params.stride or params.block_size
    evals = [(i, r["metrics"]) for i, r in _records(ctx, "eval")
             if r.get("params", {}).get("block_size") == params.block_size
             and (r.get("params", {}).get("stride") or params.block_size) == stride
             and r.get("params", {}).get("max_tokens") == params.max_tokens
             and r.get("params", {}).get("split", "valid") == params.split]
    if "llamacpp_perplexity" in metrics and evals:
        for label, (index, m) in (("first", evals[0]), ("last", evals[-1])):
            if _num(m.get("perplexity")):
                out[f"torch_perplexity_{label}_eval"] = m["perplexity"]
                out[f"perplexity_vs_{label}_eval"] = metrics["llamacpp_perplexity"] / m["perplexity"]
                out[f"{label}_eval_step"] = index
    benches = [(i, r["metrics"]) for i, r in _records(ctx, "bench")
               if r["metrics"].get("prompt_tokens") == params.prompt_tokens
               and r["metrics"].get("new_tokens") == params.new_tokens
               and r["metrics"].get("batch_size", 1) == 1 and str(r["metrics"].get("device", "cpu")) == "cpu"]
    if "llamacpp_decode_tokens_per_s" in metrics and benches:
        index, m = benches[0]
        if _num(m.get("decode_tokens_per_s")) and m["decode_tokens_per_s"] > 0:
            out["torch_decode_tokens_per_s"] = m["decode_tokens_per_s"]
            out["decode_speedup_vs_torch"] = metrics["llamacpp_decode_tokens_per_s"] / m["decode_tokens_per_s"]
            out["torch_bench_step"] = index
        if _num(m.get("prefill_ms")) and metrics.get("llamacpp_prefill_ms"):
            out["prefill_speedup_vs_torch"] = m["prefill_ms"] / metrics["llamacpp_prefill_ms"]
    loaded = (getattr(ctx, "manifest", None) or {}).get("loaded", {}).get("model_bytes")
    if _num(loaded) and loaded:
        out["gguf_bytes_vs_loaded_model"] = metrics["gguf_bytes"] / loaded
    return out


def check_llama_limits(path, params, ids=None) -> None:
    """What llama.cpp aborts on (exit 134, no message), refused before it is called: a header whose claims its
    tensors contradict (:func:`gptopt_core.check_gguf_file`: e.g. 200,000 blocks), a window or a prompt longer
    than the file's context, token ids beyond its vocabulary."""
    from gptopt_core.kit.gguf_files import check_gguf_file

    info = check_gguf_file(path, f"llamacpp: {path}")
    limit = info["context_length"]
    for flag, need, used in (("--block-size", params.block_size, params.eval),
                             ("--prompt-tokens + --new-tokens", params.prompt_tokens + params.new_tokens,
                              params.bench)):
        if used and need > limit:
            raise GptoptError(f"llamacpp: {flag} is {need} tokens, longer than the {limit} positions of {path}; "
                              f"use at most {limit}")
    top = int(ids.max()) if ids is not None and ids.numel() else -1
    if isinstance(info["vocab"], int) and top >= info["vocab"]:
        raise GptoptError(f"llamacpp: the data has token id {top} but {path} has a vocabulary of {info['vocab']}; "
                          "measure a GGUF of this run's model (its tokenizer)")


def scored_data(ctx, params):
    """The text ``--split`` names: the run's ``--data`` (valid) or its ``--eval-data``."""
    data = ctx.data if params.split == "valid" else ctx.eval_data
    if data is None:
        raise GptoptError("llamacpp --split eval-data needs --eval-data on the run")
    return data


def kl_base(ctx, params, windows, threads):
    """``(base logits, where they come from)`` for KL: a reference GGUF run in llama.cpp (cached by the file's
    sha256), or the core's choice (``gptopt_core.kl_plan``: the model before the first lossy step, a reference
    model in torch, or the torch model as it is)."""
    ref = params.kl_base
    if not ref.endswith(".gguf"):
        plan = kl_plan(ctx, *windows, reference=ref, own_base=False)
        return plan.base, plan.source
    path = Path(ref).expanduser()
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)

    def compute():
        return llamacpp.perplexity(path, *windows, threads, keep_base=True)["base_logits"]

    return cached_kl_base(ctx, f"gguf:{digest.hexdigest()}", *windows, compute), f"{path.name} in llama.cpp"


def measure(ctx, params) -> dict:
    path = Path(params.file).expanduser() if params.file else Path(ctx.state.get("gguf", ""))
    if not path.exists():
        raise GptoptError(f"llamacpp: {path} does not exist")
    data = scored_data(ctx, params)
    check_llama_limits(path, params, getattr(data, "valid_ids", None))
    threads = params.threads or llamacpp.available_cores()
    metrics = {"gguf_path": str(path), "gguf_bytes": path.stat().st_size, "llamacpp_threads": threads}
    try:
        import llama_cpp

        metrics["llamacpp_version"] = llama_cpp.__version__
    except ImportError:
        raise GptoptError(f"llamacpp: {llamacpp.missing()}") from None
    if params.eval:
        windows = (data.valid_ids, params.block_size, params.stride or params.block_size, params.max_tokens)
        base, source = kl_base(ctx, params, windows, threads)
        result = llamacpp.perplexity(path, *windows, threads, progress=ctx.progress, base=base)
        metrics.update(llamacpp_perplexity=result["perplexity"], llamacpp_eval_tokens=result["tokens"],
                       **kl_metrics(result, source))
    if params.bench:
        ids = ctx.data.valid_ids.reshape(-1)
        if ids.numel() == 0:
            raise GptoptError("llamacpp: the data has no tokens to build a prompt from; give --data with text")
        if ids.numel() < params.prompt_tokens:
            ids = ids.repeat(params.prompt_tokens // ids.numel() + 1)
        result = llamacpp.bench(path, ids[:params.prompt_tokens].tolist(), params.new_tokens, params.warmup,
                                params.repeats, threads)
        metrics.update(llamacpp_prefill_ms=result["prefill_ms"], llamacpp_ttft_ms=result["ttft_ms"],
                       llamacpp_decode_tokens_per_s=result["decode_tokens_per_s"],
                       llamacpp_decode_cv=result["decode_cv"], llamacpp_bench_repeats=result["repeats"],
                       prompt_tokens=params.prompt_tokens, new_tokens=params.new_tokens)
    metrics.update(compare(ctx, params, metrics))
    parts = []
    if "llamacpp_perplexity" in metrics:
        parts.append(f"ppl {metrics['llamacpp_perplexity']:.3f}" + (
            f" (x{metrics['perplexity_vs_first_eval']:.3f} torch)" if "perplexity_vs_first_eval" in metrics else ""))
    if "kl_mean" in metrics:
        parts.append(f"KL {metrics['kl_mean']:.5f} (p99.9 {metrics['kl_p999']:.4f}), same top "
                     f"{metrics['same_top1']:.2f} % vs {metrics['kl_base']}")
    if "llamacpp_decode_tokens_per_s" in metrics:
        parts.append(f"decode {metrics['llamacpp_decode_tokens_per_s']:.1f} tok/s" + (
            f" (x{metrics['decode_speedup_vs_torch']:.2f} torch)" if "decode_speedup_vs_torch" in metrics else ""))
    ctx.log(f"  llama.cpp {path.name}: " + ", ".join(parts))
    return metrics


def report_section(records) -> str | None:
    """report.md table: every llamacpp step's figures next to the torch ones."""
    rows = []
    for index, r in enumerate(records, 1):
        if r.get("name") != "llamacpp" or r.get("status") != "ok":
            continue
        m = r.get("metrics", {})

        def fmt(key, spec):
            return format(m[key], spec) if _num(m.get(key)) else "-"

        rows.append(f"| {index} | {Path(m.get('gguf_path', '')).name} | {fmt('gguf_bytes', ',')} | "
                    f"{fmt('llamacpp_perplexity', '.3f')} | {fmt('perplexity_vs_first_eval', '.4f')} | "
                    f"{fmt('kl_mean', '.5f')} | {fmt('kl_p999', '.4f')} | {fmt('same_top1', '.2f')} | "
                    f"{fmt('llamacpp_prefill_ms', '.1f')} | {fmt('llamacpp_decode_tokens_per_s', '.1f')} | "
                    f"{fmt('decode_speedup_vs_torch', '.2f')} | {m.get('llamacpp_threads', '-')} |")
    if not rows:
        return None
    head = ["## llama.cpp", "",
            "| step | file | bytes | ppl (llama.cpp) | ppl / first torch eval | KL mean | KL p99.9 | same top % | "
            "prefill ms | decode tok/s | decode / torch bench | threads |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)
