"""The tokenizer as llama.cpp reads it: a byte-level BPE ("gpt2") vocabulary, token types, merges, special
tokens and chat template, written the way llama.cpp's converter does (``TextModel.get_vocab_base`` and
``_set_vocab_gpt2``; merges, special ids, ``add_bos`` and the chat template through gguf-py's ``SpecialVocab``).
"""
from __future__ import annotations

import json

from gptopt_core import GptoptError

#: a merge of two tokens that never occur as BPE symbols (symbols are single byte-level characters): llama.cpp
#: refuses a "gpt2" vocabulary with no merges key and GGUF cannot hold an empty array, so a tokenizer without
#: merges (the tiny test models' byte tokenizer) gets this one, which never applies
INERT_MERGE = "<|endoftext|> <|endoftext|>"


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """llama.cpp's pre-tokenizer for the tokenizer's own pre-tokenizer: ``smollm`` (digits split one by one, then
    GPT-2's byte-level regex), ``gpt-2`` (byte-level regex alone); anything else is refused."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    raise GptoptError(f"export --format gguf: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) "
                      f"has no llama.cpp equivalent here; supported: byte-level BPE (gpt-2, smollm)")


def add_vocab(writer, tokenizer, vocab_size: int, workdir) -> dict:
    """Write the tokenizer keys; returns a summary (``pre``, ``tokens``, ``merges``)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GptoptError("export --format gguf: the tokenizer is not a fast (tokenizers) tokenizer; llama.cpp needs "
                          "its BPE vocabulary and merges")
    tok_json = json.loads(backend.to_str())
    if (tok_json.get("model") or {}).get("type") != "BPE":
        raise GptoptError(f"export --format gguf: tokenizer model {tok_json.get('model', {}).get('type')} is not "
                          f"supported; supported: byte-level BPE (gpt2)")
    pre = pre_tokenizer_name(tok_json)

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = decoder[i].special if i in decoder else False
            types.append(gguf.TokenType.CONTROL if special or _looks_special(token) else gguf.TokenType.USER_DEFINED)
            tokens.append(token)
        else:
            types.append(gguf.TokenType.NORMAL)
            tokens.append(token)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)

    tokenizer.save_pretrained(str(workdir))
    special = gguf.SpecialVocab(workdir, load_merges=True, n_vocab=vocab_size)
    inert = not special.merges
    if "bos" not in special.add_special_token:  # transformers 5 no longer writes add_bos_token: observe it
        ids = tokenizer("a")["input_ids"]
        bos = tokenizer.bos_token_id
        special.add_special_token["bos"] = bool(ids) and bos is not None and ids[0] == bos
    byte_level = [p for p in ([tok_json["pre_tokenizer"]] + tok_json["pre_tokenizer"].get("pretokenizers", []))
                  if p.get("type") == "ByteLevel"]
    writer.add_add_space_prefix(bool(byte_level and byte_level[0].get("add_prefix_space")))
    if inert:
        special.merges = [INERT_MERGE]
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer_pre": pre, "vocab_tokens": len(tokens), "merges": 0 if inert else len(special.merges)}


def _looks_special(token: str) -> bool:
    """llama.cpp's converter's ``does_token_look_special``: added tokens such as ``<|...|>`` that some models do
    not mark special."""
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<unused") and token.endswith(">"))
