"""The architecture table: each model family described once, as data, for the core and every plugin.

A family (:class:`Architecture`) says where a model's transformer blocks are, what its linear layers are called and
in which order a block computes them (the calibration engine's sequential groups and LoRA's ``auto`` targets), how
its head, norms, rotary embedding and embedding scale work, how to build a tiny random model of it from a
``transformers`` config (for tests), and how llama.cpp's ``convert_hf_to_gguf.py`` writes it (:class:`GgufLayout`:
GGUF architecture name, row layouts, norm shift, extra keys, and what llama.cpp would compute differently).

The core registers the built-in families through the ``gptopt_register_architectures`` hook, exactly as a plugin
adds one; :func:`architecture_table` collects them and :func:`architecture_of` finds a model's family by its
``config.model_type``. A model whose family is not in the table still runs every step that needs no names (the
engine finds its blocks by shape); steps that need the table (``export --format gguf``) refuse it in one line
naming the supported families and the hook.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, get_args

from .errors import GptoptError

#: the documented vocabulary of a row's values (:func:`check_architecture` refuses others)
Norm = Literal["rmsnorm", "rmsnorm(1+w)", "layernorm"]
Rotary = Literal["rotate_half", "partial rotate_half", "learned positions"]
EmbeddingScale = Literal["none", "sqrt(hidden_size)"]
TiedHead = Literal["config", "tied", "untied"]
GgufHead = Literal["untied", "always"]


@dataclass(frozen=True)
class GgufLayout:
    """How llama.cpp's converter writes a family (``convert_hf_to_gguf.py``, gguf-py's ``tensor_mapping.py``).

    Tensor names come from gguf-py's ``TensorNameMap`` for :attr:`arch` (the converter's own mapping); this says
    only what differs from a plain copy.
    """

    #: llama.cpp architecture name (gguf-py ``MODEL_ARCH_NAMES``), e.g. ``"qwen2"``
    arch: str
    #: the (q, k) layers, relative to the block, whose rows llama.cpp's rotary layout interleaves per head
    #: (``LlamaModel.permute``); empty: none
    permute_qk: tuple = ()
    #: the fused qkv layer stored per head ``[head, (q, k, v), dim]`` (GPT-NeoX); llama.cpp wants ``[q; k; v]``
    qkv_per_head: str = ""
    #: added to every ``*norm.weight`` (Gemma's RMSNorm scales by ``1 + w``, llama.cpp's by ``w``)
    norm_shift: float = 0.0
    #: ``"untied"``: ``output.weight`` only for a separate head (llama.cpp reuses ``token_embd`` otherwise);
    #: ``"always"``: written even when tied (GPT-2's converter does)
    head: GgufHead = "untied"
    #: ``config -> [(gguf-py GGUFWriter method, value)]``: keys beyond the common ones (softcaps, windows, ...); each
    #: method name starts with ``add_`` (``("add_attn_logit_softcapping", 50.0)``)
    hparams: Optional[Callable[[Any], list]] = None
    #: ``config -> sentence or None``: what llama.cpp would compute differently (an activation, a rope scaling)
    refusal: Optional[Callable[[Any], Optional[str]]] = None
    #: ``config -> sentence or None``: a sliding window llama.cpp does not apply (it attends to the whole context),
    #: so results differ from transformers past the window; refused unless the user accepts it (``export
    #: --ignore-sliding-window``)
    window_ignored: Optional[Callable[[Any], Optional[str]]] = None
    #: ``config -> [(GGUF tensor name, list of floats)]``: tensors the converter computes from the config (Llama 3's
    #: ``rope_freqs``), written in f32
    extra_tensors: Optional[Callable[[Any], list]] = None


@dataclass(frozen=True)
class Architecture:
    """One model family. Names of layers inside a block are relative to the block (``self_attn.q_proj``)."""

    #: ``config.model_type`` of the family, e.g. ``"qwen2"``, ``"gemma3_text"``
    model_type: str
    #: short name: ``tiny-random-<name>`` builds the family's tiny test model
    name: str
    #: qualified name of the ``ModuleList`` of transformer blocks, e.g. ``"model.layers"``
    blocks: str
    #: the block's linear layers in the order it computes them; one tuple per group of layers reading the same
    #: input (q/k/v -> o -> gate/up -> down; fused qkv / gate_up where the family fuses them)
    groups: tuple
    #: qualified names of the token embedding, the final norm and the output head
    embedding: str
    final_norm: str
    head: str = "lm_head"
    #: ``"rmsnorm"``, ``"rmsnorm(1+w)"`` (Gemma) or ``"layernorm"`` (with bias)
    norm: Norm = "rmsnorm"
    #: norms beyond the pre-attention / pre-MLP pair, relative to the block (Qwen3's q/k norms, Gemma's post-norms)
    extra_norms: tuple = ()
    #: rotary layout: ``"rotate_half"`` (HF's), ``"partial rotate_half"`` (a fraction of each head), ``"learned
    #: positions"`` (GPT-2)
    rotary: Rotary = "rotate_half"
    #: ``"none"`` or ``"sqrt(hidden_size)"`` (Gemma multiplies embeddings by it)
    embedding_scale: EmbeddingScale = "none"
    #: whether the head is tied to the embedding: ``"config"`` (a model's own config decides), ``"tied"``, ``"untied"``
    tied_head: TiedHead = "config"
    #: ``vocab_size -> transformers config`` of a tiny random model (2 blocks, hidden 64) for tests
    tiny: Optional[Callable[[int], Any]] = None
    #: how llama.cpp writes it; ``None``: no GGUF export
    gguf: Optional[GgufLayout] = None
    #: how a mixture-of-experts family holds its experts (:class:`gptopt_core.MoeLayout`); ``None``: dense
    moe: Optional[Any] = None
    #: anything a user should know (one sentence)
    notes: str = ""
    #: set by the registry: the plugin that registered the family
    plugin: str = field(default="", compare=False)

    @property
    def linear_layers(self) -> tuple:
        """Every linear layer of a block, in compute order."""
        return tuple(name for group in self.groups for name in group)

    @property
    def lora_targets(self) -> tuple:
        """Leaf names of the block's linear layers (LoRA's ``--target-modules auto``)."""
        return tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name in self.linear_layers))


_registry: Callable[[], Any] = lambda: None  # the process-wide plugin set; plugins.py sets it (no import circle)


def use_registry(get_plugins: Callable[[], Any]) -> None:
    """Where :func:`architecture_table` finds the plugins when it is given none (``gptopt_core.get_plugins``)."""
    global _registry
    _registry = get_plugins


def refusal(arch, table: dict, new: dict) -> Optional[str]:
    """Why a plugin may not register ``arch`` beside ``table`` (the registered families) and ``new`` (its own so
    far); ``None`` when it may."""
    if not isinstance(arch, Architecture) or not isinstance(arch.model_type, str) or not arch.model_type:
        return f"registered {arch!r} as an architecture: give a gptopt_core.Architecture with a model_type"
    if arch.model_type in table:
        return f"architecture '{arch.model_type}' is already registered by {table[arch.model_type].plugin}"
    problem = _field_problem(arch)
    if problem:
        return f"architecture '{arch.model_type}': {problem}"
    if arch.model_type in new:
        return f"registers architecture '{arch.model_type}' twice"
    return None


def architecture_table(plugins=None) -> dict:
    """``{model_type: Architecture}``: every family the loaded plugins registered (``gptopt_register_architectures``),
    the core's first. A plugin that registers a ``model_type`` already taken is rejected when it loads."""
    plugins = plugins if plugins is not None else _registry()
    return dict(plugins.architectures) if plugins is not None else {}


