"""Tokenizers written as llama.cpp's converter writes them, on small vocabularies trained here: byte-level BPE
with each pre-tokenizer's rules gets the name llama.cpp implements those rules under (llama.cpp then cuts text as
transformers does), a plugin adds a name through ``gptopt_register_pre_tokenizers``, a tokenizer of no kind
llama.cpp reads is refused in one line before anything is written, and a Qwen2 directory gptopt saved exports.
Real shipped tokenizers: tests/test_tokenizers_real.py."""
import types

import pytest
import torch

from gptopt_core import GptoptError, hookimpl
from gptopt_core.kit.models import tiny_model

TEXT = ("Digits 3 33 333 3333 12345678 3.14\n  two  spaces,   three,\ttab\t\ttabs\n\n\nnewlines\r\n"
        "def f(x):\n    return {'a': x ** 2}  # code\ncafé naïve Ünïcödé — I've 'RE 'll don't\n"
        "中文字符 日本語のテキスト emoji 🚀🦙 ✅<|endoftext|>x")
QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
         r"|\s+(?!\S)|\s+")
LLAMA3 = QWEN2.replace(r"\p{N}|", r"\p{N}{1,3}|")


def corpus():
    import pydoc_data.topics

    numbers = " ".join(str(i * 37) for i in range(3000))  # digit merges: the rules' digit groups show in the ids
    return list(pydoc_data.topics.topics.values())[:40] + [TEXT] * 3 + [numbers]


def trained_bpe(pre_tokenizer, normalizer=None, ignore_merges=False, vocab_size=600):
    """A byte-level BPE tokenizer trained here with ``pre_tokenizer`` (merges across what the rules keep apart
    would show a wrong pre-tokenizer in llama.cpp's ids)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def rules(name):
    """The pre-tokenizer (and normalizer, ignore_merges) of the tokenizers llama.cpp names ``name``."""
    from tokenizers import Regex, normalizers
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": (pt.ByteLevel(add_prefix_space=False), None, False),
        "smollm": (pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]), None, False),
        "qwen2": (pt.Sequence([pt.Split(Regex(QWEN2), "isolated"), byte_level]), normalizers.NFC(), False),
        "llama-bpe": (pt.Sequence([pt.Split(Regex(LLAMA3), "isolated"), byte_level]), None, True),
    }[name]


def export(model, tok, path):
    from gptopt_export.gguf_writer import write_gguf

    return write_gguf(model, tok, path, "f32")


def model_for(tok, family="qwen2"):
    model, _ = tiny_model(f"tiny-random-{family}")
    model.resize_token_embeddings(len(tok))
    return model


def llamacpp_ids(path, text):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode(), add_bos=False, special=True)
        return ids, llm.detokenize(ids, special=True).decode()
    finally:
        llm.close()


@pytest.mark.parametrize("name", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_byte_level_rules_get_llamacpps_name_and_its_ids(name, tmp_path):
    """A vocabulary trained here has none of llama.cpp's hashes: the tokenizer's rules name the pre-tokenizer, and
    llama.cpp's regexes under that name cut the text as transformers does (same ids, same text back)."""
    pre, norm, ignore = rules(name)
    tok = trained_bpe(pre, norm, ignore)
    metrics = export(model_for(tok), tok, tmp_path / "m.gguf")
    assert (metrics["tokenizer_model"], metrics["tokenizer_pre"]) == ("gpt2", name)
    assert metrics["merges"] > 300
    ids, back = llamacpp_ids(tmp_path / "m.gguf", TEXT)
    assert ids == tok(TEXT)["input_ids"]
    assert back == TEXT


def test_unknown_byte_level_rules_are_refused_before_anything_is_written(tmp_path):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    tok = trained_bpe(pt.Sequence([pt.Split(Regex("[\r\n]+|\\w+|\\s+|[^\\w\\s]+"), "isolated"),
                                   pt.ByteLevel(add_prefix_space=False, use_regex=False)]), vocab_size=400)
    with pytest.raises(GptoptError, match=r"byte-level BPE tokenizer \(model BPE, Split Isolated Regex .*matches "
                                          r"no pre-tokenizer llama.cpp names.*gptopt writes byte-level BPE") as err:
        export(model_for(tok), tok, tmp_path / "m.gguf")
    assert "\n" not in str(err.value) and "Regex [\\x0d\\x0a]+|\\w+" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def wordpiece_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "a", "b", "##a", "##b"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")


