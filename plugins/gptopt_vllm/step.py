"""The ``vllm`` step: serve a directory ``save`` wrote in vLLM and measure it there, on eval's tokens and bench's
workload, next to the torch figures of the same run."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pydantic

from gptopt_core import GptoptError, Params, PlanError, Step


class VllmParams(Params):
    dir: Optional[str] = pydantic.Field(None, description="saved model directory to serve [default: the one the "
                                                          "last save of this run wrote]")
    python: Optional[str] = pydantic.Field(None, description="Python of vLLM's own environment [default: "
                                                             "$GPTOPT_VLLM_PYTHON, else this one]")
    eval: bool = pydantic.Field(True, description="held-out perplexity from vLLM's prompt logprobs, eval's windows")
    bench: bool = pydantic.Field(True, description="time to first token and decode tokens/s, bench's workload")
    block_size: int = pydantic.Field(512, ge=8, le=8192, description="eval window (as eval)")
    stride: Optional[int] = pydantic.Field(None, ge=1, description="eval window step (default: block size)")
    max_tokens: int = pydantic.Field(4096, ge=16, description="held-out tokens to score (as eval)")
    prompt_tokens: int = pydantic.Field(128, ge=1, le=32768, description="prompt length (as bench)")
    new_tokens: int = pydantic.Field(64, ge=2, le=32768, description="tokens generated per stream (as bench)")
    streams: list[int] = pydantic.Field([1, 8], min_length=1, max_length=8,
                                        description="concurrent streams to time: 1,8 or the option repeated")
    warmup: int = pydantic.Field(1, ge=0, le=100, description="untimed runs first")
    repeats: int = pydantic.Field(3, ge=1, le=100, description="timed runs (median taken)")
    dtype: str = pydantic.Field("auto", pattern="^(auto|float32|bfloat16|float16)$",
                                description="vLLM's compute dtype (auto: vLLM's choice, bfloat16 on CPU)")
    kv_cache_gb: int = pydantic.Field(1, ge=1, le=1024, description="vLLM CPU KV cache (GiB)")
    threads: Optional[int] = pydantic.Field(None, ge=1, le=1024, description="threads [default: the cores available]")
    timeout: float = pydantic.Field(1800, gt=0, le=86400, description="seconds vLLM may take in all")

    @pydantic.field_validator("streams", mode="before")
    @classmethod
    def _streams(cls, value):
        items = value if isinstance(value, (list, tuple)) else [value]  # "1,8", ["1,8"] or [1, 8]
        return [v for item in items for v in (str(item).replace(" ", "").split(",") if isinstance(item, str)
                                                 else [item]) if v != ""]

    @pydantic.model_validator(mode="after")
    def _something(self):
        if not (self.eval or self.bench):
            raise ValueError("nothing to measure: drop --no-eval or --no-bench")
        if self.stride and self.stride > self.block_size:
            raise ValueError("stride must not exceed block-size (tokens would go unscored)")
        if any(n < 1 or n > 256 for n in self.streams):
            raise ValueError("streams: each between 1 and 256")
        return self


class VllmStep(Step):
    """Serve a saved model directory in vLLM (CPU build, own venv) and measure it there: perplexity on eval's
    tokens, time to first token and decode tokens/s for 1 and N streams, next to torch's."""

    name = "vllm"
    Params = VllmParams
    columns = {"vllm_perplexity": ("vLLM ppl", ".3f")}

    @property
    def position_params(self):
        return ("block_size", "prompt_tokens")

    def check_plan(self, before, after, facts):
        from .checks import check_model_dir
        from .runner import find_python

        if self.params.dir:
            saved = {str(Path(s.params.to).expanduser()) for s in before if s.name == "save"}
            if str(Path(self.params.dir).expanduser()) not in saved:
                check_model_dir(Path(self.params.dir).expanduser(), self.params.dtype)  # refusals before anything loads
        elif not any(s.name == "save" for s in before):
            raise PlanError("vllm: put save --to DIR before it, or give vllm --dir DIR")
        find_python(self.params.python)

    def preflight(self, ctx):
        if self.params.eval and min(int(ctx.data.valid_ids.numel()), self.params.max_tokens) < self.params.block_size + 1:
            raise GptoptError(f"vllm: the held-out split has {int(ctx.data.valid_ids.numel())} tokens, fewer than "
                              f"one block of {self.params.block_size}+1; give more text or a smaller --block-size")

    def apply(self, ctx):
        from .measure import measure

        return measure(ctx, self.params)
