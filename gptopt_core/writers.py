"""Writers: the one registry of ways to write a model out, directories (``save --format``) and files (``export
--format``).

A writer is a :class:`Writer` subclass a plugin registers through ``gptopt_register_writers(register)`` (or, the
first contract's name, ``gptopt_register_save_formats``). It says what it writes (:attr:`Writer.kind`: a
``directory`` or a ``file``) and which models it is for, by **facts** (:attr:`Writer.facts`, e.g.
``quantized:cpu-int8``, ``quantized:4bit``, ``quantized:grid``), never by attributes another plugin put on the
model. ``save --format NAME`` picks among the directory writers, ``export --format NAME`` among the file writers;
``auto`` takes the first writer of the kind that claims the model's facts (plugins' before the core's, writers of
particular facts before the ``fallback`` ones that hold any model) and does not refuse it.

A writer may *specialize* another (:attr:`Writer.specializes`): it writes that writer's format for the models it
claims. The core's ``safetensors`` is ``save_pretrained``; for a bitsandbytes model it is the ``bitsandbytes``
writer's layout, for a cpu-fast model the ``cpu-fast`` writer's: ``save --format safetensors`` (and ``auto``) hand
such a model to the specializing writer its facts name (:func:`specialized`). A writer refuses what it cannot hold
with one sentence that names a format or option that can; the step turns that into a one-line error (exit 2)
before anything is written.
"""
from __future__ import annotations

from .errors import GptoptError, PlanError
from .steps import find_fact

AUTO = "auto"
DIRECTORY = "directory"
FILE = "file"
KINDS = (DIRECTORY, FILE)
#: the step that writes each kind, for messages
STEP_OF = {DIRECTORY: "save", FILE: "export"}


class Writer:
    """One way of writing a model out: a directory (``save --format``) or a file (``export --format``). Subclass
    it, set :attr:`name`, :attr:`summary`, :attr:`kind` and the :attr:`facts` it is for, implement :meth:`write`,
    and override the checks where it cannot hold every model. ``SaveFormat`` is the same class (its first name).

    ``options`` is the writing step's parameters as a dict (``save``: ``to``, ``format``, ``allow_dequantized``,
    ...; ``export``: ``to``, ``format``, ``type``, ...).
    """

    #: the ``--format`` value, e.g. ``"compressed-tensors"``
    name: str = ""
    #: one line for ``gptopt steps save`` / ``export`` and docs: what the writer holds
    summary: str = ""
    #: ``"directory"`` (``save --format``) or ``"file"`` (``export --format``)
    kind: str = DIRECTORY
    #: fact patterns this writer is for: ``auto`` picks it for a model with any of them (``quantized`` matches
    #: ``quantized:4bit``; :func:`gptopt_core.fact_matches`)
    facts: frozenset = frozenset()
    #: ``True``: ``auto`` picks it for any model no writer of particular facts claims (the core's safetensors)
    fallback: bool = False
    #: a file writer's file name endings, e.g. ``(".gguf",)``; ``export --to`` must end in one (none: any name)
    suffixes: tuple = ()
    #: the writer whose format this one writes for the models it claims (e.g. ``"safetensors"``), or ``None``
    specializes: str | None = None
    #: a file writer that publishes its file itself: :meth:`write` gets ``--to`` and writes it atomically (a
    #: temporary name beside it, then :func:`gptopt_core.publish_file` with ``options["overwrite"]``)
    atomic: bool = False

    def claims_facts(self, facts) -> bool:
        """Whether a model with these facts is what this writer is for (:attr:`fallback`, or one of :attr:`facts`)."""
        return self.fallback or any(find_fact(pattern, facts) for pattern in self.facts)

    def plan_refusal(self, facts: set, options: dict) -> str | None:
        """Before any model loads: a sentence saying why a model with these facts cannot be held, or ``None``."""
        return None

    def claims(self, ctx, model) -> bool:
        """Whether ``auto`` should pick this writer for ``model``: by default, whether the run's facts
        (``ctx.facts``) are what it is for (:meth:`claims_facts`)."""
        return self.claims_facts(set(getattr(ctx, "facts", None) or ()))

    def refusal(self, ctx, model, options: dict) -> str | None:
        """On the model, before writing: a sentence saying what this writer cannot hold and which format or
        option can, or ``None``."""
        return None

    def write(self, ctx, model, path, options: dict):
        """Write ``model`` to ``path``: for a directory writer an empty temporary directory the ``save`` step
        renames afterwards (the tokenizer, recipe.yaml and run.json are written by the core); for a file writer an
        empty temporary file beside ``--to`` that ``export`` moves onto it (``--to`` itself if :attr:`atomic`). Return ``None`` or a dict of metrics
        for the step's record. Raise :class:`gptopt_core.GptoptError` for a model it cannot hold after all; what
        was written is removed."""
        raise NotImplementedError


def _ordered(plugins) -> list[tuple[str, type]]:
    """Registered writers as ``(name, class)``, plugins' before the core's, each in registration order."""
    def core(owner):
        info = plugins.info.get(owner)
        return bool(info and info.builtin)

    return [(name, cls) for name, (_, cls) in sorted(plugins.formats.items(), key=lambda item: core(item[1][0]))]


