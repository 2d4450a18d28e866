"""The ``vllm`` step's measurement and its comparison with the torch figures of the same run."""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from gptopt_core import GptoptError
from gptopt_core.kit.evaluate import eval_windows

from .checks import check_model_dir
from .runner import find_python, run_worker


def finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _records(ctx, name):
    return [(i, r) for i, r in enumerate(ctx.records, 1) if r.get("name") == name and r.get("status") == "ok"]


def saved_dir(ctx, params) -> Path:
    if params.dir:
        return Path(params.dir).expanduser().resolve()
    saves = _records(ctx, "save")
    if not saves:
        raise GptoptError("vllm: no save step ran before it; put save --to DIR before vllm or give --dir")
    return Path(saves[-1][1]["metrics"]["saved_to"]).resolve()


def request(ctx, params, model_dir: Path) -> dict:
    req = {"model": str(model_dir), "dtype": params.dtype, "seed": ctx.seed or 0,
           "max_model_len": max(params.block_size + 1, params.prompt_tokens + params.new_tokens)}
    if params.eval:
        ids = ctx.data.valid_ids[:params.max_tokens]
        req["windows"] = [{"ids": ids[b:e].tolist(), "scored_from": s}
                          for b, e, s in eval_windows(ids.numel(), params.block_size, params.stride or params.block_size)]
    if params.bench:
        ids = ctx.data.valid_ids.reshape(-1)
        if ids.numel() == 0:
            raise GptoptError("vllm: the data has no tokens to build a prompt from; give --data with text")
        if ids.numel() < params.prompt_tokens:
            ids = ids.repeat(params.prompt_tokens // ids.numel() + 1)
        req.update(prompt=ids[:params.prompt_tokens].tolist(), new_tokens=params.new_tokens,
                   streams=list(params.streams), warmup=params.warmup, repeats=params.repeats)
    return req


def compare(ctx, params, metrics: dict) -> dict:
    """Ratios against torch: perplexity vs the first and last ``eval`` on the same windows; decode speed vs the
    ``bench`` of the same workload and batch size."""
    out, stride = {}, params.stride or params.block_size
    evals = [(i, r["metrics"]) for i, r in _records(ctx, "eval")
             if r.get("params", {}).get("block_size") == params.block_size
             and (r.get("params", {}).get("stride") or params.block_size) == stride
             and r.get("params", {}).get("max_tokens") == params.max_tokens
             and r.get("params", {}).get("split", "valid") == "valid"]
    if "vllm_perplexity" in metrics:
        for label, (index, m) in (("first", evals[0]), ("last", evals[-1])) if evals else ():
            if finite(m.get("perplexity")):
                out[f"torch_perplexity_{label}_eval"] = m["perplexity"]
                out[f"vllm_perplexity_vs_{label}_eval"] = metrics["vllm_perplexity"] / m["perplexity"]
    for n in params.streams:
        rate = metrics.get(f"vllm_decode_tokens_per_s_{n}")
        for index, r in _records(ctx, "bench"):
            m = r["metrics"]
            if (m.get("prompt_tokens"), m.get("new_tokens"), m.get("batch_size", 1)) == \
                    (params.prompt_tokens, params.new_tokens, n) and finite(m.get("decode_tokens_per_s")) and rate:
                out[f"torch_decode_tokens_per_s_{n}"] = m["decode_tokens_per_s"]
                out[f"vllm_decode_speedup_vs_torch_{n}"] = rate / m["decode_tokens_per_s"]
                break
    return out


def measure(ctx, params) -> dict:
    model_dir = saved_dir(ctx, params)
    check_model_dir(model_dir, params.dtype)  # one line, before vLLM starts
    python = find_python(params.python)
    threads = params.threads or len(os.sched_getaffinity(0))
    out_dir = Path(ctx.out_dir) if ctx.out_dir else Path(tempfile.mkdtemp(prefix="gptopt-vllm-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / f"vllm-{len(ctx.records) + 1}.log"
    ctx.log(f"  vllm: serving {model_dir} (vLLM's log: {log})")
    got = run_worker(python, request(ctx, params, model_dir), log, params.timeout, threads, params.kv_cache_gb)
    metrics = {"vllm_dir": str(model_dir), "vllm_version": got["vllm_version"], "vllm_threads": threads,
               "vllm_load_seconds": got["load_seconds"], "vllm_log": str(log),
               "vllm_dtype": got.get("dtype", params.dtype)}
    if "windows" in got:
        nll = sum(w[0] for w in got["windows"])
        tokens = sum(w[1] for w in got["windows"])
        metrics.update(vllm_perplexity=math.exp(nll / max(tokens, 1)), vllm_nll=nll / max(tokens, 1),
                       vllm_eval_tokens=tokens, vllm_eval_seconds=got["eval_seconds"])
    for row in got.get("decode", []):
        n = row["streams"]
        metrics.update({f"vllm_ttft_ms_{n}": row["ttft_ms"], f"vllm_decode_tokens_per_s_{n}": row["decode_tokens_per_s"],
                        f"vllm_decode_cv_{n}": row["decode_cv"]})
    if params.bench:
        metrics.update(prompt_tokens=params.prompt_tokens, new_tokens=params.new_tokens)
    metrics.update(compare(ctx, params, metrics))
    parts = [f"ppl {metrics['vllm_perplexity']:.3f}" + (
        f" (x{metrics['vllm_perplexity_vs_last_eval']:.4f} torch)" if "vllm_perplexity_vs_last_eval" in metrics else "")
        ] if "vllm_perplexity" in metrics else []
    parts += [f"{n} stream{'s' if n > 1 else ''}: ttft {metrics[f'vllm_ttft_ms_{n}']:.0f} ms, decode "
              f"{metrics[f'vllm_decode_tokens_per_s_{n}']:.1f} tok/s" for n in params.streams
              if f"vllm_decode_tokens_per_s_{n}" in metrics]
    ctx.log(f"  vLLM {model_dir.name}: " + "; ".join(parts))
    return metrics


def report_section(records) -> str | None:
    """report.md table: every vllm step's figures next to the torch ones."""
    rows = []
    for index, r in enumerate(records, 1):
        if r.get("name") != "vllm" or r.get("status") != "ok":
            continue
        m = r.get("metrics", {})

        def fmt(key, spec):
            return format(m[key], spec) if finite(m.get(key)) else "-"

        decode = ", ".join(f"{k.rsplit('_', 1)[-1]}: {m[k]:.1f}" for k in sorted(m)
                           if k.startswith("vllm_decode_tokens_per_s_") and finite(m[k]))
        rows.append(f"| {index} | {Path(m.get('vllm_dir', '')).name} | {fmt('vllm_perplexity', '.3f')} | "
                    f"{fmt('vllm_perplexity_vs_last_eval', '.4f')} | {fmt('vllm_ttft_ms_1', '.0f')} | "
                    f"{decode or '-'} | {m.get('vllm_version', '-')} |")
    if not rows:
        return None
    head = ["## vLLM", "", "| step | directory | ppl (vLLM) | ppl / last torch eval | ttft ms (1 stream) | "
            "decode tok/s by streams | vLLM |", "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows)
