"""The bench measurement: timers (CUDA events / ``perf_counter``), memory meters (CUDA allocator / peak RSS),
repeat-until-stable statistics, and the prefill + ``generate`` loop the ``bench`` step runs.

Imported only when a bench runs (it imports torch and transformers).
"""
from __future__ import annotations

import gc
import math
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from gptopt_core import GptoptError
from gptopt_core.kit.decode import GenerateTiming, PerfCounterTimer, generation_kwargs, time_generate


# -- statistics --------------------------------------------------------------------------------------
def percentile(values, q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def coefficient_of_variation(values) -> float | None:
    """Sample standard deviation / mean; ``None`` with fewer than two values (undefined)."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    if mean == 0:
        return None
    return statistics.stdev(values) / abs(mean)


def enough_repeats(values, repeats: int, max_repeats: int, target_cv: float, elapsed_s: float = 0.0,
                   max_seconds: float = math.inf) -> bool:
    """Stop rule: at least ``repeats`` samples, then stop once their CV is ≤ ``target_cv``, or at
    ``max_repeats`` samples, or once ``max_seconds`` have been spent measuring."""
    n = len(values)
    if n >= max_repeats:
        return True
    if n < repeats:
        return False
    cv = coefficient_of_variation(values)
    if cv is not None and cv <= target_cv:
        return True
    return elapsed_s >= max_seconds


# -- timers ------------------------------------------------------------------------------------------
class CudaEventTimer:
    """Device clock: ``mark()`` records a ``torch.cuda.Event(enable_timing=True)`` on the current stream;
    ``sync()`` waits for the device; ``elapsed_ms`` is ``start.elapsed_time(end)`` (valid after ``sync``)."""

    kind = "cuda_event"

    def __init__(self, device):
        self.device = torch.device(device)

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def elapsed_ms(self, start, end) -> float:
        return float(start.elapsed_time(end))


# -- memory meters -----------------------------------------------------------------------------------
class CudaMemoryMeter:
    """``reset_peak_memory_stats`` at start, ``max_memory_allocated`` at stop (bytes held by tensors on the
    device: weights, KV cache, activations). Growth = peak minus what was allocated at start."""

    kind = "cuda_max_memory_allocated"

    def __init__(self, device):
        self.device = torch.device(device)
        self.base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> dict:
        torch.cuda.synchronize(self.device)
        peak = int(torch.cuda.max_memory_allocated(self.device))
        return {"peak_memory_bytes": peak, "peak_memory_growth_bytes": max(peak - int(self.base), 0)}


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int | None:
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssMemoryMeter:
    """Peak resident set size of the process while benchmarking, and its growth over the RSS at start.

    On Linux the kernel's own high-water mark is reset at start (``/proc/self/clear_refs``) and read at stop
    (``VmHWM``); where that is not allowed, a thread samples ``VmRSS`` every millisecond (may miss a spike
    shorter than that). ``peak_memory_bytes`` is the growth (activations, KV cache, workspaces: what running
    the model costs on top of what the process already held); ``peak_rss_bytes`` is the absolute peak."""

    kind = "cpu_peak_rss"

    def __init__(self, force_sampler: bool = False):
        self.force_sampler = force_sampler
        self.base = 0
        self.method = None
        self._sampled = 0
        self._stop = None
        self._thread = None

    def start(self) -> None:
        gc.collect()
        self.base = current_rss_bytes() or 0
        if not self.force_sampler and reset_peak_rss() and _proc_status_kib("VmHWM") is not None:
            self.method = "vmhwm"
            return
        self.method = "sampler"
        self._sampled = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="gptopt-bench-rss")
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = current_rss_bytes()
            if rss is not None and rss > self._sampled:
                self._sampled = rss
            self._stop.wait(0.001)

    def stop(self) -> dict:
        if self.method == "vmhwm":
            peak = _proc_status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            rss = current_rss_bytes() or 0
            peak = max(self._sampled, rss)
        growth = max(peak - self.base, 0)
        return {"peak_memory_bytes": int(growth), "peak_memory_growth_bytes": int(growth),
                "peak_rss_bytes": int(peak)}


def meters_for(device) -> tuple:
    """The (timer, memory meter) pair for a device: CUDA events + allocator stats on ``cuda``, else
    ``perf_counter`` + peak RSS."""
    device = torch.device(device)
    if device.type == "cuda":  # nothing touches the GPU until a meter is used
        return CudaEventTimer(device), CudaMemoryMeter(device)
    return PerfCounterTimer(), RssMemoryMeter()


# -- the measured operations -------------------------------------------------------------------------
def time_prefill(model, input_ids, attention_mask, timer) -> float:
    """Milliseconds for one forward pass over the prompt that fills a fresh KV cache (what generate's
    first step does)."""
    with torch.inference_mode():
        start = timer.mark()
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True)
        end = timer.mark()
    timer.sync()
    return timer.elapsed_ms(start, end)


def prompt_batch(ids, prompt_tokens: int, batch_size: int, device):
    """``batch_size`` prompts of ``prompt_tokens`` real tokens, each from a different offset of ``ids``
    (tiled when the text is short)."""
    ids = ids.reshape(-1)
    if ids.numel() == 0:
        raise GptoptError("bench: the data has no tokens to build a prompt from; give --data with text")
    need = prompt_tokens * batch_size
    if ids.numel() < need:
        ids = ids.repeat(need // ids.numel() + 1)
    rows = ids[:need].reshape(batch_size, prompt_tokens).to(device)
    return rows, torch.ones_like(rows)


def context_limit(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


@dataclass
class BenchResult:
    prefill_ms: list = field(default_factory=list)
    generate: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def decode_rates(self) -> list:
        return [g.decode_tokens_per_s for g in self.generate]


def run_bench(model, input_ids, attention_mask, *, new_tokens: int, warmup: int, repeats: int, max_repeats: int,
              target_cv: float, max_seconds: float = math.inf, timer=None, memory=None, pad_token_id=None,
              on_repeat=None) -> BenchResult:
    """Warm up, then measure (prefill forward, then a full generate) until the decode tokens/s CV is at or
    under ``target_cv`` (after at least ``repeats``), ``max_repeats`` is reached, or ``max_seconds`` pass.

    Memory is measured over warmup and measurement alike, so first-call allocations count."""
    device = next(model.parameters()).device
    if timer is None or memory is None:
        default_timer, default_memory = meters_for(device)
        timer, memory = timer or default_timer, memory or default_memory
    gen_kwargs = generation_kwargs(model, new_tokens, pad_token_id)
    was_training = model.training
    model.eval()
    result = BenchResult()
    memory.start()
    try:
        for _ in range(warmup):
            time_prefill(model, input_ids, attention_mask, timer)
            time_generate(model, input_ids, attention_mask, new_tokens, timer, gen_kwargs)
        began = time.perf_counter()
        while True:
            result.prefill_ms.append(time_prefill(model, input_ids, attention_mask, timer))
            result.generate.append(time_generate(model, input_ids, attention_mask, new_tokens, timer, gen_kwargs))
            if on_repeat is not None:
                on_repeat(result)
            if enough_repeats(result.decode_rates, repeats, max_repeats, target_cv,
                              time.perf_counter() - began, max_seconds):
                break
        result.seconds = time.perf_counter() - began
    finally:
        result.memory = memory.stop()
        model.train(was_training)
    return result


def summarize(result: BenchResult, target_cv: float) -> dict:
    """The bench metrics from a :class:`BenchResult` (medians, p90s, CVs, memory)."""
    rates = result.decode_rates
    ttft = [g.ttft_ms for g in result.generate]
    total_rate = [g.batch_size * (g.decode_steps + 1) / (g.total_ms / 1000.0) for g in result.generate]
    cv = coefficient_of_variation(rates)
    metrics = {
        "prefill_ms": statistics.median(result.prefill_ms),
        "prefill_ms_p90": percentile(result.prefill_ms, 90),
        "ttft_ms": statistics.median(ttft),
        "ttft_ms_p90": percentile(ttft, 90),
        "decode_tokens_per_s": statistics.median(rates),
        "decode_ms_per_token": statistics.median(g.decode_ms / g.decode_steps for g in result.generate),
        "generate_tokens_per_s": statistics.median(total_rate),
        "bench_cv": cv,
        "prefill_cv": coefficient_of_variation(result.prefill_ms),
        "bench_cv_met": cv is not None and cv <= target_cv,
        "bench_repeats": len(rates),
        "bench_seconds": round(result.seconds, 3),
    }
    metrics.update(result.memory)
    return metrics


def dtype_summary(model) -> dict:
    """Parameter elements per storage dtype, e.g. ``{"float32": 30000, "uint8": 120000}`` (tied weights once;
    packed 4-bit weights count as their stored uint8 elements)."""
    counts, seen = {}, set()
    for p in model.parameters():
        key = (p.data_ptr(), p.numel())
        if key in seen:
            continue
        seen.add(key)
        name = str(p.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + p.numel()
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def environment(device) -> dict:
    device = torch.device(device)
    env = {"device": str(device)}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["torch_threads"] = torch.get_num_threads()
        env["cpu_count"] = os.cpu_count()
    return env
