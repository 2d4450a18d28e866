"""Steps: one params schema gives the CLI options, the recipe keys and the Python keyword arguments."""
from __future__ import annotations

import os
from typing import Any, ClassVar

import pydantic

from .errors import ParamsError, shorten


class Params(pydantic.BaseModel):
    """Base for a step's parameters: unknown keys are errors, values are validated on assignment.

    Field descriptions become ``--help`` text; field names become ``--option-names`` (``_`` → ``-``) and
    recipe keys.
    """

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=True)

    @pydantic.field_validator("*", mode="before")
    @classmethod
    def _from_any_door(cls, value, info):
        """``steps: true`` is not 1: a boolean given for an int or float option is an error (pydantic's lax
        mode would take it), while text such as ``"5"`` from the command line still converts. A path
        (``pathlib.Path``, any ``os.PathLike``) given for a text option is its text, as from the command line."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            if _numeric_only(cls.model_fields[info.field_name].annotation):
                raise ValueError("Input should be a number, not a boolean")
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, (list, tuple)) and any(isinstance(v, os.PathLike) for v in value):
            return type(value)(os.fspath(v) if isinstance(v, os.PathLike) else v for v in value)
        return value


def _numeric_only(annotation) -> bool:
    """True for ``int``, ``float`` and ``Optional``/unions of them (and of ``None``)."""
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and args:
        kinds = [a for a in args if a is not type(None)]
        return bool(kinds) and all(_numeric_only(a) for a in kinds)
    return annotation in (int, float)


def parse_percent(value):
    """A fraction from any door: ``"10%"`` → 0.10, ``"0.1"`` / ``0.1`` → 0.1, ``None`` stays ``None``.

    Use it as a pydantic ``mode="before"`` validator of a float option; raises ``ValueError`` (which pydantic
    reports as the option's error) for anything else.
    """
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            pass
    raise ValueError("give a fraction as a percent or a number, like 10% or 0.1")


def parse_choice(value, choices, message: str):
    """One of a few whole numbers from any door: ``8`` or ``"8"`` → 8 when 8 is in ``choices``; ``None`` stays
    ``None``.

    Use it as a pydantic ``mode="before"`` validator of an int option (``--bits``, ``--block-size``); anything
    else raises ``ValueError(message.format(value=value))``, e.g. ``"quantizes to 4 or 8 bits, not {value}"``.
    """
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value is not None and value not in choices:
        raise ValueError(message.format(value=value))
    return value


def fact_matches(pattern: str, fact: str) -> bool:
    """``"quantized"`` matches ``"quantized"`` and ``"quantized:4bit"``; ``"quantized:4bit"`` only itself."""
    return fact == pattern or fact.startswith(pattern + ":")


def find_fact(pattern: str, facts) -> str | None:
    """The first fact (sorted) that ``pattern`` matches (:func:`fact_matches`), or ``None``."""
    for fact in sorted(facts):
        if fact_matches(pattern, fact):
            return fact
    return None


class Step:
    """Base class of every step.

    Subclasses set ``name``, ``Params`` and the fact declarations, and implement :meth:`apply`.

    * ``requires``: fact pattern → hint shown when it is missing (e.g. ``{"masks": "run prune first"}``).
    * ``forbids``: fact pattern → reason shown when present (``{"quantized:4bit": "packed weights ..."}``).
    * ``provides`` / ``removes``: facts added / dropped after this step (see :meth:`next_facts`).
    * ``trains``: this step trains the model (the training hooks run during it).

    Facts are plain strings such as ``quantized:4bit``, ``masks``, ``adapter``, ``l1``.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    requires: ClassVar[dict[str, str]] = {}
    forbids: ClassVar[dict[str, str]] = {}
    provides: ClassVar[frozenset[str]] = frozenset()
    removes: ClassVar[frozenset[str]] = frozenset()
    trains: ClassVar[bool] = False
    #: params that name output paths: the pipeline checks each one, resolved, before anything loads
    #: (:func:`gptopt_core.kit.paths.check_output_path`); a recipe may only point them below the working directory
    path_params: ClassVar[tuple[str, ...]] = ()
    #: params that are a number of tokens fed to the model at once: checked against the model's positions
    #: once it is loaded, before the first step runs (params a step does not have are ignored)
    position_params: ClassVar[tuple[str, ...]] = ("seq_len", "calib_seq_len", "prompt_tokens")
    #: metrics of this step shown as columns of the summary table and report.md: key → (title, format spec),
    #: e.g. ``{"l1_sparsity_target": ("l1 target", ".0%")}`` (the core shows perplexity, size, sparsity, speed);
    #: numbers are formatted with the spec, text is shown as it is (see ``gptopt_register_columns``)
    columns: ClassVar[dict[str, tuple[str, str]]] = {}
    #: set by the core: the plugin that registered this step
    plugin: ClassVar[str] = "?"
    #: set by the pipeline before it plans or runs this step: the plugin set (:class:`gptopt_core.plugins.Plugins`)
    #: the run uses, e.g. to look up save formats in :meth:`check_plan` (at run time it is also ``ctx.plugins``)
    plugins: Any = None

    def __init__(self, **kwargs: Any):
        self.params = self.validate(kwargs)

    @classmethod
    def validate(cls, values: dict[str, Any]) -> Params:
        """Validate raw values (from any door) into ``cls.Params``; raises :class:`ParamsError`."""
        try:
            return cls.Params(**values)
        except pydantic.ValidationError as exc:
            raise ParamsError(format_validation_error(cls.name, exc)) from None

    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""

    # -- planning -------------------------------------------------------------------------------------
    def required_facts(self) -> dict[str, str]:
        return dict(self.requires)

    def forbidden_facts(self) -> dict[str, str]:
        return dict(self.forbids)

    def next_facts(self, facts: set[str]) -> set[str]:
        """Facts after this step, given the facts before it."""
        kept = {f for f in facts if not any(fact_matches(r, f) for r in self.removes)}
        return kept | set(self.provides)

    def check_plan(self, before: list["Step"], after: list["Step"], facts: set[str]) -> None:
        """Extra ordering checks; raise :class:`gptopt_core.PlanError` with a sentence saying what would work."""

    def preflight(self, ctx) -> None:
        """Checks that need the loaded model or tokenized data, run for every step before the first one runs
        (e.g. enough held-out tokens for one eval block); raise :class:`gptopt_core.GptoptError`."""

    def plan_facts(self) -> dict[str, Any]:
        """What this step will do, for other steps' plan checks (``check_plan`` gets the steps before and after):
        ``{fact family: details}``. Keys are fact families of :data:`gptopt_core.FACTS`; e.g. a pruning step
        returns ``{"masks": {"sparsity": 0.5, "rule": "row", "method": "wanda"}}`` (rule: ``layer`` | ``row`` |
        ``global`` | ``nm:N:M``, how the weights to zero are chosen). Default: nothing promised."""
        return {}

    def wants_original_model(self) -> bool:
        """True when :meth:`apply` will call ``ctx.original_model()`` (e.g. to distill from the model as loaded): the
        pipeline then keeps a copy of the loaded model, which costs its memory once."""
        return False

    def kl_windows(self, ctx):
        """``(token ids, block_size, stride, max_tokens)`` on which this step will measure KL from the chain's base
        model (``--kl-base auto``), or ``None``: the core computes those base logits before the first lossy step
        (``gptopt_core.kit.klbase``). ``eval`` and ``llamacpp`` answer; default ``None``."""
        return None

    # -- running --------------------------------------------------------------------------------------
    def apply(self, ctx) -> dict[str, Any]:
        """Run the step on ``ctx.model``; return metrics (JSON-serialisable dict)."""
        raise NotImplementedError

    def params_dict(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params_dict()})"


def format_validation_error(step: str, exc: pydantic.ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "params"
        if err["type"] == "extra_forbidden":
            parts.append(f"unknown option '{loc}'")
            continue
        msg = err["msg"]
        if "input" in err and err["type"] != "missing":
            msg += f" (got {shorten(repr(err['input']), 60)})"
        parts.append(f"{loc}: {msg}")
    return f"{step}: " + "; ".join(parts)
