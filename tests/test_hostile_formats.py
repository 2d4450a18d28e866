"""The file formats added in round 2 as hostile input (issue 29): the run lock, model directories, GGUF files,
compressed-tensors configs, plan files, non-regular files, llama.cpp's abort cases, exit codes.

Every table case runs ``gptopt run`` in this process (the console entry point, no interpreter start) and must
exit with the documented code in one or two stderr lines, no traceback, nothing written in its working directory
outside --out (nor through a link out of it; most cases fail before --out is made), in under 10 s and 500 MB of
peak memory above what the process held when the case began: each case resets the kernel's high-water mark of
the process (``/proc/self/clear_refs``) and reads it back after (``VmHWM``), so an earlier case's peak hides nothing.
A fresh interpreter per case would import torch 122 times; the reset measures the same growth in this process.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from conftest import ROOT, error_lines, peak_memory_mb, reset_peak_memory
from hostile_files import copy_model_dir, rewrite_gguf
from test_bad_input import run_in_process

G2, LL = "tiny-random-gpt2", "tiny-random-llama"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Clean originals: tiny GPT-2 / Llama directories, their f32 GGUF exports, a compressed-tensors directory."""
    from gptopt_core import Pipeline, tiny_model

    d = tmp_path_factory.mktemp("originals")
    for name in (G2, LL):
        model, tok = tiny_model(name)
        model.save_pretrained(d / name)
        tok.save_pretrained(d / name)
        Pipeline(model=name, quiet=True).add("export", to=str(d / f"{name}.gguf"), type="f32").run()
    Pipeline(model=LL, quiet=True).add("quantize", method="rtn", bits=4, group_size=32).add(
        "save", to=str(d / "ct"), format="compressed-tensors").run()
    Pipeline(model=LL, quiet=True, device="cpu").add("cpu-fast", format="int8-dynamic").add(
        "save", to=str(d / "cpu")).run()
    return d


