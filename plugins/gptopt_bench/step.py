"""The ``bench`` step: its params, the run of :mod:`.measure` (torch, imported when a bench runs) and the
comparison with earlier benches of the same workload (:func:`compare`).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import pydantic

from gptopt_core import GptoptError, Params, PlanError, Step
from gptopt_core.kit.evaluate import model_device
from gptopt_core.kit.metrics import model_bytes
from gptopt_core.options import as_percent

#: workload parameters: two benches are compared only when these match
WORKLOAD = ("prompt_tokens", "new_tokens", "batch_size")


class BenchParams(Params):
    prompt_tokens: int = pydantic.Field(128, ge=1, le=131072, description="prompt length in tokens (real text)")
    new_tokens: int = pydantic.Field(64, ge=2, le=65536,
                                     description="tokens to generate per run (greedy; ≥ 2 so decode is timed)")
    batch_size: int = pydantic.Field(1, ge=1, le=4096, description="prompts decoded together")
    warmup: int = pydantic.Field(2, ge=0, le=1000, description="untimed runs first")
    repeats: int = pydantic.Field(5, ge=1, le=10000, description="timed runs at least")
    max_repeats: int = pydantic.Field(20, ge=1, le=10000,
                                      description="timed runs at most while the CV stays above --target-cv")
    target_cv: Annotated[float, as_percent()] = pydantic.Field(0.05, gt=0, le=1,
                                      description="stop repeating once decode tokens/s varies less than this "
                                                  "(coefficient of variation)")
    max_seconds: float = pydantic.Field(120.0, gt=0,
                                        description="stop extending repeats past --repeats after this long")
    device: Literal["auto", "cpu", "cuda"] = pydantic.Field(
        "auto", description="auto: benchmark where the model is; cpu/cuda: insist the model is there")

    @pydantic.field_validator("max_repeats")
    @classmethod
    def _at_least_repeats(cls, value, info):
        from pydantic_core import PydanticCustomError

        repeats = info.data.get("repeats")
        if repeats is not None and value < repeats:
            raise PydanticCustomError("repeats_order", f"must be at least --repeats ({repeats})")
        return value


class BenchStep(Step):
    """Benchmark prefill latency, time to first token, decode tokens/s and peak memory (CUDA events on GPU).

    Usable anywhere in a chain, any number of times: every bench after the first with the same workload
    reports speed-ups against it (decode_speedup, prefill_speedup, ttft_speedup, memory_ratio, bytes_ratio).
    """

    name = "bench"
    Params = BenchParams

    def check_plan(self, before, after, facts):
        if self.params.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise PlanError("bench --device cuda: no CUDA GPU is available here; use --device auto "
                                "(benchmarks where the model is) or --device cpu")

    def apply(self, ctx):
        from . import measure  # torch: imported when a bench runs, not when gptopt starts

        p = self.params
        device = model_device(ctx.model)
        if p.device != "auto" and device.type != p.device:
            raise GptoptError(f"bench --device {p.device}: the model is on {device}; run the chain with "
                              f"--device {p.device} or use bench --device auto")
        limit = measure.context_limit(ctx.model)
        if limit is not None and p.prompt_tokens + p.new_tokens > limit:
            raise GptoptError(f"bench: prompt-tokens + new-tokens = {p.prompt_tokens + p.new_tokens} exceeds the "
                              f"model's context of {limit} tokens; lower --prompt-tokens or --new-tokens")
        ids, mask = measure.prompt_batch(ctx.data.valid_ids, p.prompt_tokens, p.batch_size, device)
        tokenizer = ctx.tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(tokenizer, "eos_token_id", None)
        timer, memory = measure.meters_for(device)

        def show(result):
            rate = result.decode_rates[-1]
            cv = measure.coefficient_of_variation(result.decode_rates)
            ctx.progress_info(f"{rate:.1f} tok/s" + (f"  cv {cv:.1%}" if cv is not None else ""))

        bar = iter(ctx.progress(range(p.max_repeats), "bench"))
        next(bar, None)

        def on_repeat(result):
            show(result)
            next(bar, None)

        result = measure.run_bench(ctx.model, ids, mask, new_tokens=p.new_tokens, warmup=p.warmup,
                                   repeats=p.repeats, max_repeats=p.max_repeats, target_cv=p.target_cv,
                                   max_seconds=p.max_seconds, timer=timer, memory=memory, pad_token_id=pad,
                                   on_repeat=on_repeat)
        bar.close()
        metrics = measure.summarize(result, p.target_cv)
        metrics.update(measure.environment(device))
        metrics["timer"] = timer.kind
        metrics["memory_method"] = memory.kind + (f" ({memory.method})" if getattr(memory, "method", None) else "")
        metrics["dtypes"] = measure.dtype_summary(ctx.model)
        quantized = ctx.state.get("quantized") or {}
        if quantized:
            kinds = {}
            for kind in quantized.values():
                kinds[str(kind)] = kinds.get(str(kind), 0) + 1
            metrics["quantized_modules"] = kinds
        metrics.update(prompt_tokens=p.prompt_tokens, new_tokens=p.new_tokens, batch_size=p.batch_size)
        if not metrics["bench_cv_met"]:
            cv = metrics["bench_cv"]
            ctx.log(f"  [yellow]bench: decode tokens/s CV {'n/a' if cv is None else f'{cv:.1%}'} is above "
                    f"--target-cv {p.target_cv:.1%} after {metrics['bench_repeats']} runs[/]")
        metrics.update(compare(metrics, model_bytes(ctx.model), ctx.records))
        return metrics


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def compare(metrics: dict, bytes_now: int, records: list) -> dict:
    """Ratios of this bench against the first earlier ``bench`` record with the same workload and device.

    ``decode_speedup`` = tokens/s now / then; ``prefill_speedup`` and ``ttft_speedup`` = ms then / now;
    ``memory_ratio`` = peak memory now / then; ``bytes_ratio`` = model bytes now / then. Empty when this is
    the first bench of its workload (it becomes the baseline)."""
    for index, record in enumerate(records, 1):
        if record.get("name") != "bench" or record.get("status") != "ok":
            continue
        base = record.get("metrics", {})
        if any(base.get(k) != metrics.get(k) for k in WORKLOAD + ("device",)):
            continue
        out = {"compared_with_step": index}
        if _number(base.get("decode_tokens_per_s")) and base["decode_tokens_per_s"] > 0:
            out["decode_speedup"] = metrics["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        for key, name in (("prefill_ms", "prefill_speedup"), ("ttft_ms", "ttft_speedup")):
            if _number(base.get(key)) and metrics.get(key):
                out[name] = base[key] / metrics[key]
        if _number(base.get("peak_memory_bytes")) and base["peak_memory_bytes"] > 0:
            out["memory_ratio"] = metrics["peak_memory_bytes"] / base["peak_memory_bytes"]
        if _number(base.get("model_bytes")) and base["model_bytes"] > 0:
            out["bytes_ratio"] = bytes_now / base["model_bytes"]
        return out
    return {}

