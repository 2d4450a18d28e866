"""SentencePiece-style vocabularies (llama.cpp tokenizer model ``llama``) from a ``tokenizer.json``: Llama 2,
Mistral, Gemma 1/2/3, Phi-3 (BPE with byte fallback) and Unigram models, or a tokenizer transformers rebuilt from
a ``.gguf`` file.

llama.cpp's ``llama`` tokenizer merges adjacent symbols by the score of the token they form, highest first
(``llm_tokenizer_spm``), where SentencePiece's ``tokenizer.model`` gives each piece a score. A ``tokenizer.json``
keeps the BPE merges in rank order instead (transformers' converter writes them from those scores), so a merged
token's score is minus the rank of its first merge; a Unigram model carries its scores. Token types follow the
converter's ``_create_vocab_sentencepiece``: ``<0xNN>`` byte tokens, the unknown token, special added tokens as
control, other added tokens user-defined (with ``▁`` written as a space), ids the tokenizer lacks as ``[PAD<i>]``.
"""
from __future__ import annotations

import re

SPACE = "\u2581"  # SentencePiece's visible space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _merge_scores(model: dict) -> dict:
    """``{token: score}`` of a BPE model: minus the rank of the first merge that forms the token."""
    scores: dict = {}
    for rank, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _base_scores(model: dict) -> tuple[dict, dict]:
    """``({token: id}, {token: score})`` of the tokenizer.json model (BPE or Unigram)."""
    if model.get("type") == "Unigram":
        pieces = model.get("vocab") or []
        return {p: i for i, (p, _) in enumerate(pieces)}, {p: float(s) for p, s in pieces}
    vocab = model.get("vocab") or {}
    merged = _merge_scores(model)
    floor = -float(len(model.get("merges") or [])) - 1.0
    # a piece no merge forms (single characters, bytes, specials) is never a merge result in llama.cpp either,
    # except a multi-character piece BPE cannot reach: it gets the lowest scores, in id order
    return vocab, {t: merged.get(t, 0.0 if len(t) == 1 or BYTE_TOKEN.fullmatch(t) else floor - i)
                   for t, i in vocab.items()}


def add_space_prefix(tok_json: dict) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (a ``Prepend`` normalizer, or a ``Metaspace``
    pre-tokenizer that prepends), which llama.cpp's ``add_space_prefix`` does."""
    norm = tok_json.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    if any(n.get("type") == "Prepend" and n.get("prepend") == SPACE for n in norms):
        return True
    pre = tok_json.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in pres)


def spm_vocab(tokenizer, tok_json: dict, vocab_size: int) -> tuple[list, list, list, bool]:
    """``(tokens, scores, token types, add_space_prefix)`` for ``vocab_size`` ids."""
    import gguf

    model = tok_json.get("model") or {}
    vocab, scores = _base_scores(model)
    unk = model.get("unk_token") if model.get("type") == "BPE" else None
    unk_id = vocab.get(unk) if unk is not None else model.get("unk_id")
    added = {t["id"]: t for t in tok_json.get("added_tokens") or []}
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    token_scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            continue
        if i in added:
            if added[i].get("special") or looks_special(token):
                types[i] = gguf.TokenType.CONTROL
            else:
                token = token.replace(SPACE, " ")
                types[i] = gguf.TokenType.USER_DEFINED
            token_scores[i] = -1000.0
        else:
            types[i] = (gguf.TokenType.UNKNOWN if i == unk_id else gguf.TokenType.BYTE if BYTE_TOKEN.fullmatch(token)
                        else gguf.TokenType.NORMAL)
            token_scores[i] = scores.get(token, 0.0)
        tokens[i] = token
    return tokens, token_scores, types, add_space_prefix(tok_json)


def looks_special(token: str) -> bool:
    """llama.cpp's converter's ``does_token_look_special``: added tokens such as ``<|...|>`` that some models do
    not mark special."""
    return token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>")) or (
        token.startswith("<\uff5c") and token.endswith("\uff5c>")) or (
        token.startswith("<unused") and token.endswith(">"))