def special(kind, path: Path):
    """Put a FIFO, a link to /dev/zero, a socket, a directory or a dangling link at ``path``."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":  # bound by a relative name: a socket path may have at most 107 bytes
        cwd, s = os.getcwd(), socket.socket(socket.AF_UNIX)
        os.chdir(path.parent)
        try:
            s.bind(path.name)
        finally:
            os.chdir(cwd)
            s.close()
    elif kind == "dir":
        path.mkdir()
    elif kind == "dangling":
        path.symlink_to(path.parent / "nowhere")
    return path


def sparse(path: Path, size: int):
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def model_dir(name, **kw):
    def build(w, b):
        return copy_model_dir(b / {"g": G2, "l": LL}.get(name, name), w / "m", **kw)
    return build


def model_file(name, file, kind):
    def build(w, b):
        d = copy_model_dir(b / {"g": G2, "l": LL}.get(name, name), w / "m")
        special(kind, d / file)
        return d
    return build


def edit_config(name, edit):
    def build(w, b):
        d = copy_model_dir(b / {"g": G2, "l": LL}.get(name, name), w / "m")
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(edit(cfg) if callable(edit) else edit)
        return d
    return build


def qc_edit(edit):
    def apply(cfg):
        edit(cfg["quantization_config"])
        return json.dumps(cfg)
    return edit_config("ct", apply)


def gguf(name, **kw):
    def build(w, b):
        return rewrite_gguf(b / f"{name}.gguf", w / "m.gguf", **kw)
    return build


def gguf_bytes(name, edit):
    def build(w, b):
        data = bytearray((b / f"{name}.gguf").read_bytes())
        (w / "m.gguf").write_bytes(edit(data))
        return w / "m.gguf"
    return build


def tensor(shape, fill=0.0):
    import torch

    return torch.full(shape, fill)


def _t():
    import gguf as g

    return g.GGUFValueType


def non_finite(name, key, value):
    def build(w, b):
        from safetensors.torch import load_file

        bad = load_file(str(b / name / "model.safetensors"))[key].clone()
        bad.view(-1)[3] = value
        return copy_model_dir(b / name, w / "m", tensors={key: bad})
    return build


def file_of(text_or_bytes, name):
    def build(w, b):
        data = text_or_bytes.encode() if isinstance(text_or_bytes, str) else text_or_bytes
        (w / name).write_bytes(data)
        return w / name
    return build


def lock(kind):
    def build(w, b):
        (w / "victim.txt").write_text("precious")
        out = w / "run"
        out.mkdir()
        target = out / ".gptopt.lock"
        if kind == "link":
            target.symlink_to(w / "victim.txt")
        elif kind == "dangling":
            target.symlink_to(w / "created-by-the-lock")
        else:
            special(kind, target)
        return out
    return build


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 9)}]\n" for c in "bcdefgh")
M = ["--model", "{m}", "eval", "--max-tokens", "600"]
Q = ["--model", G2, "quantize", "--plan", "{m}"]
GG = ["--model", "{m}", "eval", "--max-tokens", "600"]
LLC = ["--model", G2, "llamacpp", "--file", "{m}", "--no-bench", "--max-tokens", "600", "--block-size", "64"]
LSIZE = 5 * 2**20

#: name -> (kind, build(workdir, originals) -> path, args with {m} for the path, expected text, exit code)
CASES = {}


def case(kind, name, build, args, expected, code=2):
    assert name not in CASES, name
    CASES[name] = (kind, build, args, expected, code)


# -- the run lock: never followed out of --out -------------------------------------------------------------------
for k, what in (("link", "a symlink to a file outside"), ("dangling", "a dangling symlink"), ("fifo", "a FIFO"),
                ("dir", "a directory"), ("socket", "a socket")):
    case("lock", f"--out holding only a .gptopt.lock that is {what}", lock(k),
         ["--out", "{m}", "--model", G2, "eval"], "exists and is not empty")

# -- model directories: every parameter from the file, claims against tensors before allocating --------------------
case("model-dir", "gpt2 dir missing an MLP weight", model_dir("g", drop=["transformer.h.1.mlp.c_fc.weight"]), M,
     "the weights lack 1 tensor(s) of this model: transformer.h.1.mlp.c_fc.weight")
case("model-dir", "llama dir missing its untied head", model_dir("l", drop=["lm_head.weight"]), M,
     "the weights lack 1 tensor(s) of this model: lm_head.weight")
case("model-dir", "llama dir missing the token embedding", model_dir("l", drop=["model.embed_tokens.weight"]), M,
     "model.embed_tokens.weight; they would be random")
case("model-dir", "gpt2 dir missing a whole layer norm", model_dir("g", drop=["transformer.h.0.ln_1.weight",
                                                                               "transformer.h.0.ln_1.bias"]), M,
     "the weights lack 2 tensor(s)")
case("model-dir", "gpt2 dir with an unexpected tensor", model_dir("g", tensors={"transformer.h.1.extra.weight":
                                                                                  tensor((3,))}), M,
     "the model has no place for transformer.h.1.extra.weight")
case("model-dir", "gpt2 dir with a tensor of the wrong shape",
     model_dir("g", tensors={"transformer.h.1.mlp.c_fc.weight": tensor((64, 100))}), M,
     "transformer.h.1.mlp.c_fc.weight [64, 100] (the model needs [64, 256])")
case("model-dir", "llama dir with a transposed projection",
     model_dir("l", tensors={"model.layers.0.mlp.up_proj.weight": tensor((64, 128))}), M,
     "tensors of the wrong shape for this config.json: model.layers.0.mlp.up_proj.weight [64, 128]")
case("model-dir", "config claims 200,000 GPT-2 layers", edit_config("g", lambda c: json.dumps({**c, "n_layer": 200000})),
     M, "config.json claims n_layer = 200000 but the weights hold 2 layers")
case("model-dir", "config claims 100,000 Llama layers",
     edit_config("l", lambda c: json.dumps({**c, "num_hidden_layers": 100000})), M,
     "claims num_hidden_layers = 100000 but the weights hold 2 layers")
case("model-dir", "config claims one layer of two", edit_config("l", lambda c: json.dumps({**c,
                                                                                           "num_hidden_layers": 1})),
     M, "claims num_hidden_layers = 1 but the weights hold 2 layers")
case("model-dir", "config claims a width of 2**20", edit_config("l", lambda c: json.dumps({**c,
                                                                                           "hidden_size": 2**20})),
     M, "model.embed_tokens.weight [257, 64] (the model needs [257, 1048576])")
case("model-dir", "config claims a vocabulary of 10**6", edit_config("g", lambda c: json.dumps({**c,
                                                                                                "vocab_size": 10**6})),
     M, "transformer.wte.weight [257, 64] (the model needs [1000000, 64])")
case("model-dir", "config claims a larger MLP", edit_config("l", lambda c: json.dumps({**c,
                                                                                       "intermediate_size": 4096})),
     M, "model.layers.0.mlp.gate_proj.weight [128, 64] (the model needs [4096, 64])")
case("model-dir", "config claims a wider GPT-2", edit_config("g", lambda c: json.dumps({**c, "n_embd": 128})), M,
     "tensors of the wrong shape for this config.json")
case("model-dir", "gpt2 dir with tensors renamed", model_dir("g", drop=["transformer.wte.weight"], tensors={
    "transformer.wte_renamed.weight": tensor((257, 64))}), M, "transformer.wte.weight; they would be random")
case("model-dir", "NaN in a GPT-2 weight", non_finite(G2, "transformer.h.0.mlp.c_fc.weight", float("nan")), M,
     "transformer.h.0.mlp.c_fc.weight holds 1 non-finite value(s) (NaN or inf)")
case("model-dir", "inf in a Llama weight", non_finite(LL, "model.layers.1.self_attn.o_proj.weight", float("-inf")), M,
     "model.layers.1.self_attn.o_proj.weight holds 1 non-finite value(s)")
case("model-dir", "config.json with a duplicate key", edit_config("g", '{"model_type": "gpt2", "model_type": "x"}'),
     M, "duplicate key 'model_type'")
case("model-dir", "config.json nested 100 deep", edit_config("g", '{"a": ' * 100 + "1" + "}" * 100), M,
     "nested deeper than 32 levels")
case("model-dir", "config.json not UTF-8", lambda w, b: _latin1_config(w, b), M, "config.json is not UTF-8 text")
# transformers' config validators raise a two-line error (huggingface_hub strict dataclasses); its cause, on the
# second line, is the part that names the field (issue 38: it was cut to "Class validation error for validator ...")
case("model-dir", "config with heads not dividing the width", edit_config("l", lambda c: json.dumps({
    **c, "num_attention_heads": 5})), M, "'validate_architecture': ValueError: The hidden size (64) is not a multiple "
     "of the number of attention heads (5).")
case("model-dir", "config with an unknown rope type", edit_config("l", lambda c: json.dumps({
    **c, "rope_parameters": {"rope_type": "bogus", "rope_theta": 1.0}})), M, "/m: KeyError: 'bogus'")


def _latin1_config(w, b):
    d = copy_model_dir(b / G2, w / "m")
    (d / "config.json").write_bytes('{"model_type": "gpt2", "name": "caf\xe9"}'.encode("latin-1"))
    return d



# -- non-regular files where a file is meant: refused before they are opened --------------------------------------
for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    for k, what in (("fifo", "a FIFO (named pipe)"), ("zero", "a character device")):
        case("special-file", f"{file} is {k}", model_file("g", file, k), M, f"{file} is {what}, not a regular file")
case("special-file", "vocab.json a dangling link", model_file("g", "vocab.json", "dangling"), M,
     "vocab.json is a dangling symlink")
case("special-file", "merges.txt a socket", model_file("g", "merges.txt", "socket"), M, "merges.txt is a socket")
case("special-file", "config.json a directory", model_file("g", "config.json", "dir"), M,
     "config.json is a directory, not a regular file")
case("special-file", "LoRA adapter weights a FIFO", lambda w, b: _adapter_fifo(w, b), M,
     "adapter/adapter_model.safetensors is a FIFO")
case("special-file", "compressed-tensors config.json a FIFO", model_file("ct", "config.json", "fifo"), M,
     "config.json is a FIFO")
case("special-file", "recipe a FIFO", lambda w, b: special("fifo", w / "r.yaml"), ["--recipe", "{m}"],
     "is not a regular file")
case("special-file", "recipe /dev/zero", lambda w, b: special("zero", w / "r.yaml"), ["--recipe", "{m}"],
     "is not a regular file")
case("special-file", "plan file a FIFO", lambda w, b: special("fifo", w / "p.yaml"), Q, "is a FIFO (named pipe)")
case("special-file", "plan file /dev/zero", lambda w, b: special("zero", w / "p.yaml"), Q, "is a character device")
case("special-file", "data file a FIFO", lambda w, b: special("fifo", w / "d.txt"),
     ["--model", G2, "--data", "{m}", "eval"], "is not a regular file")
case("special-file", "data file /dev/zero", lambda w, b: special("zero", w / "d.txt"),
     ["--model", G2, "--data", "{m}", "eval"], "is not a regular file")
case("special-file", "GGUF a FIFO", lambda w, b: special("fifo", w / "m.gguf"), GG, "is a FIFO (named pipe)")
case("special-file", "GGUF /dev/zero", lambda w, b: special("zero", w / "m.gguf"), GG, "is a character device")
case("special-file", "GGUF a dangling link", lambda w, b: special("dangling", w / "m.gguf"), GG,
     "is a dangling symlink")

def _adapter_fifo(w, b):
    d = copy_model_dir(b / G2, w / "m")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    special("fifo", d / "adapter" / "adapter_model.safetensors")
    return d


# -- size caps: refused from the size, nothing read ---------------------------------------------------------------
case("size-cap", "config.json of 5 GiB (sparse)", lambda w, b: (sparse(copy_model_dir(b / G2, w / "m") / "config.json",
                                                                        5 * 2**30).parent), M,
     "more than the 4 MiB such a file may have")
case("size-cap", "tokenizer.json of 300 MiB (sparse)", lambda w, b: (sparse(copy_model_dir(b / G2, w / "m") /
                                                                            "tokenizer.json", 300 * 2**20).parent), M,
     "tokenizer.json is 314572800 bytes, more than the 256 MiB")
case("size-cap", "plan file of 5 MiB (sparse)", lambda w, b: sparse(w / "p.yaml", LSIZE), Q,
     "more than the 4 MiB such a file may have")
case("size-cap", "plan JSON of 5 MiB", file_of('{"a": "int8"' + " " * LSIZE + "}", "p.json"), Q,
     "more than the 4 MiB")

# -- plan files through the one safe loader -----------------------------------------------------------------------
for name, text, expected in (
        ("alias bomb", BOMB, "anchors (&name) are not allowed"),
        ("alias", "transformer.h.0.mlp.c_fc: *x\n", "aliases (*name) are not allowed"),
        ("!!python tag", "transformer.h.0.mlp.c_fc: !!python/object/apply:os.getpid []\n", "'!!python/object/apply"),
        ("!!binary tag", "transformer.h.0.mlp.c_fc: !!binary aW50OA==\n", "'!!binary' are not allowed"),
        ("duplicate key", "transformer.h.0.mlp.c_fc: int8\ntransformer.h.0.mlp.c_fc: nf4\n", "duplicate key"),
        ("nested 200 deep", "a: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
        ("not UTF-8", "transformer.h.0.mlp.c_fc: int8 \xe9\n".encode("latin-1"), "is not UTF-8 text"),
        ("a list", "- int8\n- nf4\n", "must hold a mapping"),
        ("secret value not echoed", "password: hunter2-very-secret\n", "has a precision that is not one of")):
    case("plan-yaml", f"plan file: {name}", file_of(text, "p.yaml"), Q, expected)
case("plan-yaml", "plan JSON: duplicate key", file_of('{"a": "int8", "a": "nf4"}', "p.json"), Q, "duplicate key 'a'")
case("plan-yaml", "recipe: unquoted 5:4 stays a pattern (YAML 1.1 would read 304)",
     file_of("model: tiny-random-gpt2\nsteps:\n  - prune: {pattern: 5:4}\n", "r.yaml"), ["--recipe", "{m}"],
     "'5:4' is not a valid N:M pattern")

# -- GGUF headers against their tensors --------------------------------------------------------------------------
case("gguf", "GGUF with no tensors", gguf(LL, keep_tensors=False), GG, "holds no tensors")
case("gguf", "GPT-2 GGUF relabelled llama", gguf(G2, arch="llama"), GG,
     "block 0 has no attn_q.weight, attn_k.weight, attn_v.weight")
case("gguf", "Llama GGUF relabelled gpt2", gguf(LL, arch="gpt2"), GG, "block 0 has no attn_qkv.weight")
case("gguf", "GGUF claiming 200,000 blocks", gguf(LL, fields={"llama.block_count": (200000, "UINT32")}), GG,
     "claims 200000 blocks but holds tensors for 2")
case("gguf", "GGUF claiming one block of two", gguf(G2, fields={"gpt2.block_count": (1, "UINT32")}), GG,
     "claims 1 blocks but holds tensors for 2")
case("gguf", "GGUF block count 0", gguf(LL, fields={"llama.block_count": (0, "UINT32")}), GG,
     "'llama.block_count' is 0, not a positive integer")
case("gguf", "GGUF block count a string", gguf(LL, fields={"llama.block_count": ("two", "STRING")}), GG,
     "'llama.block_count' is 'two', not a positive integer")
case("gguf", "GGUF without a block count", gguf(LL, drop_fields=("llama.block_count",)), GG,
     "has no 'llama.block_count'")
case("gguf", "GGUF missing one block tensor", gguf(LL, drop_tensors=("blk.1.ffn_up.weight",)), GG,
     "block 1 has no ffn_up.weight")
case("gguf", "GGUF missing a whole block", gguf(G2, tensor_filter=lambda n: not n.startswith("blk.0.")), GG,
     "claims 2 blocks but holds tensors for 1")
case("gguf", "GGUF missing the token embedding", gguf(LL, drop_tensors=("token_embd.weight",)), GG,
     "has no token_embd.weight tensor")
case("gguf", "GGUF missing the output norm", gguf(LL, drop_tensors=("output_norm.weight",)), GG,
     "the weights lack model.norm.weight")
case("gguf", "GGUF claiming a width of 2**20", gguf(LL, fields={"llama.embedding_length": (2**20, "UINT32")}), GG,
     "'llama.embedding_length' is 1048576 but token_embd.weight is 64 wide")
case("gguf", "GPT-2 GGUF claiming 2**30 positions", gguf(G2, fields={"gpt2.context_length": (2**30, "UINT32")}), GG,
     "'gpt2.context_length' is 1073741824 but the position table holds 1024 positions")
case("gguf", "GGUF with fewer tokens than embedding rows",
     gguf(LL, fields={"tokenizer.ggml.tokens": ([chr(0x100 + i) for i in range(200)], "ARRAY", "STRING")}), GG,
     "the tokenizer has 200 tokens but token_embd.weight has 257 rows")
case("gguf", "GGUF claiming an MLP of 10**7", gguf(LL, fields={"llama.feed_forward_length": (10**7, "UINT32")}), GG,
     "'llama.feed_forward_length' is 10000000 but blk.0.ffn_up.weight is 128 wide")
case("gguf", "GGUF claiming a vocabulary of 10**8", gguf(LL, fields={"llama.vocab_size": (10**8, "UINT32")}), GG,
     "'llama.vocab_size' is 100000000 but token_embd.weight has 257 rows")
case("gguf", "GGUF with heads not dividing the width", gguf(LL, fields={"llama.attention.head_count": (3, "UINT32")}),
     GG, "3 attention heads (2 key/value) do not divide the width 64")
case("gguf", "GGUF claiming 4 key/value heads of 2", gguf(LL, fields={"llama.attention.head_count_kv": (4, "UINT32")}),
     GG, "need blk.0.attn_k.weight 64 wide, not 32")
case("gguf", "GGUF of an architecture transformers lacks", gguf(LL, arch="mistral"), GG, "cannot read GGUF file")
case("gguf", "GGUF with an architecture name that is not one", gguf(LL, arch="llama; rm -rf"), GG,
     "'general.architecture' is")
case("gguf", "GGUF with merges naming absent tokens", gguf(LL, fields={"tokenizer.ggml.merges": (
    ["a b", "c d", "e f"], "ARRAY", "STRING")}), GG, "3 of 3 tokenizer merges name tokens its vocabulary lacks")
case("gguf", "GGUF truncated to half", gguf_bytes(LL, lambda d: bytes(d[: len(d) // 2])), GG, "cannot read GGUF file")
case("gguf", "GGUF truncated in its header", gguf_bytes(LL, lambda d: bytes(d[:300])), GG, "cannot read GGUF file")
case("gguf", "GGUF version 99", gguf_bytes(LL, lambda d: bytes(d[:4] + (99).to_bytes(4, "little") + d[8:])), GG,
     "cannot read GGUF file")
case("gguf", "GGUF claiming 2**60 tensors", gguf_bytes(LL, lambda d: bytes(d[:8] + (2**60).to_bytes(8, "little")
                                                                        + d[16:])), GG, "cannot read GGUF file")
case("gguf", "GGUF claiming 2**60 keys", gguf_bytes(LL, lambda d: bytes(d[:16] + (2**60).to_bytes(8, "little")
                                                                     + d[24:])), GG, "cannot read GGUF file")
case("gguf", "GGUF with a NaN weight", lambda w, b: _gguf_nan(w, b), GG, "non-finite value(s)")


def _gguf_nan(w, b):
    import gguf as g

    out = rewrite_gguf(b / f"{LL}.gguf", w / "m.gguf")
    reader = g.GGUFReader(str(out), "r+")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    t.data.reshape(-1)[0] = float("nan")
    reader.data.flush()
    del reader
    return out


# -- llama.cpp: what it would abort on, refused before it is called ----------------------------------------------
case("llama.cpp", "llamacpp --file claiming 200,000 blocks",
     gguf(G2, fields={"gpt2.block_count": (200000, "UINT32")}), LLC, "claims 200000 blocks but holds tensors for 2")
case("llama.cpp", "llamacpp --block-size beyond the file's positions", lambda w, b: rewrite_gguf(
    b / f"{G2}.gguf", w / "m.gguf"), ["--model", G2, "llamacpp", "--file", "{m}", "--no-bench", "--max-tokens", "3000",
                                       "--block-size", "2048"], "--block-size is 2048 tokens, longer than the 1024")
case("llama.cpp", "llamacpp prompt + new tokens beyond the positions", lambda w, b: rewrite_gguf(
    b / f"{LL}.gguf", w / "m.gguf"), ["--model", LL, "llamacpp", "--file", "{m}", "--no-eval", "--prompt-tokens",
                                       "1000", "--new-tokens", "100"], "is 1100 tokens, longer than the 1024 positions")
case("llama.cpp", "llamacpp after export, --block-size beyond the positions", lambda w, b: w,
     ["--model", G2, "export", "--to", "x.gguf", "llamacpp", "--no-bench", "--block-size", "2048", "--max-tokens",
      "3000"], "step 2 'llamacpp': --block-size 2048 is longer than the model's 1024 positions")
case("llama.cpp", "llamacpp --file a FIFO", lambda w, b: special("fifo", w / "m.gguf"), LLC,
     "is a FIFO (named pipe), not a regular file")
case("llama.cpp", "llamacpp --file with no tensors", gguf(G2, keep_tensors=False), LLC, "holds no tensors")
case("llama.cpp", "llamacpp --file relabelled", gguf(G2, arch="llama"), LLC, "block 0 has no attn_q.weight")

# -- compressed-tensors configs --------------------------------------------------------------------------------
for name, target, expected in (
        ("nested repetition", "re:(a+)+$", "has repetition inside repetition"),
        ("alternation in repetition", "re:(a|aa)*b", "has alternation inside repetition"),
        ("backreference", r"re:(a)\1", "has a backreference"),
        ("four unbounded repeats", "re:.*a.*b.*c.*d", "has more than 3 unbounded repeats"),
        ("invalid regex", "re:(", "is not a valid regular expression"),
        ("a 300-character target", "x" * 300, "is 300 characters, more than 256")):
    case("compressed-tensors", f"compressed-tensors target: {name}",
         qc_edit(lambda qc, t=target: qc["config_groups"]["group_0"].__setitem__("targets", [t])), M, expected)
case("compressed-tensors", "compressed-tensors ignore: catastrophic regex",
     qc_edit(lambda qc: qc.__setitem__("ignore", ["re:(x*)*y"])), M, "quantization_config.ignore")
case("compressed-tensors", "compressed-tensors sparsity targets: catastrophic regex",
     qc_edit(lambda qc: qc.__setitem__("sparsity_config", {"format": "sparse-bitmask", "targets": ["re:(.+)+z"]})), M,
     "sparsity_config.targets")
case("compressed-tensors", "compressed-tensors targets a number",
     qc_edit(lambda qc: qc["config_groups"]["group_0"].__setitem__("targets", 7)), M, "must be a list")
case("compressed-tensors", "compressed-tensors config_groups a list",
     qc_edit(lambda qc: qc.__setitem__("config_groups", [1])), M, "config_groups must be a mapping")
case("compressed-tensors", "compressed-tensors num_bits 'x': the first error, located",
     qc_edit(lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits="x", strategy="y")), M,
     "quantization_config.config_groups.group_0.weights.num_bits")
case("compressed-tensors", "compressed-tensors num_bits 8 over 4-bit packed codes",
     qc_edit(lambda qc: qc["config_groups"]["group_0"]["weights"].update(num_bits=8)), M,
     "not 8-bit codes of weight_shape")
case("compressed-tensors", "compressed-tensors config with layer_types of 1 for 2 layers", edit_config("ct", lambda c:
     json.dumps({**c, "layer_types": ["full_attention"]})), M, "'validate_layer_type': ValueError: `num_hidden_layers` "
     "(2) must be equal to the number of `layer_types` (1)")
case("compressed-tensors", "compressed-tensors config claims 100,000 layers",
     edit_config("ct", lambda c: json.dumps({**c, "num_hidden_layers": 100000})), M,
     "claims num_hidden_layers = 100000 but the weights hold 2 layers")
case("compressed-tensors", "compressed-tensors config claims a width of 2**16",
     edit_config("ct", lambda c: json.dumps({**c, "hidden_size": 2**16, "head_dim": 16})), M,
     "parameters but the weights are")
case("compressed-tensors", "compressed-tensors with only pickle weights and --allow-pickle",
     lambda w, b: _ct_pickle(w, b), ["--allow-pickle"] + M, "pickle weights are not read (with or without")


def _ct_pickle(w, b):
    d = copy_model_dir(b / "ct", w / "m")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


# -- cpu-fast directories: the same checks before its own loader runs -------------------------------------------
case("cpu-fast", "cpu-fast dir whose config.json is a FIFO", model_file("cpu", "config.json", "fifo"), M,
     "config.json is a FIFO (named pipe)")
case("cpu-fast", "cpu-fast dir claiming 100,000 layers",
     edit_config("cpu", lambda c: json.dumps({**c, "num_hidden_layers": 100000})), M,
     "claims num_hidden_layers = 100000 but the weights hold 2 layers")
case("cpu-fast", "cpu-fast dir claiming a width of 2**16",
     edit_config("cpu", lambda c: json.dumps({**c, "hidden_size": 2**16, "head_dim": 16})), M,
     "parameters but the weights are")


# -- exit codes and messages ---------------------------------------------------------------------------------------
case("codes", "--data named with undecodable bytes", file_of("Some text. " * 100, "caf\udce9.txt"),
     ["--model", G2, "--data", "caf\udce9.txt", "eval"],
     "--data: the path is not valid UTF-8 (byte 0xe9")
case("codes", "mixed int8 + nf4 plan saved (the int8 layers would be de-quantized)", file_of(json.dumps(
    {"transformer.h.0.mlp.c_fc": "int8", "transformer.h.1.mlp.c_fc": "nf4"}), "p.json"),
     ["--model", G2, "quantize", "--plan", "{m}", "save", "--to", "saved"],
     "one BitsAndBytesConfig cannot describe int8 layers beside 4-bit ones")
case("codes", "save --to a name with no room for its temporary", lambda w, b: w, ["--model", G2, "save", "--to",
                                                                                   "n" * 240],
     "gptopt writes it through a temporary name beside it")
case("codes", "export --to a name with no room for its temporary", lambda w, b: w,
     ["--model", G2, "export", "--to", "n" * 235 + ".gguf"], "through a temporary name beside it")


def test_the_table_has_80_new_cases_across_every_kind():
    kinds = {}
    for kind, *_ in CASES.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(CASES) >= 80, len(CASES)
    assert {"lock", "model-dir", "special-file", "size-cap", "plan-yaml", "gguf", "llama.cpp", "compressed-tensors",
            "cpu-fast", "codes"} <= set(kinds), kinds
    assert all(n >= 3 for n in kinds.values()), kinds
    doc = (ROOT / "docs" / "trust-model.md").read_text()
    assert f"`tests/test_hostile_formats.py` ({len(CASES)} cases" in doc, "docs/trust-model.md has another count"


def snapshot(root, skip=None):
    """Every entry below ``root`` (links by target, files by size and mtime), except what is below ``skip``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if skip is not None and (p == skip or skip in p.parents):
            continue
        if p.is_symlink():
            out[str(p.relative_to(root))] = ("link", os.readlink(p))
        elif p.is_file():
            out[str(p.relative_to(root))] = ("file", p.stat().st_size, p.stat().st_mtime_ns)
        else:
            out[str(p.relative_to(root))] = ("other",)
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_is_one_line_and_writes_nothing(name, base, tmp_path):
    kind, build, args, expected, code = CASES[name]
    if kind == "llama.cpp":
        pytest.importorskip("llama_cpp")
    work = tmp_path / "w"
    work.mkdir()
    built = build(work, base)
    args = [str(built) if a == "{m}" else a for a in args]
    out = [] if "--out" in args else ["--out", str(work / "out")]
    run_dir = work / "out" if out else None  # a step that ran records itself in --out: allowed there only
    before, originals = snapshot(tmp_path, run_dir), snapshot(base)
    held = reset_peak_memory()
    start, cpu = time.perf_counter(), time.process_time()
    proc = run_in_process("run", "-q", *out, *args, cwd=work)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    lines = error_lines(proc.stderr)
    assert proc.returncode == code, (name, proc.stderr)
    assert "Traceback" not in proc.stderr and "panicked" not in proc.stderr, proc.stderr
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("Error: "), lines
    assert expected in lines[-1], lines[-1]
    assert snapshot(tmp_path, run_dir) == before, "something was written outside --out"
    assert snapshot(base) == originals
    # bounded: 10 s of CPU (this process's, all threads), and a wall-clock margin a loaded 2-core machine meets
    assert cpu < 10 and seconds < 60, (cpu, seconds)
    grown = peak_memory_mb() - held  # this case's own peak
    assert grown < 500, f"peak memory grew by {grown:.0f} MB"