def test_a_tokenizer_of_no_kind_is_one_line_exit_2_nothing_written(tmp_path):
    """On the command line: a WordPiece tokenizer is named with what gptopt writes; exit 2, no file, before the
    chain runs (export's preflight)."""
    from conftest import error_lines
    from test_bad_input import run_in_process

    model, _ = tiny_model("tiny-random-llama")
    tok = wordpiece_tokenizer()
    model.resize_token_embeddings(len(tok))
    model.config.bos_token_id = model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    proc = run_in_process("run", "-q", "--model", tmp_path / "m", "quantize", "--method", "rtn", "--bits", "4", "export", "--to",
                      tmp_path / "x.gguf", cwd=tmp_path)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "the tokenizer (model WordPiece, BertPreTokenizer) is of no kind llama.cpp reads here; gptopt writes " \
           "byte-level BPE (gpt2)" in lines[0] and "SentencePiece-style" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_a_plugin_adds_a_pre_tokenizer(tmp_path):
    """gptopt_register_pre_tokenizers: a plugin's signature names a tokenizer nothing built in matches; a name
    or a hash another plugin registered is refused, naming it."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    from gptopt_core import PreTokenizer, pre_tokenizer_table
    from gptopt_core.kit.pretokenizers import signature_of
    from gptopt_core.kit.testing import register_plugin

    tok = trained_bpe(pt.Sequence([pt.Split(Regex(r"\w+|\s+|[^\w\s]+"), "isolated"),
                                   pt.ByteLevel(add_prefix_space=False, use_regex=False)]), vocab_size=400)
    import json

    signature = signature_of(json.loads(tok.backend_tokenizer.to_str()))

    def plugin(*rows):
        @hookimpl
        def gptopt_register_pre_tokenizers(register):
            for row in rows:
                register(row)
        return types.SimpleNamespace(gptopt_register_pre_tokenizers=gptopt_register_pre_tokenizers)

    with register_plugin(plugin(PreTokenizer("words-bpe", signatures=(signature,))), "words"):
        assert pre_tokenizer_table()["words-bpe"].plugin == "words"
        assert export(model_for(tok), tok, tmp_path / "m.gguf")["tokenizer_pre"] == "words-bpe"
    assert "words-bpe" not in pre_tokenizer_table()
    llama3 = pre_tokenizer_table()["llama-bpe"].hashes[0]
    for row, why in [(PreTokenizer("qwen2", signatures=(("x",),)), "'qwen2' is already registered by gptopt-export"),
                     (PreTokenizer("mine", hashes=(llama3,)), "already identifies 'llama-bpe' \\(gptopt-export\\)"),
                     (PreTokenizer("empty"), "neither hashes nor signatures")]:
        with pytest.raises(GptoptError, match=why):
            with register_plugin(plugin(row), "bad"):
                pass


def test_qwen2_directory_saved_by_gptopt_exports(tmp_path):
    """transformers 5 reloads a saved Qwen2 directory with Qwen2's own tokenizer class (Split + ByteLevel), whatever
    tokenizer was saved: its rules name llama.cpp's qwen2, and llama.cpp reads the text as transformers does."""
    from gptopt_core.kit.models import load_local_dir

    model, tok = tiny_model("tiny-random-qwen2")
    model.save_pretrained(tmp_path / "q")
    tok.save_pretrained(tmp_path / "q")
    loaded = load_local_dir(tmp_path / "q", {})
    assert type(loaded.tokenizer).__name__.startswith("Qwen2Tokenizer")
    metrics = export(loaded.model, loaded.tokenizer, tmp_path / "q.gguf")
    assert (metrics["tokenizer_model"], metrics["tokenizer_pre"]) == ("gpt2", "qwen2")
    text = TEXT.replace("<|endoftext|>", "")
    ids, back = llamacpp_ids(tmp_path / "q.gguf", text)
    assert ids == loaded.tokenizer(text, add_special_tokens=False)["input_ids"] and back == text


def sentencepiece_bpe():
    """A Llama-2-style tokenizer trained here: BPE with byte fallback over ``▁``-for-space text, `<unk>`, `<s>`,
    `</s>` and the 256 byte tokens first in the vocabulary (CJK and emoji the training text lacks fall back to
    bytes)."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.train_from_iterator([line for doc in corpus()[:20] for line in doc.splitlines()],
                            trainers.BpeTrainer(vocab_size=500, show_progress=False))
    spec = json.loads(tok.to_str())
    first = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    rest = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]) if t not in first]
    spec["model"]["vocab"] = {t: i for i, t in enumerate(first + rest)}
    spec["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(first[:3])]
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_bpe_is_written_as_llama(tmp_path):
    """Scores from the merge ranks, byte tokens, add_space_prefix: llama.cpp's SentencePiece tokenizer gives
    transformers' ids (byte fallback for what the vocabulary lacks) and the text back."""
    import gguf

    tok = sentencepiece_bpe()
    metrics = export(model_for(tok, "llama"), tok, tmp_path / "m.gguf")
    assert (metrics["tokenizer_model"], metrics["tokenizer_pre"]) == ("llama", "default")
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types_ = list(reader.fields["tokenizer.ggml.token_type"].contents())
    assert types_[3:259] == [gguf.TokenType.BYTE] * 256 and types_[1] == gguf.TokenType.CONTROL
    assert reader.fields["tokenizer.ggml.add_space_prefix"].contents() is True
    text = TEXT.replace("<|endoftext|>", "</s>")
    assert llamacpp_ids(tmp_path / "m.gguf", text)[0] == tok(text, add_special_tokens=False)["input_ids"]
    plain = text.replace("</s>", "")  # llama.cpp writes the space prefix after a special token back as a space
    ids, back = llamacpp_ids(tmp_path / "m.gguf", plain)
    assert ids == tok(plain, add_special_tokens=False)["input_ids"] and back == " " + plain


def test_unigram_scores_are_written():
    """A Unigram model's own scores become llama.cpp's token scores (as the converter copies a SentencePiece
    model's), with its unknown token typed so."""
    import gguf
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from gptopt_export.vocab_spm import spm_vocab

    pieces = [("<unk>", 0.0), ("\u2581a", -1.5), ("b", -2.5), ("<0x41>", 0.0)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=0, byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    import json

    tokens, scores, types_, space = spm_vocab(tok, json.loads(backend.to_str()), 5)
    assert tokens == ["<unk>", "\u2581a", "b", "<0x41>", "[PAD4]"] and scores[1:3] == [-1.5, -2.5] and space
    assert types_ == [gguf.TokenType.UNKNOWN, gguf.TokenType.NORMAL, gguf.TokenType.NORMAL, gguf.TokenType.BYTE,
                      gguf.TokenType.UNUSED]
