"""The byte-level BPE pre-tokenizers gptopt can name for llama.cpp (GGUF key ``tokenizer.ggml.pre``), as data a plugin
extends with the ``gptopt_register_pre_tokenizers`` hook.

llama.cpp runs its own pre-tokenizer (a list of regexes chosen by name), so a ``gpt2`` vocabulary is only read right
when its name is the one llama.cpp implements for that tokenizer. llama.cpp's converter (``get_vocab_base_pre`` in
``convert_hf_to_gguf.py``) identifies it by a hash: the sha256 of ``str(tokenizer.encode(CHECK_TEXT))``; a
:class:`PreTokenizer` carries those hashes (:func:`check_hash` computes one), and a ``signature`` (the
``tokenizer.json`` pre-tokenizer, normalizer and merge rule, :func:`signature_of`) for vocabularies with other ids:
a retrained, truncated or tiny test vocabulary with the same rules. The built-in rows (llama.cpp's whole hash table,
signatures for the families gptopt tests) are registered by the export plugin.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

#: llama.cpp's check string (``chktxt`` of ``get_vocab_base_pre``), character for character
CHECK_TEXT = '\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, \'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL'


@dataclass(frozen=True)
class PreTokenizer:
    """One name llama.cpp's ``tokenizer.ggml.pre`` takes, and how to recognise a tokenizer that needs it."""

    #: the name llama.cpp reads, e.g. ``"llama-bpe"``, ``"qwen2"`` (``llama_vocab::impl::load``)
    name: str
    #: :func:`check_hash` values of tokenizers that use it (llama.cpp's converter's ``chkhsh`` table)
    hashes: tuple = ()
    #: :func:`signature_of` values: the same rules with another vocabulary (ids differ, so the hash does too)
    signatures: tuple = ()
    #: set by the registry: the plugin that registered it
    plugin: str = field(default="", compare=False)


def check_hash(tokenizer) -> str:
    """llama.cpp's converter's identification of a tokenizer: sha256 of ``str(tokenizer.encode(CHECK_TEXT))``."""
    return hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def signature_of(tokenizer_json: dict) -> tuple:
    """The rules of a ``tokenizer.json`` that decide how text is cut before BPE: its normalizer, each
    pre-tokenizer (``Split`` with its pattern, ``ByteLevel`` with or without GPT-2's regex, ``Digits``) and whether
    whole words in the vocabulary skip the merges (``ignore_merges``), as a tuple of strings."""
    parts = []
    norm = tokenizer_json.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    parts += [f"normalizer {n.get('type')}" for n in norms]
    pre = tokenizer_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    for p in pres:
        kind = p.get("type")
        if kind == "Split":
            pattern = p.get("pattern") or {}
            parts.append(f"Split {p.get('behavior')} {'invert ' if p.get('invert') else ''}"
                         f"{'Regex' if 'Regex' in pattern else 'String'} {pattern.get('Regex', pattern.get('String'))}")
        elif kind == "ByteLevel":
            parts.append("ByteLevel" + ("" if p.get("use_regex", True) else " no regex")
                         + (" add_prefix_space" if p.get("add_prefix_space") else ""))
        elif kind == "Digits":
            parts.append("Digits" + (" individual" if p.get("individual_digits") else ""))
        else:
            parts.append(str(kind))
    if (tokenizer_json.get("model") or {}).get("ignore_merges"):
        parts.append("ignore_merges")
    return tuple(parts)


_registry: Callable[[], Any] = lambda: None  # the process-wide plugin set; plugins.py sets it


def use_registry(get_plugins: Callable[[], Any]) -> None:
    """Where :func:`pre_tokenizer_table` finds the plugins when it is given none."""
    global _registry
    _registry = get_plugins


def refusal(pre, table: dict, new: dict) -> Optional[str]:
    """Why a plugin may not register ``pre`` beside ``table`` (registered names) and ``new`` (its own so far)."""
    if not isinstance(pre, PreTokenizer) or not isinstance(pre.name, str) or not pre.name:
        return f"registered {pre!r} as a pre-tokenizer: give a gptopt_core.PreTokenizer with a name"
    if not pre.hashes and not pre.signatures:
        return f"pre-tokenizer '{pre.name}' has neither hashes nor signatures: nothing would match it"
    for name, other in [*table.items(), *new.items()]:
        owner = "this plugin" if name in new else other.plugin
        if name == pre.name:
            return f"pre-tokenizer '{pre.name}' is already registered by {owner}"
        taken = set(pre.hashes) & set(other.hashes) or set(pre.signatures) & set(other.signatures)
        if taken:
            return f"pre-tokenizer '{pre.name}': {sorted(taken)[0]!r} already identifies '{name}' ({owner})"
    return None


def pre_tokenizer_table(plugins=None) -> dict:
    """``{name: PreTokenizer}``: every pre-tokenizer the loaded plugins registered."""
    plugins = plugins if plugins is not None else _registry()
    return dict(getattr(plugins, "pre_tokenizers", {})) if plugins is not None else {}


def identify(tokenizer, tokenizer_json: dict, table: dict) -> Optional[str]:
    """The name for ``tokenizer``: by llama.cpp's hash first (as its converter), else by signature; ``None``."""
    digest = check_hash(tokenizer)
    for pre in table.values():
        if digest in pre.hashes:
            return pre.name
    signature = signature_of(tokenizer_json)
    for pre in table.values():
        if signature in pre.signatures:
            return pre.name
    return None