def registered_writers(plugins, kind: str | None = DIRECTORY) -> dict:
    """``{name: Writer instance}`` of the writers ``plugins`` (a :class:`gptopt_core.plugins.Plugins`) registered,
    of one ``kind`` (``None``: all), plugins' first and the core's last; ``auto`` tries them in :func:`auto_order`."""
    return {name: cls() for name, cls in _ordered(plugins) if kind is None or getattr(cls, "kind", DIRECTORY) == kind}


def auto_order(found: dict) -> list:
    """The writers ``auto`` tries, in order: those of particular facts, then the fallbacks; never a writer that
    specializes another (it is reached through the one it specializes)."""
    mains = [w for w in found.values() if not w.specializes]
    return [w for w in mains if not w.fallback] + [w for w in mains if w.fallback]


def format_names(plugins, kind: str = DIRECTORY) -> list[str]:
    return [AUTO] + sorted(registered_writers(plugins, kind))


def _unknown(plugins, name: str, kind: str) -> str:
    return f"{STEP_OF[kind]}: unknown format '{name}'; known formats: {', '.join(format_names(plugins, kind))}"


def plan_choice(plugins, options: dict, facts: set, kind: str = DIRECTORY) -> Writer | None:
    """Before any model loads: the writer ``--format`` names, or (``auto``) the first that claims these facts and
    does not refuse them; ``None`` when ``auto`` depends on a writer that decides on the model itself. Raises
    :class:`PlanError` for an unknown name, a named writer that refuses these facts, or an ``auto`` no writer
    holds."""
    name = options.get("format", AUTO)
    found = registered_writers(plugins, kind)
    step = STEP_OF[kind]
    if name != AUTO:
        if name not in found:
            raise PlanError(_unknown(plugins, name, kind))
        reason = found[name].plan_refusal(set(facts), options)
        if reason:
            raise PlanError(f"{step} --format {name}: {reason}")
        return found[name]
    reasons = []
    for writer in auto_order(found):
        if type(writer).claims is not Writer.claims:
            return None  # a writer of the first contract claims by the model: decided once it is loaded
        if not writer.claims_facts(set(facts)):
            continue
        reason = writer.plan_refusal(set(facts), options)
        if reason is None:
            return writer
        reasons.append(f"{writer.name}: {reason}")
    raise PlanError(f"{step}: no format holds this model (" + "; ".join(reasons or ["no format claims it"]) + ")")


def check_plan(plugins, options: dict, facts: set, kind: str = DIRECTORY) -> None:
    """Plan-time checks of ``--format``: a known name, and facts the named writer can hold. ``auto`` is checked
    on the model (:func:`choose`) for directories; for files (:func:`plan_choice`) already here."""
    name = options.get("format", AUTO)
    if name != AUTO or kind == FILE:
        plan_choice(plugins, options, facts, kind)


def choose(ctx, model, options: dict, kind: str = DIRECTORY) -> Writer:
    """The writer for ``model``: the named one if it holds the model, else (``auto``) the first in
    :func:`auto_order` that claims it and holds it. Raises :class:`GptoptError` with the reason otherwise (nothing
    has been written)."""
    name = options.get("format", AUTO)
    found = registered_writers(ctx.plugins, kind)
    step = STEP_OF[kind]
    if name != AUTO:
        if name not in found:
            raise GptoptError(_unknown(ctx.plugins, name, kind))
        reason = found[name].refusal(ctx, model, options)
        if reason:
            raise GptoptError(f"{step} --format {name}: {reason}")
        return found[name]
    reasons = []
    for writer in auto_order(found):
        if not writer.claims(ctx, model):
            continue
        reason = writer.refusal(ctx, model, options)
        if reason is None:
            return writer
        reasons.append(f"{writer.name}: {reason}")
    raise GptoptError(f"{step}: no format holds this model (" + "; ".join(reasons or ["no format claims it"]) + ")")


def specialized(ctx, model, general: str) -> Writer | None:
    """The registered writer that specializes ``general`` (e.g. ``"safetensors"``) and claims ``model`` by the
    run's facts (the first, plugins' before the core's), or ``None``: ``general``'s own way then."""
    plugins = getattr(ctx, "plugins", None)
    if plugins is None:
        return None
    found = registered_writers(plugins, None).values()
    return next((w for w in found if w.specializes == general and w.claims(ctx, model)), None)


def refusal(cls, table: dict, new: dict) -> str | None:
    """Why a plugin may not register the writer class ``cls`` beside ``table`` (``{name: (plugin, class)}``) and
    ``new`` (its own so far); ``None`` when it may."""
    if not (isinstance(cls, type) and issubclass(cls, Writer)) or not cls.name:
        return f"registered {cls!r} as a save format: give a gptopt_core.SaveFormat (Writer) subclass with a name"
    if cls.kind not in KINDS:
        return f"writer '{cls.name}': kind must be one of {', '.join(KINDS)}, not {cls.kind!r}"
    if cls.name == AUTO or cls.name in table or cls.name in new:
        owner = ("the core (auto picks a format)" if cls.name == AUTO else
                 "this plugin" if cls.name in new else f"plugin {table[cls.name][0]}")
        return f"{'save' if cls.kind == DIRECTORY else 'export'} format '{cls.name}' is already registered by {owner}"
    return None
