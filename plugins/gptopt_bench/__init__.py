"""gptopt bench: prefill latency, time to first token, decode tokens/s and peak memory where the model is.

CUDA: ``torch.cuda.Event`` timing with synchronisation, ``reset_peak_memory_stats`` / ``max_memory_allocated``.
CPU: ``time.perf_counter`` and the growth of the process's peak RSS. Repeats extend until the coefficient of
variation of decode tokens/s is at or under ``--target-cv`` (or ``--max-repeats`` / ``--max-seconds``).
Every bench after the first (same workload) reports speed-ups against it; the end of the run puts every
model state ("point") side by side (perplexity, bytes, sparsity, speed, memory) and plots ``tradeoff.png``.

The plugin's shape (docs/architecture.md): this module holds the hooks only, :mod:`.step` the params and the
step, :mod:`.measure` the torch work and :mod:`.report` the end-of-run table and plot (matplotlib and rich
imported there when it runs).
"""
from gptopt_core import hookimpl

from .report import finish
from .step import BenchParams, BenchStep, compare

__all__ = ["BenchParams", "BenchStep", "compare"]


@hookimpl
def gptopt_register_steps(register):
    register(BenchStep)


@hookimpl
def gptopt_run_finished(ctx, records, out_dir):
    if not any(r.get("name") == "bench" and r.get("status") == "ok" for r in records):
        return None
    return finish(ctx, records, out_dir)
