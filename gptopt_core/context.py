"""RunContext: everything a step sees while it runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


#: Every ``ctx.state`` key, in one place: key → (owner, meaning). A plugin that shares data with another plugin
#: does it through one of these keys (add yours here); a test checks every ``ctx.state["..."]`` literal in
#: ``plugins/`` against this table.
STATE_KEYS: dict[str, tuple[str, str]] = {
    "masks": ("gptopt-prune", "{qualified module name: bool tensor shaped like module.weight as stored, True = "
                              "kept}; the prune plugin keeps these weights at zero while later steps train, lora "
                              "--merge re-applies them, savers may store them sparse"),
    "quantized": ("gptopt-quantize, gptopt-prune, gptopt-cpu",
                  "{qualified module name: format}: which layers are quantized and how (bench, savers and exporters "
                  "read it). Formats: 'int8', 'nf4', 'fp4' (bitsandbytes); an integer grid's WeightGrid.describe(), "
                  "int<bits>-g<group size>|channel-sym|asym, e.g. 'int4-g64-sym', 'int8-channel-sym' (quantize "
                  "rtn/gptq, prune sparsegpt --quantize-bits); a cpu-fast --format value, e.g. 'int8-dynamic'"),
    "trainer": ("core (training)", "the running gptopt_core.Trainer while a training loop runs (.step, "
                                   ".total_steps, .params, .accelerator); removed afterwards"),
    "original_model": ("core (RunContext.original_model)", "a frozen copy of the model as loaded, created on "
                                                           "demand for steps whose wants_original_model() is true"),
    "distill": ("gptopt-transfer", "{'weight', 'temperature'} of --distill-from while its training step runs"),
    "l1": ("gptopt-l1", "the l1 step's configuration for the next training step (weight, mode, select, ...)"),
    "l1_runtime": ("gptopt-l1", "l1's per-training-run state (targets, schedule), created on the first hook call"),
    "robust": ("gptopt-l1", "the robust step's configuration for the next training step (weight, mode, fd_step, "
                            "targets, ...)"),
    "robust_runtime": ("gptopt-l1", "robust's per-training-run state (probes on the targeted layers, schedule, "
                                    "‖∇L‖₁ history), created when the training step starts"),
    "gguf": ("gptopt-export", "path of the GGUF file the last export step wrote (llamacpp measures it)"),
    "kl_base": ("core (klbase)", "{cache key: BaseLogits}: the KL bases of this run's measurements (top-k log-probs "
                                 "per token set and windows), also cached on disk"),
    "kl_base_hash": ("core (klbase)", "content hash of the model just before the chain's first lossy step: the "
                                      "base of --kl-base auto from then on"),
}

#: Every fact family a model can carry: name → (owner, meaning). A fact is a string ``family`` or
#: ``family:detail`` (``quantized:4bit``). Matching rule (:func:`gptopt_core.steps.fact_matches`): a pattern
#: without a detail matches the family and every detail (``quantized`` matches ``quantized:8bit``); a pattern
#: with a detail matches only itself (``quantized:4bit`` does not match ``quantized:8bit``).
FACTS: dict[str, tuple[str, str]] = {
    "quantized": ("gptopt-quantize, gptopt-prune, gptopt-cpu, model sources",
                  "weights are stored quantized: quantized:4bit / quantized:8bit (bitsandbytes), quantized:grid "
                  "(integer grids; quantized:w8a8 beside it where the layers' inputs are int8 too), "
                  "quantized:cpu-int8 / quantized:cpu-bf16 (cpu-fast); float training and pruning refuse it"),
    "masks": ("gptopt-prune", "pruning masks exist in ctx.state['masks'] (kept through later training); before it "
                              "runs, a pruning step's plan_facts()['masks'] says {sparsity, rule, method} (l1 reads "
                              "it)"),
    "adapter": ("gptopt-transfer", "the model carries an unmerged LoRA adapter (a PEFT model)"),
    "l1": ("gptopt-l1", "an L1 regularizer is armed for the next training step"),
    "robust": ("gptopt-l1", "a gradient-L1 (robustness) regularizer is armed for the next training step"),
    "experts-pruned": ("gptopt-prune", "a mixture of experts lost experts (prune-experts dropped or merged them)"),
    "cpu-only": ("gptopt-cpu", "the model was converted for CPU inference (torch dynamic int8, torchao, compile)"),
    "gguf": ("gptopt-export", "a GGUF file of the model was written (ctx.state['gguf'])"),
}


@dataclass
class RunContext:
    """The state a chain of steps works on.

    * ``model`` / ``tokenizer``: the current model (steps may replace ``ctx.model``).
    * ``device``: ``torch.device`` the model lives on.
    * ``data``: :class:`gptopt_core.data.TextData` (``train_ids``, ``valid_ids``, ``train_blocks``).
    * ``facts``: set of fact strings about the model (``quantized:4bit``, ``masks``, ...): see :data:`FACTS`.
    * ``state``: data shared between plugins, by documented key: see :data:`STATE_KEYS`.
    * ``records``: the records of the steps run so far.
    * ``out_dir``: the run's output directory or ``None``.
    """

    model: Any
    tokenizer: Any
    device: Any
    data: Any
    seed: int = 0
    facts: set = field(default_factory=set)
    state: dict = field(default_factory=dict)
    records: list = field(default_factory=list)
    out_dir: Path | None = None
    plugins: Any = None
    console: Any = None
    model_spec: str = ""
    data_spec: str = ""
    eval_data: Any = None
    step_index: int = 0
    quiet: bool = False
    resume: bool = False  # continue training steps from their checkpoints under out_dir (``--resume``)
    _original_state: Any = field(default=None, repr=False)

    @property
    def hook(self):
        """The hook relay: call hooks with keyword arguments, e.g. ``ctx.hook.gptopt_after_optimizer_step(...)``."""
        return self.plugins.hook

    @property
    def is_main_process(self) -> bool:
        return main_process()

    def progress(self, iterable, description: str = "", total: int | None = None):
        """Iterate with a live progress bar (main process, not quiet); plain iteration otherwise."""
        if self.quiet or not self.is_main_process:
            yield from iterable
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=self.console,
                      transient=True) as bar:
            if total is None:
                try:
                    total = len(iterable)
                except TypeError:
                    total = None
            task = bar.add_task(description, total=total, info="")
            self._bar = (bar, task)
            for item in iterable:
                yield item
                bar.advance(task)
            self._bar = None

    def progress_info(self, text: str) -> None:
        """Show extra text (loss, tokens/s, zeros...) next to the current progress bar."""
        bar = getattr(self, "_bar", None)
        if bar:
            bar[0].update(bar[1], info=text)

    def log(self, message: str) -> None:
        if not self.quiet and self.is_main_process and self.console is not None:
            self.console.print(message)

    def calibration_blocks(self, n: int, seq_len: int):
        """``n`` token blocks [1, seq_len] from the train split (never validation), seeded by the run seed."""
        return [b.to(self.device) for b in self.data.train_blocks(n, seq_len, self.seed)]

    def original_model(self):
        """A frozen copy of the model as it was loaded, before the chain's lossy steps (for distillation)."""
        if "original_model" not in self.state:
            import copy

            original = copy.deepcopy(self._original_state) if self._original_state is not None else None
            if original is None:
                raise RuntimeError("the original model was not kept for this run")
            original.requires_grad_(False).eval()
            self.state["original_model"] = original
        return self.state["original_model"]


def main_process() -> bool:
    """Whether this process writes (locks ``--out``, saves, reports): always, unless it is one of several processes
    of a distributed run (``WORLD_SIZE`` > 1, as ``torchrun`` / ``accelerate launch`` set it) and not rank 0. A
    stray ``RANK=1`` in a single process's environment does not skip the lock or the save."""
    import os

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world <= 1:
        return True
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"
