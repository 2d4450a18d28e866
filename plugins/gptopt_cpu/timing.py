"""Decode speed of several model variants, measured interleaved in one process.

The ``bench`` step measures one model state per step; choosing between formats needs them side by side on a
machine whose load changes from second to second, so every round times each variant once, in turn, and the
comparison uses per-variant medians over rounds (load from other processes hits every variant alike).
The workload is the ``bench`` step's: greedy ``generate`` of exactly ``new_tokens`` tokens after a prompt of
``prompt_tokens`` real held-out tokens; decode tokens/s = (new_tokens - 1) / (time of last token - time of
first token), token times taken by a streamer as ``generate`` hands each token over.
"""
from __future__ import annotations

import statistics

from gptopt_core.kit.decode import generation_kwargs, time_generate


def time_decode(model, input_ids, new_tokens: int, pad_token_id=0) -> dict:
    """One greedy generate (the core's decode timing); returns ``{"decode_tokens_per_s", "prefill_ms"}``
    (prefill = call → first token)."""
    import torch

    t = time_generate(model, input_ids, torch.ones_like(input_ids), new_tokens,
                      gen_kwargs=generation_kwargs(model, new_tokens, pad_token_id))
    return {"decode_tokens_per_s": t.decode_tokens_per_s, "prefill_ms": t.ttft_ms}


def interleaved(models: dict, input_ids, new_tokens: int, rounds: int, warmup: int = 1, pad_token_id=0,
                progress=None) -> dict:
    """Time every model in ``models`` once per round, in turn; returns per-name medians and raw samples:
    ``{name: {"decode_tokens_per_s": median, "prefill_ms": median, "samples": [tok/s per round]}}``."""
    for model in models.values():
        model.eval()
        for _ in range(warmup):
            time_decode(model, input_ids, new_tokens, pad_token_id)
    samples = {name: [] for name in models}
    prefill = {name: [] for name in models}
    iterator = progress(range(rounds), "speed") if progress else range(rounds)
    for r in iterator:
        names = list(models) if r % 2 == 0 else list(reversed(models))  # alternate order: no position bias
        for name in names:
            t = time_decode(models[name], input_ids, new_tokens, pad_token_id)
            samples[name].append(t["decode_tokens_per_s"])
            prefill[name].append(t["prefill_ms"])
    return {name: {"decode_tokens_per_s": statistics.median(samples[name]),
                   "prefill_ms": statistics.median(prefill[name]), "samples": samples[name]}
            for name in models}
