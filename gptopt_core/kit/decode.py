"""One decode-timing routine for every plugin that measures generation speed (``bench``, ``cpu-fast``).

The workload: greedy ``generate`` of exactly ``new_tokens`` tokens (EOS cannot end it early, no sampling settings
inherited from the checkpoint). A streamer records a timer mark when ``generate`` hands over the prompt and each
new token, so time to first token = call → first new token, and decode = first → last new token
(``new_tokens - 1`` steps, each a one-token forward with the KV cache plus token selection).
"""
from __future__ import annotations

import time
from dataclasses import dataclass


class PerfCounterTimer:
    """Host wall clock: ``mark()`` returns ``time.perf_counter()`` (a timer is anything with ``mark``, ``sync``,
    ``elapsed_ms``; ``bench`` passes CUDA events on a GPU)."""

    kind = "perf_counter"

    def mark(self):
        return time.perf_counter()

    def sync(self) -> None:
        """Nothing to wait for on the host."""

    def elapsed_ms(self, start, end) -> float:
        return (end - start) * 1000.0


class TimingStreamer:
    """A ``generate`` streamer that only records a timer mark for every ``put`` (first: the prompt, then
    each new token as soon as generate hands it to the host)."""

    def __init__(self, timer):
        self.timer = timer
        self.marks = []

    def put(self, value) -> None:
        self.marks.append(self.timer.mark())

    def end(self) -> None:
        pass


def generation_kwargs(model, new_tokens: int, pad_token_id) -> dict:
    """``{"generation_config": ...}`` for greedy decoding of exactly ``new_tokens`` tokens (EOS cannot end it
    early), no sampling settings inherited from the checkpoint's generation config."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              num_beams=1, pad_token_id=pad_token_id,
                              eos_token_id=getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return {"generation_config": config}


@dataclass
class GenerateTiming:
    """One timed ``generate``: milliseconds to the first token, of the decode steps, in all; the batch size."""

    ttft_ms: float
    decode_ms: float
    decode_steps: int
    total_ms: float
    batch_size: int

    @property
    def decode_tokens_per_s(self) -> float:
        return self.batch_size * self.decode_steps / (self.decode_ms / 1000.0)


def time_generate(model, input_ids, attention_mask, new_tokens: int, timer=None, gen_kwargs=None) -> GenerateTiming:
    """One ``model.generate`` of ``new_tokens`` tokens, timed per token through a streamer.

    :param timer: a timer (default :class:`PerfCounterTimer`).
    :param gen_kwargs: :func:`generation_kwargs` of the model (computed when not given).
    :raises RuntimeError: generate produced a different number of tokens than asked.
    """
    import torch

    timer = timer or PerfCounterTimer()
    gen_kwargs = gen_kwargs or generation_kwargs(model, new_tokens, 0)
    streamer = TimingStreamer(timer)
    with torch.inference_mode():
        start = timer.mark()
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, streamer=streamer, **gen_kwargs)
        end = timer.mark()
    timer.sync()
    generated = out.shape[1] - input_ids.shape[1]
    if generated != new_tokens or len(streamer.marks) != new_tokens + 1:
        raise RuntimeError(f"generate produced {generated} tokens ({len(streamer.marks) - 1} streamed), "
                           f"expected {new_tokens}")
    marks = streamer.marks
    return GenerateTiming(ttft_ms=timer.elapsed_ms(start, marks[1]),
                          decode_ms=timer.elapsed_ms(marks[1], marks[-1]), decode_steps=new_tokens - 1,
                          total_ms=timer.elapsed_ms(start, end), batch_size=int(input_ids.shape[0]))
