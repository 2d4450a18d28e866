"""What a GGUF file claims (architecture, block count, widths, context, vocabulary), checked against the tensors it
holds before anything is allocated or llama.cpp is called.

A header is a few bytes anyone can edit: a GGUF relabelled to another architecture, one with no tensors, one
claiming 200,000 blocks or a context its position table does not have would load with random weights, allocate
gigabytes, or abort inside llama.cpp. :func:`check_gguf_file` reads only the header and the tensor table
(memory-mapped, through gguf-py's reader) and refuses every such file in one line.
"""
from __future__ import annotations

import contextlib
import importlib
import re

from ..errors import SourceError, shorten
from .inputs import check_input_file
from .model_files import LoadedModel, check_loading_info, load_tokenizer

#: per architecture gptopt exports: tensors every block must hold (a file relabelled from another architecture lacks
#: them); other architectures are left to transformers' loader, whose loading info must then show no missing tensor
_LLAMA = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
BLOCK_TENSORS = {"llama": _LLAMA, "mistral": _LLAMA,
                 "qwen2": _LLAMA + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),  # Qwen2's q/k/v carry biases
                 "qwen3": _LLAMA + ("attn_q_norm.weight", "attn_k_norm.weight"),  # Qwen3 norms q and k per head
                 "gpt2": ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")}
#: architectures whose ``ffn_up`` holds gate and up fused (llama.cpp's loader: ``{n_embd, 2 * n_ff}``, split by
#: ``ggml_swiglu``): ``ffn_up`` is this many times ``feed_forward_length`` wide
FUSED_UP = {"phi3": 2}


def _field(reader, key):
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    try:
        if len(field.types) == 1 and int(field.types[0]) == 8:  # GGUFValueType.STRING
            return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        if int(field.types[0]) == 9:  # ARRAY: its length is all that is needed here
            return len(field.data)
        value = field.parts[field.data[0]]
        return value.tolist()[0] if hasattr(value, "tolist") else value
    except (IndexError, ValueError, TypeError):
        return None


def _int(reader, key, where, required=True):
    value = _field(reader, key)
    if value is None:
        if required:
            raise SourceError(f"{where} has no '{key}'; it is not a complete GGUF model")
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SourceError(f"{where}: '{key}' is {shorten(repr(value), 40)}, not a positive integer")
    return value


#: bytes of each scalar GGUFValueType (8 is STRING, 9 ARRAY)
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Header:
    """A bounded walk over a GGUF header: every count and length is checked against the bytes left in the file
    before it is used, so no loop runs longer than the file is, and nothing is allocated (issue 38)."""

    def __init__(self, data, where):
        self.data, self.where, self.pos, self.byteorder = data, where, 0, "little"

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n, what):
        if n > self.left():
            raise SourceError(f"cannot read {self.where}: {what} runs past the end of the file ({len(self.data)} "
                              "bytes); the file is damaged or was edited")
        self.pos += n

    def uint(self, n, what) -> int:
        start = self.pos
        self.take(n, what)
        return int.from_bytes(self.data[start:self.pos], self.byteorder)

    def count(self, item_bytes, what) -> int:
        n = self.uint(8, what)
        if n * item_bytes > self.left():
            raise SourceError(f"cannot read {self.where}: {what} claims {n} entries of at least {item_bytes} bytes, "
                              f"more than the {self.left()} bytes left in the file; the file is damaged or was edited")
        return n

    def value(self, vtype, what, nested=False):
        if vtype in _SCALAR_BYTES:
            self.take(_SCALAR_BYTES[vtype], what)
        elif vtype == 8:
            self.take(self.count(1, f"{what} (a string's length)"), what)
        elif vtype == 9 and not nested:
            itype = self.uint(4, what)
            n = self.count(_SCALAR_BYTES.get(itype, 8), f"{what} (an array)")
            if itype in _SCALAR_BYTES:  # gguf-py reads these one by one: past the end, as empty reads, forever
                self.take(n * _SCALAR_BYTES[itype], what)
            else:
                for _ in range(n):
                    self.value(itype, what, nested=True)
        else:
            raise SourceError(f"cannot read {self.where}: {what} has value type {vtype}, which GGUF does not have")


