"""The ``export`` step (GGUF for llama.cpp) and the ``llamacpp`` step (measure a GGUF in llama.cpp)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import pydantic

from gptopt_core import GptoptError, Params, PlanError, Step
from gptopt_core.kit.inputs import check_input_file
from gptopt_core.kit.locks import OutputLock
from gptopt_core.saveformats import write_model_file
from gptopt_core.writers import choose as choose_writer

from .fileformat import GGUF, REFUSED, planned_format
from .ggml_types import NAMES as TYPES

TYPE_CHOICES = ("auto",) + TYPES


class ExportParams(Params):
    format: str = pydantic.Field("gguf", min_length=1, description="file format: gguf (llama.cpp), auto (by the "
                                 "model's facts), or a file writer a plugin registers (docs/save-formats.md)")
    to: str = pydantic.Field(..., min_length=1, description="file to write, FILE.gguf (written to a temporary name "
                                                            "next to it, then renamed)")
    type: Literal[TYPE_CHOICES] = pydantic.Field(
        "auto", description="tensor type of the weight matrices: auto follows the chain (integer grids exactly as "
                            "q8_0/q4_0/q4_1 where they fit, bitsandbytes int8 -> q8_0, nf4/fp4 -> q4_1, float layers "
                            "keep their dtype), or one type for all: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1")
    embeddings: Optional[Literal[TYPE_CHOICES]] = pydantic.Field(
        None, description="type of the token embeddings and the output head [default: as --type]")
    overwrite: bool = pydantic.Field(False, description="replace an existing file")
    ignore_sliding_window: bool = pydantic.Field(
        False, description="write a model whose sliding window llama.cpp does not apply (Mistral, Phi-3 in this "
                           "llama.cpp) instead of refusing it: llama.cpp attends to the whole context, so outputs "
                           "differ from transformers on inputs longer than the window")
    imatrix: Optional[str] = pydantic.Field(
        None, min_length=1, description="also write an importance matrix for llama.cpp's quantizer (llama-quantize "
                                        "--imatrix FILE): mean squared activations per input column of every block "
                                        "weight, from calibration on the train split; FILE.gguf (llama.cpp's format) "
                                        "or FILE.dat (legacy)")
    imatrix_blocks: int = pydantic.Field(64, ge=1, le=4096, description="--imatrix: calibration blocks (train split)")
    imatrix_seq_len: int = pydantic.Field(512, ge=16, le=8192, description="--imatrix: tokens per calibration block "
                                                                           "(llama.cpp's imatrix chunk)")
    imatrix_weighting: bool = pydantic.Field(
        True, description="--imatrix: also weight gptopt's own re-rounding by it (q4_0 / iq4_nl block scales, as "
                          "llama.cpp's quantizer does); grids written from their codes are not touched")

    imatrix_in: Optional[str] = pydantic.Field(
        None, min_length=1, description="weight gptopt's re-rounding (q4_0 / iq4_nl block scales) by this existing "
                                        "importance matrix (.gguf or .dat, e.g. llama.cpp's imatrix tool's or an "
                                        "earlier export --imatrix) instead of calibrating")

    plan: Optional[str] = pydantic.Field(
        None, min_length=1, description="a type per tensor: auto (measure each block weight's calibration-loss change "
                                        "at --type, give the most sensitive per byte --upgrade-type within "
                                        "--max-bpw) or a JSON/YAML file mapping tensor names to types")
    upgrade_type: Literal[TYPES] = pydantic.Field("q8_0", description="--plan auto: the type the most sensitive "
                                                                      "tensors get")
    max_bpw: Optional[float] = pydantic.Field(
        None, gt=0.0, le=32.0, description="--plan auto: the file's size, in bits per weight over its 2-D tensors "
                                           "(the BPW llama.cpp reports)")
    plan_blocks: int = pydantic.Field(4, ge=1, le=1024, description="--plan auto: calibration blocks of 256 tokens "
                                                                    "(train split)")

    @pydantic.model_validator(mode="after")
    def _plan_budget(self):
        if self.plan == "auto" and self.max_bpw is None:
            raise ValueError("--plan auto needs --max-bpw, the file's size in bits per weight (e.g. 5.5)")
        if self.plan != "auto" and self.max_bpw is not None:
            raise ValueError("--max-bpw is the budget of --plan auto; give --plan auto with it")
        if self.plan == "auto" and self.type == "auto":
            raise ValueError("--plan auto chooses between --type and --upgrade-type per tensor; give --type (e.g. "
                             "q4_0), not auto")
        if self.plan not in (None, "auto") and not self.plan.endswith((".json", ".yaml", ".yml")):
            raise ValueError("give --plan auto or a plan file ending in .json, .yaml or .yml")
        return self

    @pydantic.model_validator(mode="after")
    def _one_imatrix(self):
        if self.imatrix and self.imatrix_in:
            raise ValueError("give --imatrix (calibrate and write one) or --imatrix-in (read one), not both")
        if self.imatrix_in and not self.imatrix_in.endswith((".gguf", ".dat")):
            raise ValueError("give an imatrix file name ending in .gguf (llama.cpp's format) or .dat (legacy)")
        return self

    @pydantic.field_validator("to")
    @classmethod
    def _suffix(cls, value, info):
        if info.data.get("format") == GGUF and not value.endswith(".gguf"):  # another format's: at plan time
            raise ValueError("give a file name ending in .gguf")
        return value

    @pydantic.field_validator("imatrix")
    @classmethod
    def _imatrix_suffix(cls, value):
        if value is not None and not value.endswith((".gguf", ".dat")):
            raise ValueError("give an imatrix file name ending in .gguf (llama.cpp's format) or .dat (legacy)")
        return value


class ExportStep(Step):
    """Export the model as a GGUF file for llama.cpp (every family of the architecture table llama.cpp runs: Llama,
    Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, GPT-NeoX, GPT-2), integer grids written exactly.

    ``--type auto`` follows the model as the chain left it: layers on a 32-weight integer grid are written as
    their codes and fp16 scales (q8_0 / q4_0 / q4_1, no re-rounding), bitsandbytes int8 layers as q8_0, NF4/FP4
    as q4_1, float layers keep their dtype; norms and biases are f32. Tokenizer, chat template and special tokens
    go with it. See docs/export.md.
    """

    name = "export"
    Params = ExportParams
    path_params = ("to", "imatrix")
    file_params = ("to", "imatrix")  # one file each, not a directory (the core's output-path check)
    provides = frozenset({"gguf"})  # when it writes GGUF (next_facts)
    forbids = REFUSED  # --format gguf's; another writer (or auto) refuses what it cannot hold in check_plan
    writer_name = None  # the file writer --format names or auto picks, set by check_plan

    def forbidden_facts(self):
        return dict(self.forbids) if self.params.format == GGUF else {}

    def next_facts(self, facts):
        gguf = (self.writer_name or self.params.format) == GGUF
        return set(facts) | (set(self.provides) if gguf else set())

    def target(self) -> Path:
        return Path(self.params.to).expanduser()

    def check_target(self) -> Path:
        target = self.target()
        if target.is_dir():
            raise PlanError(f"export: {target} is a directory; give a file name ending in .gguf")
        if target.exists() and not self.params.overwrite:
            raise PlanError(f"export: {target} exists; pass --overwrite or choose another --to")
        OutputLock(target, "export --to").check()  # another export writing it now: refused before the model loads
        if self.params.imatrix:
            imatrix = Path(self.params.imatrix).expanduser()
            if imatrix.resolve() == target.resolve():
                raise PlanError("export: --imatrix and --to name the same file; give each its own")
            if imatrix.exists() and not self.params.overwrite:
                raise PlanError(f"export: {imatrix} exists; pass --overwrite or choose another --imatrix")
        return target

    def check_plan(self, before, after, facts):
        """Before the model loads: the output paths, and every side file as far as the file alone allows (an
        ``--imatrix-in`` in full: sizes, counts, values; a ``--plan`` file: syntax, names, types, duplicates)."""
        self._steps_before = len(before)  # preflight's export plan is kept only when nothing runs before
        self.check_target()
        self.writer_name = planned_format(self, facts)  # the file writer (fileformat.py); the rest is GGUF's
        if self.writer_name != GGUF:
            return
        if self.params.imatrix_in:
            written = {str(Path(s.params.imatrix).expanduser()) for s in before
                       if s.name == "export" and s.params.imatrix}
            if str(Path(self.params.imatrix_in).expanduser()) not in written:  # else read once written
                self.importance_in()
        if self.params.plan not in (None, "auto"):
            self.plan_file()

    def importance_in(self) -> dict:
        """``--imatrix-in``, read and checked once (the chain is validated before and after the model loads)."""
        from .imatrix_files import load

        path = Path(self.params.imatrix_in).expanduser()
        key = _file_key(path)
        if getattr(self, "_importance", (None,))[0] != key:
            self._importance = (key, load(path, f"export --imatrix-in {path}"))
        return self._importance[1]

    def plan_file(self) -> dict:
        """``--plan FILE``, parsed and checked once (names and types; matched to the model by :meth:`preflight`)."""
        from . import mix

        path = Path(self.params.plan).expanduser()
        key = _file_key(path)
        if getattr(self, "_plan_file", (None,))[0] != key:
            self._plan_file = (key, mix.read_plan_file(path))
        return self._plan_file[1]

    def preflight(self, ctx):
        """Right after the model loads, before any step runs: the checks that need the model's tensors (and the
        export plan, kept for :meth:`apply` when no step runs before the export: see :meth:`export_plan`)."""
        if self.writer_name not in (None, GGUF):
            return
        from .gguf_writer import check_model

        check_model(ctx.model, ctx.plugins, self.params.ignore_sliding_window)
        from . import mix, vocab

        vocab.check_tokenizer(ctx.tokenizer)  # a tokenizer llama.cpp cannot read: refused before the chain runs

        p = self.params
        self._export_plan = None
        if not (p.plan or getattr(self, "_importance", None)):
            return
        plan = self.export_plan(ctx)
        if p.plan == "auto":  # explicit --type: the sizes do not depend on earlier steps
            mix.check_budget(plan.entries, p.max_bpw)
        if p.imatrix_in and getattr(self, "_importance", None):
            from .imatrix_files import match_model

            match_model(self._importance[1], plan.sources, f"export --imatrix-in {p.imatrix_in}")
        if getattr(self, "_steps_before", 1):  # the chain runs first: its model gets its own plan, none held
            self._export_plan = None

    def export_plan(self, ctx):
        """The :class:`~gptopt_export.plan.ExportPlan` of the model as it is now, a ``--plan`` file's types
        applied: the one :meth:`preflight` kept while the model is unchanged since, else built (once) now."""
        from . import mix
        from .plan import build

        kept = getattr(self, "_export_plan", None)
        if kept is not None and kept.current(ctx.model):
            return kept
        p = self.params
        plan = build(ctx.model, ctx.plugins, p.type, p.embeddings)
        if p.plan not in (None, "auto"):
            plan = plan.with_types(mix.file_plan(self.plan_file(), plan.sources, f"export --plan {p.plan}"))
        self._export_plan = plan
        return plan

    def read_imatrix_in(self, ctx, plan) -> tuple[dict, dict]:
        """``(importance, metrics)`` of ``--imatrix-in``, matched to the model as the chain left it (``plan``'s
        tensors); entries no quantizer uses and block weights without one are counted and named in the log."""
        from gptopt_core import safe_text

        from .imatrix_files import match_model

        importance = self.importance_in()
        report = match_model(importance, plan.sources, f"export --imatrix-in {self.params.imatrix_in}")
        for what, names in (("entries for tensors no quantizer weights (not matrices)", report["unused"]),
                            ("block weights without an entry (quantized unweighted)", report["missing"])):
            if names:
                ctx.log(f"  imatrix: {len(names)} {what}: {safe_text(', '.join(names[:4]), 200)}"
                        f"{', ...' if len(names) > 4 else ''}")
        return importance, {"imatrix_in": self.params.imatrix_in, "imatrix_entries": len(importance),
                            "imatrix_unused": len(report["unused"]), "imatrix_missing": len(report["missing"])}

    def apply(self, ctx):
        target = self.check_target()
        target.parent.mkdir(parents=True, exist_ok=True)
        with OutputLock(target, "export --to"):  # a second export to this file fails now, not silently later
            self.check_target()  # again under the lock: an export that finished meanwhile wrote it
            writer = choose_writer(ctx, ctx.model, self.params_dict(), kind="file")
            return self.export(ctx, target, writer)

    def export(self, ctx, target: Path, writer) -> dict:
        import time

        options, imatrix_metrics, plan_metrics, started = self.params_dict(), {}, {}, time.perf_counter()
        if writer.name == GGUF:  # GGUF's own inputs: the export plan, an importance matrix, a type per tensor
            from .gguf_writer import check_model

            check_model(ctx.model, ctx.plugins, self.params.ignore_sliding_window)
            plan = self.export_plan(ctx)
            from . import imatrix

            imatrix_metrics, importance = (imatrix.write_for_export(ctx, self.params, plan) if self.params.imatrix
                                           else ({}, None))
            if self.params.imatrix_in:
                importance, imatrix_metrics = self.read_imatrix_in(ctx, plan)
            options["importance"] = importance = importance if self.params.imatrix_weighting else None
            started = time.perf_counter()
            options["export_plan"], plan_metrics = self.plan(ctx, plan, importance)
        try:
            metrics = write_model_file(ctx, writer, target, options, overwrite=self.params.overwrite)
        finally:
            self._export_plan = None  # its tensors are not held after the export
        metrics["export_seconds"] = round(time.perf_counter() - started, 3)
        metrics.update(imatrix_metrics, format=writer.name)
        metrics.update(plan_metrics)
        if writer.name != GGUF:
            ctx.log(f"  wrote {target} ({writer.name})")
            return metrics
        ctx.state["gguf"] = str(target)
        ctx.log(f"  wrote {target} ({metrics['gguf_bytes'] / 1e6:.1f} MB, {metrics['gguf_tensor_types']}, "
                f"{metrics['gguf_exact_grid_tensors']} grids written exactly, {metrics['gguf_grid_min_rounded_tensors']} "
                f"from their codes with q4_1's min rounded to fp16, {metrics['gguf_rerounded_grid_tensors']} "
                f"re-rounded)")
        return metrics

    def plan(self, ctx, plan, importance) -> tuple:
        """``--plan``: ``(plan with its types, metrics)``; ``(plan, {})`` without one."""
        p = self.params
        if p.plan is None:
            return plan, {}
        if p.plan != "auto":
            return plan, {"gguf_plan": plan.overrides, "gguf_plan_file": p.plan}
        from . import mix

        overrides, metrics = mix.auto_plan(ctx, plan.entries, p.upgrade_type, p.max_bpw, p.plan_blocks,
                                           p.embeddings, importance)
        ctx.log(f"  plan auto: {len(overrides)} of {metrics['gguf_plan_candidates']} tensors to {p.upgrade_type}, "
                f"{metrics['gguf_plan_bpw']:.3f} bits per weight (budget {p.max_bpw:g})")
        return plan.with_types(overrides), metrics


def _file_key(path: Path):
    """What identifies a file's version for the read-once caches (a file replaced between two checks is read again)."""
    try:
        st = path.stat()
    except OSError:
        return (str(path), None)
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns)


