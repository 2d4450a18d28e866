"""RunContext: everything a step sees while it runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from .recipes import chain_recipe
from .vocabulary import FACTS, STATE_KEYS, State  # noqa: F401 (FACTS, STATE_KEYS: their home before 0.3)


@dataclass(slots=True)
class RunContext:
    """The state a chain of steps works on. Every field is declared here (``__slots__``): setting any other
    attribute raises ``AttributeError``; a plugin keeps its own data in ``ctx.state`` under a key it declared.

    * ``model`` / ``tokenizer``: the current model (steps may replace ``ctx.model``).
    * ``device``: ``torch.device`` the model lives on.
    * ``data``: :class:`gptopt_core.kit.data.TextData` (``train_ids``, ``valid_ids``, ``train_blocks``); ``eval_data``
      the ``--eval-data`` one or ``None``.
    * ``seed``: the run's seed.
    * ``facts``: set of fact strings about the model (``quantized:4bit``, ``masks``, ...): see :data:`FACTS`.
    * ``state``: data shared between plugins, by declared key (:data:`STATE_KEYS`); storing a key no loaded plugin
      declared raises (:class:`gptopt_core.vocabulary.State`).
    * ``records``: the records of the steps run so far; ``step_index``: the running step's index in ``steps``.
    * ``steps``: the run's chain of steps, in order (a step may look at the ones after it).
    * ``recipe``: the run's resolved recipe (what ``run.json`` and a saved model's ``recipe.yaml`` hold): its
      ``recipe_head`` (model, data, seed, device as given) and ``steps`` with their params as they are now.
    * ``manifest``: what the run recorded about its inputs before the first step: ``model`` (``spec``,
      ``source``, ``hash``), ``data``, ``device``, ``loaded`` (the loaded model's metrics).
    * ``out_dir``: the run's output directory or ``None``; ``resume``: ``--resume`` (continue training steps
      from their checkpoints under ``out_dir``); ``quiet``: no progress bars or log lines.
    * ``plugins``: the loaded plugins (:func:`gptopt_core.get_plugins`); ``hook``: their hook relay.
    * ``console``: the ``rich`` console the run logs to (stderr); ``model_spec`` / ``data_spec``: ``--model`` /
      ``--data`` as given.
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
    resume: bool = False
    steps: tuple = ()
    recipe_head: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)
    #: the model as loaded, kept when a step wants_original_model() (:meth:`original_model` copies it)
    _original_state: Any = field(default=None, repr=False)
    #: the live progress bar of :meth:`progress`, for :meth:`progress_info`
    _bar: Any = field(default=None, repr=False, init=False)

    def __post_init__(self):
        self.state = State(self.state, self.plugins)

    @property
    def recipe(self) -> dict:
        """The recipe that replays this run: ``recipe_head`` and every step of ``steps`` with its params now."""
        return chain_recipe(self.recipe_head, self.steps)

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
        bar = self._bar
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