def check_header_bounds(path, where) -> None:
    """Walk the key/value pairs and the tensor table of a GGUF file, checking every count and length against the
    file's size, before gguf-py's reader sees it: that reader builds a list entry per array element it is told
    of, and reads past the end as empty arrays, so an edited array count ran it out of memory."""
    import mmap

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        h = _Header(data, where)
        h.take(4, "the magic")
        version = h.uint(4, "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order (gguf-py's test)
            h.byteorder, version = "big", int.from_bytes(data[4:8], "big")
        if version not in (2, 3):
            return  # gguf-py refuses these itself, in one line
        tensors = h.count(24, "the tensor count")  # a name's length, n_dims, type and offset: 24 bytes at least
        pairs = h.count(13, "the key/value count")  # a key's length, a value type and one byte at least
        for i in range(pairs):
            h.take(h.count(1, f"key {i}'s length"), f"key {i}")
            h.value(h.uint(4, f"key {i}'s value type"), f"key {i}'s value")
        for i in range(tensors):
            h.take(h.count(1, f"tensor {i}'s name length"), f"tensor {i}'s name")
            h.take(8 * h.uint(4, f"tensor {i}'s dimension count") + 12, f"tensor {i}'s shape, type and offset")


def _read(path, where):
    try:
        import gguf

        return gguf.GGUFReader(str(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # gguf-py raises assorted errors (and numpy's) on corrupt files
        raise SourceError(f"cannot read {where}: {type(exc).__name__}: {shorten(exc, 160)}") from None


def check_gguf_file(path, where: str | None = None) -> dict:
    """Read a GGUF file's header and tensor table and check its claims against its tensors; returns
    ``{"architecture", "blocks", "tensors", "context_length", "embedding_length", "vocab"}``.

    Refused in one :class:`~gptopt_core.SourceError` line: not a regular file, a bad magic, an unreadable header,
    no tensors, no architecture name, a block count that differs from the blocks whose tensors
    are present, a block lacking a tensor its architecture needs (llama, gpt2), widths, vocabulary or position table that
    disagree with the tensor shapes."""
    where = where or f"GGUF file {shorten(str(path), 160)}"
    check_input_file(path, where)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SourceError(f"{shorten(str(path), 160)} is not a GGUF file (bad magic); give a .gguf file or a "
                              "model directory")
    named = where if where.startswith("GGUF file") else f"GGUF file {where}"  # "cannot read GGUF file ...", once
    check_header_bounds(path, named)
    reader = _read(path, named)
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str) or not re.fullmatch(r"[a-z0-9_\-]{1,40}", arch):
        raise SourceError(f"{where}: 'general.architecture' is {shorten(repr(arch), 40)}, not an architecture name")
    tensors = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    if not tensors:
        raise SourceError(f"{where} holds no tensors (a header only); its weights would be random")
    claimed = _int(reader, f"{arch}.block_count", where)
    held = sorted({int(m.group(1)) for n in tensors if (m := re.match(r"blk\.(\d+)\.", n))})
    # the count is compared before any list of its length is built: a header claiming 2**31 blocks made
    # list(range(claimed)) take tens of GB (the fuzz of issue 38)
    if claimed != len(held) or held != list(range(len(held))):
        raise SourceError(f"{where} claims {claimed} blocks but holds tensors for {len(held)} (blk.0..blk.N); "
                          "the file is damaged or was edited")
    for i in range(claimed):
        # a MoE block (Mixtral as llama) holds the merged expert tensors (ffn_up_exps) for the dense ones
        absent = [n for n in BLOCK_TENSORS.get(arch, ()) if f"blk.{i}.{n}" not in tensors
                  and f"blk.{i}.{n.replace('.weight', '_exps.weight')}" not in tensors]
        if absent:
            raise SourceError(f"{where}: block {i} has no {', '.join(absent[:3])}: not a complete '{arch}' model "
                              "(relabelled from another architecture?)")
    width = _int(reader, f"{arch}.embedding_length", where)
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise SourceError(f"{where} has no token_embd.weight tensor")
    vocab = _field(reader, "tokenizer.ggml.tokens")
    if embd[0] != width:
        raise SourceError(f"{where}: '{arch}.embedding_length' is {width} but token_embd.weight is {embd[0]} wide")
    if isinstance(vocab, int) and len(embd) > 1 and vocab != embd[1]:
        raise SourceError(f"{where}: the tokenizer has {vocab} tokens but token_embd.weight has {embd[1]} rows")
    check_widths(reader, tensors, arch, width, embd, where)
    context = _int(reader, f"{arch}.context_length", where)
    pos = tensors.get("position_embd.weight")
    if arch == "gpt2" and (pos is None or len(pos) < 2 or pos[1] != context):
        raise SourceError(f"{where}: '{arch}.context_length' is {context} but the position table holds "
                          f"{pos[1] if pos and len(pos) > 1 else 0} positions")
    return {"architecture": arch, "blocks": claimed, "tensors": len(tensors), "context_length": context,
            "embedding_length": width, "vocab": embd[1] if len(embd) > 1 else vocab}


def check_widths(reader, tensors, arch, width, embd, where) -> None:
    """The sizes transformers builds the model from, against the tensors: MLP width, vocabulary, heads."""
    ffn = _int(reader, f"{arch}.feed_forward_length", where, required=False)
    up = tensors.get("blk.0.ffn_up.weight")
    fused = FUSED_UP.get(arch, 1)
    if ffn is not None and up is not None and len(up) > 1 and up[1] != fused * ffn:
        raise SourceError(f"{where}: '{arch}.feed_forward_length' is {ffn} but blk.0.ffn_up.weight is {up[1]} wide"
                          + (f" (llama.cpp's {arch} wants gate and up fused: {fused * ffn})" if fused > 1 else ""))
    vocab = _int(reader, f"{arch}.vocab_size", where, required=False)
    if vocab is not None and len(embd) > 1 and vocab != embd[1]:
        raise SourceError(f"{where}: '{arch}.vocab_size' is {vocab} but token_embd.weight has {embd[1]} rows")
    heads = _int(reader, f"{arch}.attention.head_count", where, required=False)
    kv = _int(reader, f"{arch}.attention.head_count_kv", where, required=False) or heads
    if heads is None:
        return
    if width % heads or heads % kv:
        raise SourceError(f"{where}: {heads} attention heads ({kv} key/value) do not divide the width {width}")
    k = tensors.get("blk.0.attn_k.weight")
    if arch == "llama" and k is not None and len(k) > 1 and k[1] != kv * (width // heads):
        raise SourceError(f"{where}: {heads} heads with {kv} key/value heads need blk.0.attn_k.weight "
                          f"{kv * (width // heads)} wide, not {k[1]}")


def gguf_tokenizer(path):
    """The tokenizer of a GGUF file. Merges naming a token the vocabulary lacks make the tokenizers library panic
    (a ``BaseException`` that also prints a Rust backtrace), so they are checked first: a file whose only merge is
    such a placeholder (gptopt's export of a tokenizer without merges writes one, since llama.cpp needs the key)
    gets a tokenizer with no merges; other bad merges are refused in one line."""
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
    except ImportError:  # another transformers layout: its own loader, panics caught
        return load_tokenizer(str(path.parent), gguf_file=path.name)
    tokens = set(tok_dict.get("tokens") or ())
    merges = list(tok_dict.get("merges") or ())
    bad = [m for m in merges if not isinstance(m, str) or m.count(" ") != 1 or m.replace(" ", "") not in tokens]
    if not bad:
        return load_tokenizer(str(path.parent), gguf_file=path.name)
    if len(bad) < len(merges) or len(bad) > 1:
        raise SourceError(f"GGUF file {shorten(str(path), 160)}: {len(bad)} of {len(merges)} tokenizer merges name "
                          f"tokens its vocabulary lacks (first: {shorten(repr(bad[0]), 60)})")
    backend, extra = convert_gguf_tokenizer(arch, {**tok_dict, "merges": []})
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tok_config, **extra})


def load_gguf(path):
    """Load a GGUF file checked by :func:`check_gguf_file`, de-quantize to fp32 and rebuild a plain model without
    the GGUF quantization config; every parameter must come from the file."""
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM


    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise SourceError(f"GGUF file {shorten(str(path), 160)} does not exist")
    where = f"GGUF file {shorten(str(path), 160)}"
    check_gguf_file(path, where)
    try:
        tokenizer = gguf_tokenizer(path)
        with _quiet_conversion():
            loaded, info = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                dtype=torch.float32, output_loading_info=True)
    except SourceError:
        raise
    except Exception as exc:  # the gguf reader and transformers raise assorted errors on corrupt files
        raise SourceError(f"cannot read {where}: {type(exc).__name__}: {shorten(exc, 200)}") from None
    check_loading_info(info, where)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval()
    return LoadedModel(model, tokenizer, "gguf")


@contextlib.contextmanager
def _quiet_conversion():
    """transformers' "Converting and de-quantizing GGUF tensors" bar is plain tqdm, which reads ``TQDM_DISABLE`` only
    when first imported: under ``-q`` (which sets it) the bar is switched off here too, for a process that imported
    tqdm before (``gptopt_core.cli.main`` called in-process)."""
    import os

    from transformers.utils import logging as hf_logging

    try:
        module = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        module = None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its LOAD REPORT table: check_loading_info says it in one line instead
    if os.environ.get("TQDM_DISABLE") != "1" or module is None or not hasattr(module, "tqdm"):
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)
        return
    saved = module.tqdm
    module.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        module.tqdm = saved
        hf_logging.set_verbosity(level)