class LlamacppParams(Params):
    file: Optional[str] = pydantic.Field(None, description="GGUF file to measure [default: the one the last "
                                                           "export wrote]")
    eval: bool = pydantic.Field(True, description="held-out perplexity from llama.cpp's logits, on eval's windows")
    bench: bool = pydantic.Field(True, description="prefill latency and decode tokens/s, bench's workload")
    block_size: int = pydantic.Field(512, ge=8, le=8192, description="eval window (as eval)")
    stride: Optional[int] = pydantic.Field(None, ge=1, description="eval window step (default: block size)")
    max_tokens: int = pydantic.Field(4096, ge=16, description="held-out tokens to score (as eval)")
    split: str = pydantic.Field("valid", pattern="^(valid|eval-data)$",
                                description="valid (held-out split of --data) or eval-data (--eval-data), as eval")
    prompt_tokens: int = pydantic.Field(128, ge=1, le=32768, description="prompt length (as bench)")
    new_tokens: int = pydantic.Field(64, ge=2, le=32768, description="tokens generated per run (as bench)")
    warmup: int = pydantic.Field(2, ge=0, le=100, description="untimed runs first")
    repeats: int = pydantic.Field(5, ge=1, le=1000, description="timed runs (median taken)")
    threads: Optional[int] = pydantic.Field(None, ge=1, le=1024,
                                            description="llama.cpp threads [default: the cores available]")
    kl_base: str = pydantic.Field("auto", min_length=1, description=(
        "KL divergence, same top token and perplexity ratio against: auto (the torch model before the chain's "
        "first quantize/prune/cpu-fast step, else the torch model), none, a reference .gguf (run in llama.cpp, "
        "as llama-perplexity --kl-divergence-base), or a reference model (directory, name) in torch"))

    @pydantic.model_validator(mode="after")
    def _something(self):
        if not (self.eval or self.bench):
            raise ValueError("nothing to measure: drop --no-eval or --no-bench")
        if self.stride and self.stride > self.block_size:
            raise ValueError("stride must not exceed block-size (tokens would go unscored)")
        if self.file is not None and not self.file.endswith(".gguf"):
            raise ValueError("give a file name ending in .gguf")
        return self


