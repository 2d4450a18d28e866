"""The tokenizer as llama.cpp reads it, written the way llama.cpp's converter writes it (``convert_hf_to_gguf.py``).

Two kinds:

* byte-level BPE (tokenizer model ``gpt2``; ``TextModel.get_vocab_base`` and ``_set_vocab_gpt2``): tokens, token
  types, merges, and ``tokenizer.ggml.pre`` from the pre-tokenizer table (:func:`gptopt_core.pre_tokenizer_table`:
  llama.cpp's own hash identification, then the tokenizer's rules for vocabularies with other ids);
* SentencePiece-style (tokenizer model ``llama``, :mod:`.vocab_spm`): BPE with byte fallback or Unigram, with
  scores, byte tokens and ``add_space_prefix`` (Llama 2, Mistral, Gemma, Phi-3).

Special token ids, ``add_bos`` / ``add_eos`` and the chat template go through gguf-py's ``SpecialVocab`` as in the
converter. Anything else is refused in one line naming what the tokenizer is and the kinds gptopt writes.
"""
from __future__ import annotations

import json

from gptopt_core import GptoptError
from gptopt_core.kit.pretokenizers import (identify as identify_pre_tokenizer, signature_of as pre_tokenizer_signature,
                                           pre_tokenizer_table)

from . import vocab_spm
from .vocab_spm import looks_special

#: a merge of two tokens that never occur as BPE symbols (symbols are single byte-level characters): llama.cpp
#: refuses a "gpt2" vocabulary with no merges key and GGUF cannot hold an empty array, so a tokenizer without
#: merges (the tiny test models' byte tokenizer) gets this one, which never applies
INERT_MERGE = "<|endoftext|> <|endoftext|>"
KINDS = ("gptopt writes byte-level BPE (gpt2) whose pre-tokenizer llama.cpp names (the gptopt_register_pre_tokenizers "
         "table) and SentencePiece-style vocabularies (llama: BPE with byte fallback, Unigram)")


def describe(tok_json: dict) -> str:
    """What a tokenizer is, in a few words: its model, normalizer and pre-tokenizer."""
    model = tok_json.get("model") or {}
    what = [f"model {model.get('type')}" + (" with byte fallback" if model.get("byte_fallback") else "")]
    sig = pre_tokenizer_signature(tok_json)
    what.append("; ".join(s[:60] for s in sig) if sig else "no normalizer or pre-tokenizer")
    return ", ".join(what).translate({c: f"\\x{c:02x}" for c in range(32)})  # one line: regexes may hold \r \n


def tokenizer_kind(tok_json: dict) -> str:
    """``"llama"`` (SentencePiece-style) or ``"gpt2"`` (byte-level BPE); anything else is refused."""
    model = tok_json.get("model") or {}
    if model.get("type") == "Unigram" or (model.get("type") == "BPE" and model.get("byte_fallback")):
        return "llama"
    pre = tok_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if model.get("type") == "BPE" and any(p.get("type") == "ByteLevel" for p in parts):
        return "gpt2"
    raise GptoptError(f"export --format gguf: the tokenizer ({describe(tok_json)}) is of no kind llama.cpp reads "
                      f"here; {KINDS}")


def gpt2_pre(tokenizer, tok_json: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer, or a one-line refusal."""
    name = identify_pre_tokenizer(tokenizer, tok_json, pre_tokenizer_table())
    if name is None:
        raise GptoptError(f"export --format gguf: the byte-level BPE tokenizer ({describe(tok_json)}) matches no "
                          f"pre-tokenizer llama.cpp names (neither llama.cpp's hash of its ids nor its rules); "
                          f"{KINDS}")
    return name


def gpt2_tokens(tokenizer, vocab_size: int) -> tuple[list, list]:
    """Tokens and token types as ``get_vocab_base``: added tokens are control (special, or looking special) or
    user-defined, ids the tokenizer lacks are ``[PAD<i>]``."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if i in decoder and not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if (i in decoder and decoder[i].special) or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def check_tokenizer(tokenizer) -> tuple[str, str, dict]:
    """``(tokenizer model, tokenizer.ggml.pre, tokenizer.json)`` llama.cpp gets for ``tokenizer``, or a one-line
    refusal (export's preflight calls it, so a tokenizer llama.cpp cannot read is refused before the chain runs)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GptoptError(f"export --format gguf: the tokenizer ({type(tokenizer).__name__}) is not a fast "
                          f"(tokenizers) tokenizer, so its vocabulary cannot be read; {KINDS}")
    tok_json = json.loads(backend.to_str())
    kind = tokenizer_kind(tok_json)
    return kind, ("default" if kind == "llama" else gpt2_pre(tokenizer, tok_json)), tok_json


def add_vocab(writer, tokenizer, vocab_size: int, workdir) -> dict:
    """Write the tokenizer keys; returns a summary (``tokenizer_model``, ``tokenizer_pre``, ``vocab_tokens``,
    ``merges``)."""
    kind, pre, tok_json = check_tokenizer(tokenizer)
    if kind == "llama":
        tokens, scores, types, space = vocab_spm.spm_vocab(tokenizer, tok_json, vocab_size)
    else:
        tokens, types = gpt2_tokens(tokenizer, vocab_size)
        scores, space = None, _byte_level_prefix(tok_json)
    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(space)
    merges = _add_special_vocab(writer, tokenizer, vocab_size, workdir, merges=kind == "gpt2")
    return {"tokenizer_model": kind, "tokenizer_pre": pre, "vocab_tokens": len(tokens), "merges": merges}


def _add_special_vocab(writer, tokenizer, vocab_size: int, workdir, merges: bool) -> int:
    """Special ids, ``add_bos`` / ``add_eos``, chat template (and merges for ``gpt2``) through gguf-py's
    ``SpecialVocab`` reading the saved tokenizer, as the converter does; returns the number of merges written."""
    import gguf

    tokenizer.save_pretrained(str(workdir))
    special = gguf.SpecialVocab(workdir, load_merges=merges, n_vocab=vocab_size)
    ids = tokenizer("a")["input_ids"]  # transformers 5 no longer writes add_bos_token / add_eos_token: observe them
    if "bos" not in special.add_special_token:
        special.add_special_token["bos"] = bool(ids) and ids[0] == tokenizer.bos_token_id
    if "eos" not in special.add_special_token and len(ids) > 1 and ids[-1] == tokenizer.eos_token_id:
        special.add_special_token["eos"] = True  # llama.cpp's default is false: written only when added
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    inert = merges and not special.merges
    if inert:
        special.merges = [INERT_MERGE]
    special.add_to_gguf(writer, quiet=True)
    return 0 if inert or not merges else len(special.merges)


def _byte_level_prefix(tok_json: dict) -> bool:
    pre = tok_json.get("pre_tokenizer") or {}
    byte_level = [p for p in [pre, *pre.get("pretokenizers", [])] if p.get("type") == "ByteLevel"]
    return bool(byte_level and byte_level[0].get("add_prefix_space"))
