"""RunContext: everything a step sees while it runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .vocabulary import FACTS, STATE_KEYS  # noqa: F401 (their home before 0.3; gptopt_core.STATE_KEYS)


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
