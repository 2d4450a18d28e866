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

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import GptoptError


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
    head: str = "untied"
    #: ``config -> [(gguf-py GGUFWriter method, value)]``: keys beyond the common ones (softcaps, windows, ...)
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
    norm: str = "rmsnorm"
    #: norms beyond the pre-attention / pre-MLP pair, relative to the block (Qwen3's q/k norms, Gemma's post-norms)
    extra_norms: tuple = ()
    #: rotary layout: ``"rotate_half"`` (HF's), ``"partial rotate_half"`` (a fraction of each head), ``"learned
    #: positions"`` (GPT-2)
    rotary: str = "rotate_half"
    #: ``"none"`` or ``"sqrt(hidden_size)"`` (Gemma multiplies embeddings by it)
    embedding_scale: str = "none"
    #: whether the family's checkpoints usually tie the head to the embedding (a model's own config decides)
    tied_head: str = "config"
    #: ``vocab_size -> transformers config`` of a tiny random model (2 blocks, hidden 64) for tests
    tiny: Optional[Callable[[int], Any]] = None
    #: how llama.cpp writes it; ``None``: no GGUF export
    gguf: Optional[GgufLayout] = None
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
    if arch.model_type in new:
        return f"registers architecture '{arch.model_type}' twice"
    return None


def architecture_table(plugins=None) -> dict:
    """``{model_type: Architecture}``: every family the loaded plugins registered (``gptopt_register_architectures``),
    the core's first. A plugin that registers a ``model_type`` already taken is rejected when it loads."""
    plugins = plugins if plugins is not None else _registry()
    return dict(plugins.architectures) if plugins is not None else {}


def architecture_of(model, plugins=None) -> Optional[Architecture]:
    """The family of ``model`` (a transformers model, or a PEFT model around one) by ``config.model_type``;
    ``None`` when the table has no such family."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    return architecture_table(plugins).get(kind) if isinstance(kind, str) else None


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
