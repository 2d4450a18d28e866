"""gptopt-vllm: ``vllm``, a directory written by ``save`` served in vLLM (its CPU build, in an environment of its
own) and measured there: perplexity from vLLM's prompt logprobs on eval's windows, time to first token and decode
tokens/s for 1 and N streams, next to torch's. What vLLM's CPU build cannot load is refused in one line before vLLM
starts (docs/save-formats.md, "Served in vLLM").

Nothing heavy is imported here: vLLM runs in a subprocess.
"""
from gptopt_core import hookimpl

from .step import VllmStep

__all__ = ["VllmStep"]


@hookimpl
def gptopt_register_steps(register):
    register(VllmStep)


@hookimpl
def gptopt_run_finished(ctx, records, out_dir):
    from .measure import report_section

    section = report_section(records)
    return [section] if section else None