class LlamacppStep(Step):
    """Measure a GGUF file in llama.cpp: held-out perplexity on eval's tokens, prefill and decode speed on bench's
    workload, next to the torch figures of the same run."""

    name = "llamacpp"
    Params = LlamacppParams

    @property
    def position_params(self):
        """Measuring this run's own export: its window and prompt must fit the model's positions (checked before
        the first step; a --file is checked against its own header at plan time)."""
        return () if self.params.file else ("block_size", "prompt_tokens")

    def required_facts(self):
        if self.params.file:
            return {}
        return {"gguf": "put export --format gguf --to FILE.gguf before it, or give llamacpp --file FILE.gguf"}

    def check_plan(self, before, after, facts):
        from .llamacpp import missing

        problem = missing()
        if problem:
            raise PlanError(f"llamacpp: {problem}")
        if self.params.file:
            written = {str(Path(s.params.to).expanduser()) for s in before if s.name == "export"}
            path = Path(self.params.file).expanduser()
            if str(path) not in written:
                if not check_input_file(path, "llamacpp --file", missing_ok=True):
                    raise PlanError(f"llamacpp --file {path}: no such file")
                from .measure import check_llama_limits

                check_llama_limits(path, self.params)  # what llama.cpp aborts on, before anything loads
        ref = self.params.kl_base
        if ref.endswith(".gguf"):
            if not check_input_file(Path(ref).expanduser(), "llamacpp --kl-base", missing_ok=True):
                raise PlanError(f"llamacpp --kl-base {ref}: no such file")

    def kl_windows(self, ctx):
        p = self.params
        if not p.eval or p.kl_base != "auto":
            return None
        data = ctx.data if p.split == "valid" else ctx.eval_data
        return None if data is None else (data.valid_ids, p.block_size, p.stride or p.block_size, p.max_tokens)

    def preflight(self, ctx):
        if self.params.eval:
            from .measure import scored_data

            ids = scored_data(ctx, self.params).valid_ids
            have = min(int(ids.numel()), self.params.max_tokens)
            if have < self.params.block_size + 1:
                raise GptoptError(f"llamacpp: the held-out split has {int(ids.numel())} tokens, fewer "
                                  f"than one block of {self.params.block_size}+1; give more text or a smaller "
                                  f"--block-size")

    def apply(self, ctx):
        from .measure import measure

        return measure(ctx, self.params)
