"""The core's own plugin: built-in model sources, core metrics, default save, and the eval/save steps.

A leaf of the core's import graph (as pluggy eggsample's ``lib.py``): it imports the engine modules it uses and
nothing that loads plugins (the plugin manager imports it, registers it as ``gptopt-core``, and hands each step
its plugin set as :attr:`gptopt_core.Step.plugins`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pydantic

from ..errors import GptoptError, PlanError
from .evaluate import generate_sample, perplexity
from .klbase import capture_before_lossy, kl_metrics, kl_plan
from .families import FAMILIES
from .families_moe import MOE_FAMILIES
from .grids import minmax_range, mse_range
from ..hookspecs import hookimpl
from .locks import OutputLock
from .metrics import model_bytes, num_params, sparsity
from .models import max_positions, resolve_builtin
from .observers import Observer
from ..saveformats import SafetensorsFormat, write_model_dir
from ..writers import check_plan, choose, specialized
from ..steps import Params, Step
from ..vocabulary import Fact, MatrixCell, StateKey


class EvalParams(Params):
    block_size: int = pydantic.Field(512, ge=8, le=8192, description="tokens per eval window")
    stride: Optional[int] = pydantic.Field(None, ge=1, description="window step (default: block size)")
    max_tokens: int = pydantic.Field(4096, ge=16, description="held-out tokens to score")
    sample: Optional[str] = pydantic.Field(None, description="also generate a continuation of this prompt")
    sample_tokens: int = pydantic.Field(32, ge=1, le=1024, description="tokens to generate for --sample")
    split: str = pydantic.Field("valid", pattern="^(valid|eval-data)$",
                                description="valid (held-out split of --data) or eval-data (--eval-data)")
    kl_base: str = pydantic.Field("auto", min_length=1, description=(
        "KL divergence, same top token and perplexity ratio against: auto (the model before the chain's first "
        "quantize/prune/cpu-fast step), none, or a reference model (directory, .gguf, model name)"))


class EvalStep(Step):
    """Held-out perplexity (fixed block/stride/max tokens), optional sample generation."""

    name = "eval"
    Params = EvalParams
    position_params = ("block_size",)

    def _check_windows(self):
        if self.params.stride and self.params.stride > self.params.block_size:
            raise PlanError("eval: stride must not exceed block-size (tokens would go unscored)")
        if self.params.max_tokens < self.params.block_size + 1:
            raise PlanError(f"eval: --max-tokens {self.params.max_tokens} is below one block of --block-size "
                              f"{self.params.block_size} (+1 target token); give --max-tokens "
                              f"{self.params.block_size + 1} or more, or a smaller --block-size")

    def check_plan(self, before, after, facts):
        self._check_windows()
        check_kl_reference(self.params.kl_base, "eval")

    def kl_windows(self, ctx):
        p = self.params
        data = ctx.data if p.split == "valid" else ctx.eval_data
        if p.kl_base != "auto" or data is None:
            return None
        return data.valid_ids, p.block_size, p.stride or p.block_size, p.max_tokens

    def preflight(self, ctx):
        data = ctx.data if self.params.split == "valid" else ctx.eval_data
        if data is None:
            raise GptoptError("eval --split eval-data needs --eval-data on the run")
        have = min(int(data.valid_ids.numel()), self.params.max_tokens)
        if have < self.params.block_size + 1:
            raise GptoptError(
                f"eval: the held-out split of '{data.spec}' has {int(data.valid_ids.numel())} tokens, fewer than one "
                f"block of {self.params.block_size}+1; give more text or a smaller --block-size")
        if self.params.sample:
            limit = max_positions(ctx.model)
            prompt = len(ctx.tokenizer(self.params.sample, add_special_tokens=False)["input_ids"])
            if limit is not None and prompt + self.params.sample_tokens > limit:
                raise GptoptError(f"eval: --sample is {prompt} tokens; with --sample-tokens {self.params.sample_tokens} "
                                  f"that is longer than the model's {limit} positions")

    def apply(self, ctx):
        p = self.params
        data = ctx.data if p.split == "valid" else ctx.eval_data
        if data is None:
            raise GptoptError("eval --split eval-data needs --eval-data on the run")
        windows = (data.valid_ids, p.block_size, p.stride or p.block_size, p.max_tokens)
        plan = kl_plan(ctx, *windows, reference=p.kl_base)
        result = perplexity(ctx.model, *windows, progress=ctx.progress, base=plan.base,
                            keep_base=plan.store is not None)
        if plan.store:
            plan.store(result["base_logits"])
        metrics = {"perplexity": result["perplexity"], "eval_tokens": result["tokens"],
                   **kl_metrics(result, plan.source)}
        if "kl_mean" in metrics:
            ctx.log(f"  KL {metrics['kl_mean']:.5f} (p99.9 {metrics['kl_p999']:.4f}), same top "
                    f"{metrics['same_top1']:.2f} %, ppl x{metrics['perplexity_ratio']:.4f} of {plan.source}")
        if p.sample:
            metrics["sample"] = generate_sample(ctx.model, ctx.tokenizer, p.sample, p.sample_tokens)
            ctx.log(f"  sample: {p.sample}[bold]{metrics['sample']}[/]")
        return metrics


class SaveParams(Params):
    to: str = pydantic.Field(..., min_length=1, description="directory to write (created atomically)")
    overwrite: bool = pydantic.Field(False, description="replace a non-empty target directory")
    format: str = pydantic.Field("auto", min_length=1, description=(
        "auto (by the model's facts: integer grids -> compressed-tensors, else safetensors), safetensors, "
        "compressed-tensors, bitsandbytes, cpu-fast, or a directory writer a plugin registers (docs/save-formats.md)"))
    allow_dequantized: bool = pydantic.Field(False, description=(
        "write quantized layers de-quantized where the format cannot hold them (otherwise refused)"))


class SaveStep(Step):
    """Save the model (--format: safetensors, compressed-tensors, ...), tokenizer, recipe and run.json; atomic:
    temp dir, then rename. A format that cannot hold the model refuses it before anything is written."""

    name = "save"
    Params = SaveParams
    path_params = ("to",)

    def check_target(self):
        target = Path(self.params.to).expanduser()
        replace = self.params.overwrite or getattr(self, "replace_on_resume", False)  # set by the pipeline
        if target.exists() and (not target.is_dir() or any(target.iterdir())) and not replace:
            raise PlanError(f"save: {target} exists and is not empty; pass --overwrite or choose another --to")
        OutputLock(target, "save --to").check()  # another save writing it now: refused before the model loads
        return target

    def check_plan(self, before, after, facts):
        self.check_target()
        check_plan(self.plugins, self.params_dict(), facts)  # the formats of the plugin set this step runs under

    def apply(self, ctx):
        if not ctx.is_main_process:  # data-parallel run (accelerate launch): only the main process writes
            _barrier()
            target = Path(self.params.to).expanduser()
            return {"saved_to": str(target), "files": sorted(p.name for p in target.iterdir())}
        target = self.check_target()
        options = self.params_dict()
        fmt = choose(ctx, ctx.model, options)  # refuses (nothing written) where the format cannot hold the model
        try:
            files = write_model_dir(ctx, target, lambda path: fmt.write(ctx, ctx.model, path, options),
                                    overwrite=self.params.overwrite or getattr(self, "replace_on_resume", False))
        finally:
            _barrier()
        return {"saved_to": str(target), "files": files, "format": fmt.name}


def _barrier() -> None:
    """Wait for every process of a distributed run (no-op in a single process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@hookimpl
def gptopt_register_steps(register):
    register(EvalStep)
    register(SaveStep)


def check_kl_reference(value: str, step: str) -> None:
    """``--kl-base``: auto, none, a model name, or an existing path."""
    from .inputs import check_input_file

    if value in ("auto", "none") or not value.endswith(".gguf") and not value.startswith((".", "/", "~")):
        return
    path = Path(value).expanduser()
    if path.is_dir():
        return
    if not check_input_file(path, f"{step} --kl-base", missing_ok=True):
        raise PlanError(f"{step} --kl-base {value}: no such file or directory")


@hookimpl
def gptopt_step_started(ctx, step):
    capture_before_lossy(ctx, step)  # KL's base: the model just before the chain's first lossy step


@hookimpl(trylast=True)
def gptopt_resolve_model(spec, options):
    return resolve_builtin(spec, options)


@hookimpl
def gptopt_collect_metrics(ctx):
    return {"model_bytes": model_bytes(ctx.model), "num_params": num_params(ctx.model),
            "sparsity": sparsity(ctx.model)}


@hookimpl
def gptopt_register_writers(register):
    register(SafetensorsFormat)


@hookimpl
def gptopt_register_architectures(register):
    for family in FAMILIES + MOE_FAMILIES:
        register(family)


@hookimpl
def gptopt_register_observers(register):
    register(Observer("minmax", minmax_range, help="the group's range as it is"))
    register(Observer("mse", mse_range, help="the range shrunk, per group, to where rounding error is lowest"))
    register(Observer("hmse", mse_range, importance=True,
                      help="gptq: mse with each column's error weighted by the calibration Hessian's diagonal, the "
                           "mean squared activation llama.cpp's imatrix holds"))


@hookimpl
def gptopt_register_vocabulary(register):
    """The core's own words: what its training loop, KL bases and model copy keep in ``ctx.state``, and the
    ``quantized`` key and fact several plugins write and the core's model sources and save formats read."""
    register(StateKey("trainer", "the running gptopt_core.Trainer while a training loop runs (.step, .total_steps, "
                                 ".params, .accelerator); removed afterwards"))
    register(StateKey("original_model", "a frozen copy of the model as loaded, created on demand "
                                        "(RunContext.original_model) for steps whose wants_original_model() is true"))
    register(StateKey("kl_base", "{cache key: BaseLogits}: the KL bases of this run's measurements (top-k log-probs "
                                 "per token set and windows), also cached on disk"))
    register(StateKey("kl_base_hash", "content hash of the model just before the chain's first lossy step: the base "
                                      "of --kl-base auto from then on"))
    register(StateKey("quantized", "{qualified module name: format}: which layers are quantized and how (bench, "
                      "savers and exporters read it; quantize, prune sparsegpt --quantize-bits and cpu-fast write "
                      "it). Formats: 'int8', 'nf4', 'fp4' (bitsandbytes); an integer grid's WeightGrid.describe(), "
                      "int<bits>-g<group size>|channel-sym|asym, e.g. 'int4-g64-sym', 'int8-channel-sym'; a cpu-fast "
                      "--format value, e.g. 'int8-dynamic'"))
    register(Fact("quantized", "weights are stored quantized: quantized:4bit / quantized:8bit (bitsandbytes, also "
                  "set by the model sources for a model loaded quantized), quantized:grid (integer grids; "
                  "quantized:w8a8 beside it where the layers' inputs are int8 too), quantized:cpu-int8 / "
                  "quantized:cpu-bf16 (cpu-fast); float training and pruning refuse it", lossy=True))
    register(MatrixCell("eval"))
    register(MatrixCell("save safetensors"))


@hookimpl(trylast=True)
def gptopt_save_model(ctx, model, path):
    """The end of the ``safetensors`` chain: the writer that specializes safetensors for this model's facts
    (``bitsandbytes``, ``cpu-fast``), else ``save_pretrained``."""
    writer = specialized(ctx, model, SafetensorsFormat.name)
    if writer is not None:
        writer.write(ctx, model, path, {"format": SafetensorsFormat.name})
        return True
    model.save_pretrained(str(path), safe_serialization=True)
    return True
