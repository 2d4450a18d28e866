"""The ``cpu-fast`` step: parameters, plan-time checks, facts; ``auto`` mode's table and choice."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

import pydantic

from gptopt_core import GptoptError, Params, PlanError, Step
from gptopt_core.kit.modules import matches
from gptopt_core.options import as_percent

FORMAT_CHOICES = ("auto", "bf16", "int8-dynamic", "ao-int8-weight", "ao-int8-weight-bf16", "ao-int8-dynamic")
#: what ``auto`` may choose from, in the order the table shows them (``fp32`` is the reference row)
AUTO_CANDIDATES = ("bf16", "int8-dynamic", "ao-int8-weight", "ao-int8-weight-bf16", "ao-int8-dynamic")
#: auto's default: ao-int8-dynamic is left out, its prefill ran 16x slower than fp32 on the AVX2 CPU here
#: (docs/cpu.md); ask for it with --candidates ao-int8-dynamic
AUTO_DEFAULT = ("bf16", "int8-dynamic", "ao-int8-weight")
#: auto's default with --compile: torchao's int8 weights pay off compiled, with bf16 activations (docs/cpu.md)
AUTO_DEFAULT_COMPILED = ("bf16", "int8-dynamic", "ao-int8-weight-bf16")


class CpuFastParams(Params):
    format: Literal[FORMAT_CHOICES] = pydantic.Field(
        "auto", description="auto: measure the candidates and take the fastest within --max-ppl-increase; or one "
                            "of bf16, int8-dynamic (torch quantize_dynamic), ao-int8-weight, ao-int8-dynamic "
                            "(torchao)")
    max_ppl_increase: Annotated[float, as_percent()] = pydantic.Field(
        0.10, gt=0.0, le=10.0,
        description="perplexity budget relative to the model before this step, e.g. 10%: auto's limit on "
                    "measured perplexity (the guard's default budget is half of it)")
    guard_ppl_increase: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, le=10.0,
        description="the guard's limit on calibration (train split) perplexity [default: half of "
                    "--max-ppl-increase, headroom for the held-out split]")
    guard: bool = pydantic.Field(
        True, description="int8 formats: keep the layers the conversion hurts most in float32 until the "
                          "calibration ppl is within budget (--no-guard: convert every linear layer to int8)")
    keep: list[str] = pydantic.Field(
        default_factory=list, description="int8 formats: always keep layers matching this glob in float (float32; "
                                          "bfloat16 under ao-int8-weight-bf16) (repeatable)")
    candidates: list[Literal[AUTO_CANDIDATES]] = pydantic.Field(
        default_factory=list, description="auto: formats to consider (repeatable) [default: bf16, int8-dynamic, "
                                          "ao-int8-weight where torchao runs; with --compile ao-int8-weight-bf16 "
                                          "instead of ao-int8-weight]")
    compile: bool = pydantic.Field(
        False, description="torch.compile the converted model (inductor with freezing; every format but "
                           "int8-dynamic): much less per-token overhead, minutes of compilation at the first call "
                           "(needs a C++ compiler)")
    select_on: Literal["valid", "train"] = pydantic.Field(
        "valid", description="auto: split whose perplexity decides: valid (what eval reports) or train (keeps "
                             "the held-out split untouched by the choice)")
    eval_tokens: int = pydantic.Field(4096, ge=64, le=1_000_000,
                                      description="auto: tokens scored per candidate (eval's block size 512)")
    block_size: int = pydantic.Field(512, ge=8, le=8192, description="auto: perplexity window (as eval)")
    prompt_tokens: int = pydantic.Field(64, ge=1, le=8192, description="auto: prompt length for the speed test")
    new_tokens: int = pydantic.Field(32, ge=3, le=4096, description="auto: tokens generated per speed run")
    rounds: int = pydantic.Field(5, ge=1, le=100, description="auto: interleaved speed rounds (median taken)")
    calib_blocks: int = pydantic.Field(4, ge=1, le=256, description="guard: calibration blocks (train split)")
    calib_seq_len: int = pydantic.Field(256, ge=16, le=8192, description="guard: tokens per calibration block")

    @property
    def guard_budget(self) -> float:
        return self.guard_ppl_increase if self.guard_ppl_increase is not None else self.max_ppl_increase / 2

    @pydantic.model_validator(mode="after")
    def _combination(self):
        if self.guard_ppl_increase is not None and not self.guard:
            raise ValueError("--guard-ppl-increase is the guard's budget; drop it or drop --no-guard")
        if self.format == "bf16" and self.keep:
            raise ValueError("--keep applies to the int8 formats; bf16 converts every weight")
        if self.format != "auto":
            for field in ("candidates",):
                if getattr(self, field):
                    raise ValueError(f"--{field} applies to --format auto only; drop it or use --format auto")
        return self

    def wanted_candidates(self) -> list[str]:
        """The formats ``auto`` measures: ``--candidates``, or the default for ``--compile`` or not."""
        return list(self.candidates) or list(AUTO_DEFAULT_COMPILED if self.compile else AUTO_DEFAULT)


class CpuFastStep(Step):
    """Convert the model for fast CPU inference: bf16, torch dynamic int8 or torchao int8; auto picks the fastest
    within a perplexity budget.

    ``--format auto`` (default) converts copies of the model to every candidate format (int8 ones with the
    quality guard), measures perplexity with the core's eval and decode tokens/s interleaved in one process,
    prints the table, and keeps the fastest candidate within ``--max-ppl-increase`` of the unconverted model.
    The result runs on CPU only; ``save`` writes it so ``gptopt run --model DIR`` loads it converted (see
    docs/cpu.md for the files).
    """

    name = "cpu-fast"
    Params = CpuFastParams
    position_params = Step.position_params + ("block_size",)  # auto's perplexity window: must fit the model
    forbids = {
        "quantized": "it is already quantized; cpu-fast converts a float model (drop the quantize step, or use "
                     "one of them)",
        "adapter": "the model carries an unmerged LoRA adapter; give lora --merge first",
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.result_format: Optional[str] = None

    def planned_facts(self) -> set:
        fmt = self.result_format or self.params.format
        if fmt == "fp32":
            return set()
        if fmt == "bf16":
            return {"quantized:cpu-bf16"}
        if fmt == "auto":
            return {"quantized:cpu-int8", "quantized:cpu-bf16"}  # not known before running: assume either
        return {"quantized:cpu-int8"}

    def next_facts(self, facts):
        return set(facts) | self.planned_facts() | {"cpu-only"}

    def check_plan(self, before, after, facts):
        p = self.params
        if p.compile:
            from .convert import compiler_problem  # torch: the engine, imported where it runs

            problem = compiler_problem()
            if problem:
                raise PlanError(f"cpu-fast --compile: {problem}")
        if p.format.startswith("ao-") or any(c.startswith("ao-") for c in p.candidates):
            from .convert import torchao_problem  # torch: the engine, imported where it runs

            problem = torchao_problem()
            if problem:
                raise PlanError(f"cpu-fast --format {p.format}: {problem}")
        trains = [s.name for s in after if getattr(s, "trains", False)]
        if trains:
            raise PlanError(f"cpu-fast converts for inference; '{trains[0]}' after it cannot train the converted "
                            f"model: put cpu-fast after the training steps")

    def preflight(self, ctx):
        import torch

        if torch.device(ctx.device).type != "cpu":
            raise GptoptError(f"cpu-fast converts for CPU inference but the model is on {ctx.device}; run the "
                              f"chain with --device cpu")
        from .convert import linear_names  # torch: the engine, imported where it runs

        dtypes = {str(p.dtype).replace("torch.", "") for p in ctx.model.parameters()}
        if not dtypes <= {"float32", "bfloat16", "float16"}:
            raise GptoptError(f"cpu-fast needs a float model, but its weights are stored as {', '.join(sorted(dtypes))}"
                              f" (already quantized?); start from the float model")
        if not linear_names(ctx.model):
            raise GptoptError("cpu-fast: the model has no linear layers to convert")
        if self.params.keep:
            if not any(matches(n, self.params.keep) for n in linear_names(ctx.model)):
                raise GptoptError(f"cpu-fast --keep {' '.join(self.params.keep)} matches no linear layer (names look "
                                  f"like {linear_names(ctx.model)[0]})")

    def apply(self, ctx):
        from .run import moe_dtypes, run_cpu_fast  # torch

        metrics = run_cpu_fast(ctx, self)
        return {**metrics, **moe_dtypes(ctx.model)}