_checked: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> the row it was checked against


def architecture_of(model, plugins=None) -> Optional[Architecture]:
    """The family of ``model`` (a transformers model, or a PEFT model around one) by ``config.model_type``;
    ``None`` when the table has no such family. The first match of a model is checked with
    :func:`check_architecture` (a wrong row raises :class:`gptopt_core.GptoptError` here)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    arch = architecture_table(plugins).get(kind) if isinstance(kind, str) else None
    if arch is not None and hasattr(base, "named_modules") and _checked.get(base) is not arch:
        check_architecture(base, arch)
        _checked[base] = arch
    return arch


def check_architecture(model, row: Architecture) -> None:
    """Check the architecture table's ``row`` against ``model`` (one of its family; a PEFT wrapper is looked
    through): every named path exists (``blocks`` is a non-empty ``ModuleList``; the embedding, final norm and head;
    in every block each layer of ``groups``, each of ``extra_norms`` and the GGUF layout's layers), ``groups`` name
    every linear / ``Conv1D`` layer of a block exactly once, and the values are in their documented vocabulary
    (``norm``: :data:`Norm`, ``rotary``: :data:`Rotary`, ``embedding_scale``: :data:`EmbeddingScale`,
    ``tied_head``: :data:`TiedHead`, ``gguf.head``: :data:`GgufHead`; ``gguf.hparams(config)`` a list of
    ``("add_...", value)`` pairs). The core calls it when it first matches a model to a row
    (:func:`architecture_of`); a plugin's tests call it on the family's tiny model.

    :raises GptoptError: one line, ``architecture 'MODEL_TYPE' (plugin NAME): what is wrong``.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    problem = _field_problem(row) or _path_problem(base, row) or _hparams_problem(base, row)
    if problem:
        who = f" (plugin {row.plugin})" if row.plugin else ""
        raise GptoptError(f"architecture '{row.model_type}'{who}: {problem}")


def _field_problem(row) -> Optional[str]:
    for name, vocab in (("norm", Norm), ("rotary", Rotary), ("embedding_scale", EmbeddingScale),
                        ("tied_head", TiedHead)):
        if getattr(row, name) not in get_args(vocab):
            return f"{name} is {getattr(row, name)!r}, not one of {', '.join(map(repr, get_args(vocab)))}"
    if row.gguf is not None and row.gguf.head not in get_args(GgufHead):
        return f"gguf.head is {row.gguf.head!r}, not one of {', '.join(map(repr, get_args(GgufHead)))}"
    names = [row.blocks, row.embedding, row.final_norm, row.head, *row.extra_norms]
    groups_ok = isinstance(row.groups, tuple) and row.groups and all(isinstance(g, tuple) and g for g in row.groups)
    if not groups_ok or not all(isinstance(n, str) and n for n in names + list(row.linear_layers)):
        return "blocks, embedding, final_norm, head and extra_norms are names, groups a tuple of tuples of names"
    twice = sorted({n for n in row.linear_layers if row.linear_layers.count(n) > 1})
    return f"groups name {twice[0]} more than once" if twice else None


def _path_problem(model, row) -> Optional[str]:
    from torch.nn import ModuleList

    from .kit.layertypes import is_weight_layer

    modules = dict(model.named_modules())
    blocks = modules.get(row.blocks)
    if not isinstance(blocks, ModuleList) or not len(blocks):
        lists = [n for n, m in modules.items() if isinstance(m, ModuleList) and len(m)]
        return f"blocks '{row.blocks}' is not a ModuleList of the model (its lists: {', '.join(lists) or 'none'})"
    for what in ("embedding", "final_norm", "head"):
        if getattr(row, what) not in modules:
            return f"{what} '{getattr(row, what)}' is not a module of the model"
    gguf = row.gguf.permute_qk + ((row.gguf.qkv_per_head,) if row.gguf.qkv_per_head else ()) if row.gguf else ()
    moe = tuple(n for n in (row.moe.experts, row.moe.router, row.moe.shared, row.moe.shared_gate) if n) \
        if row.moe is not None else ()
    named = row.linear_layers
    for i, block in enumerate(blocks):
        inner = dict(block.named_modules())
        for what, names in (("groups", named), ("extra_norms", row.extra_norms), ("gguf", gguf), ("moe", moe)):
            missing = [n for n in names if n not in inner]
            if missing:
                return f"{what} name '{missing[0]}', which block {i} ({row.blocks}.{i}) does not have"
        for name, module in inner.items():
            if is_weight_layer(module) and not any(name == n or name.startswith(n + ".") for n in named):
                return f"block {i}'s linear layer '{name}' is in no group (groups list every linear layer of a block)"
    return None


def _hparams_problem(model, row) -> Optional[str]:
    if row.gguf is None or row.gguf.hparams is None:
        return None
    try:
        pairs = list(row.gguf.hparams(model.config))
    except Exception as exc:  # a row's function fails on its own family's config
        return f"gguf.hparams(config) raised {type(exc).__name__}: {exc}"
    bad = [p for p in pairs if not (isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str)
                                    and p[0].startswith("add_"))]
    return f"gguf.hparams(config) gave {bad[0]!r}, not a (\"add_...\", value) pair" if bad else None


def unsupported(model, what: str, plugins=None) -> GptoptError:
    """The one-line error for a step that needs the table and a model whose family is not in it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    known = ", ".join(sorted(architecture_table(plugins)))
    return GptoptError(f"{what}: architecture '{kind}' is not in the architecture table; supported: {known} "
                       f"(a plugin adds a family with the gptopt_register_architectures hook)")


def tiny_names(plugins=None) -> list:
    """``tiny-random-<name>`` of every family with a tiny config."""
    return [f"tiny-random-{a.name}" for a in architecture_table(plugins).values() if a.tiny is not None]
