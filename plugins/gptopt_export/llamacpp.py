"""Running a GGUF file in llama.cpp (through llama-cpp-python): held-out perplexity from its logits on exactly
the windows ``eval`` scores (``gptopt_core.kit.evaluate.perplexity_of``), and prefill latency / decode tokens/s on
``bench``'s workload (a prompt of real held-out tokens, greedy decoding, decode = first to last new token).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time

from gptopt_core import GptoptError
from gptopt_core.kit.evaluate import perplexity_of

INSTALL_HINT = "pip install 'gptopt[llamacpp]' (llama-cpp-python builds llama.cpp from source, ~11 min on 2 cores)"


def missing() -> str | None:
    """Why llama.cpp cannot run here, or ``None``."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return f"llama-cpp-python is not installed; {INSTALL_HINT}"
    return None


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask; ``os.cpu_count()`` where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def load(path, n_ctx: int, logits_all: bool, threads: int, f32_cache: bool = False):
    """A ``llama_cpp.Llama`` for ``path`` on the CPU (llama.cpp's own log silenced); ``f32_cache``: keys and values
    cached in f32 (llama.cpp's default is f16, which rounds them: comparisons with torch's f32 want f32)."""
    problem = missing()
    if problem:
        raise GptoptError(problem)
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    try:
        with _no_amx_buffers(llama_cpp):
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                   logits_all=logits_all, n_threads=threads, n_threads_batch=threads, n_gpu_layers=0,
                                   verbose=False, **cache)
    except ValueError as exc:  # llama-cpp-python: "Failed to load model from file"
        raise GptoptError(f"llama.cpp cannot load {path}: {exc}") from None


def has_amx() -> bool:
    """Whether this llama.cpp build uses Intel AMX (``AMX_INT8 = 1`` in its system info)."""
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def _no_amx_buffers(llama_cpp):
    """On a CPU with AMX, load weights without llama.cpp's extra CPU buffer types (``use_extra_bufts = false``, what
    ``llama-cli --no-repack`` sets): llama.cpp 0.3.36's AMX buffer segfaults on q8_0 / q4_0 matrices here
    (seen on a 2-core Xeon VM with AMX: the first quantized matmul crashes the process). llama-cpp-python has no
    argument for it, so its default model parameters are wrapped while the model loads."""
    if not has_amx():
        yield
        return
    module = llama_cpp.llama_cpp
    default = module.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def perplexity(path, ids, block_size: int = 512, stride: int = 512, max_tokens: int = 4096,
               threads: int | None = None, progress=None, base=None, keep_base: bool = False) -> dict:
    """``eval``'s perplexity (and KL from ``base``, or the logits kept as a base: ``perplexity_of``'s ``base`` /
    ``keep_base``), with the logits computed by llama.cpp from the GGUF file at ``path``."""
    import numpy as np
    import torch

    llm = load(path, n_ctx=block_size, logits_all=True, threads=threads or available_cores())
    try:
        def window_logits(input_ids):
            tokens = [int(t) for t in input_ids]
            llm.reset()
            llm.eval(tokens)
            return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))

        return perplexity_of(window_logits, ids, block_size, stride, max_tokens, progress, base, keep_base)
    finally:
        llm.close()


def bench(path, prompt, new_tokens: int = 64, warmup: int = 2, repeats: int = 5, threads: int | None = None) -> dict:
    """Prefill (one forward over ``prompt`` into an empty cache), TTFT and decode tokens/s, median of
    ``repeats`` greedy runs after ``warmup`` untimed ones; also the greedy tokens of the last run."""
    import numpy as np

    threads = threads or available_cores()
    prompt = [int(t) for t in prompt]
    llm = load(path, n_ctx=len(prompt) + new_tokens, logits_all=False, threads=threads)
    prefill, ttft, decode, generated = [], [], [], []
    try:
        for run in range(warmup + repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(prompt)
            filled = time.perf_counter()
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            first = time.perf_counter()
            generated = [token]
            for _ in range(new_tokens - 1):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                generated.append(token)
            end = time.perf_counter()
            if run >= warmup:
                prefill.append((filled - start) * 1000)
                ttft.append((first - start) * 1000)
                decode.append((new_tokens - 1) / (end - first))
    finally:
        llm.close()
    mean = statistics.mean(decode)
    return {"prefill_ms": statistics.median(prefill), "ttft_ms": statistics.median(ttft),
            "decode_tokens_per_s": statistics.median(decode),
            "decode_cv": statistics.pstdev(decode) / mean if len(decode) > 1 and mean else None,
            "repeats": repeats, "threads": threads, "prompt_tokens": len(prompt), "new_tokens": new_tokens,
            "greedy_tokens": generated}


def next_token_logits(path, ids, threads: int | None = None, f32_cache: bool = False):
    """llama.cpp's logits ``[len(ids), vocab]`` (numpy float32) for one sequence of token ids (``f32_cache``: keys
    and values cached in f32, see :func:`load`)."""
    import numpy as np

    llm = load(path, n_ctx=max(len(ids), 8), logits_all=True, threads=threads or available_cores(),
               f32_cache=f32_cache)
    try:
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[:len(ids)], dtype=np.float32)
    finally:
        llm.close()
