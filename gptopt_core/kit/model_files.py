"""A model directory as hostile input: what its files claim, checked against what they hold, before and after
loading.

Before anything is allocated: every entry is a regular file or a directory (no FIFO or device named like a
tokenizer or weights file), config.json and the tokenizer files are size-capped, the layer count and widths of
config.json are checked against the tensors in the safetensors headers (a config claiming 200,000 layers or a
width the tensors do not have is refused, not allocated). After loading: every parameter of the model came from
the file (missing, unexpected or mismatched tensors are one line naming the first few), and every weight is
finite. See docs/trust-model.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SourceError, shorten

#: largest config.json (a causal LM's is a few KiB)
MAX_CONFIG_BYTES = 4 * 2**20
#: largest tokenizer / generation / chat-template file (the largest real tokenizer.json files are ~35 MB)
MAX_TOKENIZER_BYTES = 256 * 2**20
#: the files of a model directory besides its weights that loaders read whole
TEXT_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
              "added_tokens.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
              "tokenizer.model", "preprocessor_config.json")
#: config keys that give the number of transformer layers
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block|decoder\.layers)\.(\d+)\.")


def check_directory_files(path: Path, where: str) -> None:
    """No FIFO, device, socket or dangling link in the directory; text files within their caps."""
    from .inputs import check_no_special_files

    check_no_special_files(path, where)
    for name in TEXT_FILES:
        f = path / name
        if f.is_file() and f.stat().st_size > MAX_TOKENIZER_BYTES:
            raise SourceError(f"{where}: {name} is {f.stat().st_size} bytes, more than the "
                              f"{MAX_TOKENIZER_BYTES // 2**20} MiB such a file may have")


#: files a tokenizer can be built from when there is no tokenizer.json (sentencepiece, BPE, WordPiece vocabularies)
VOCAB_FILES = ("tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt")


def check_tokenizer_files(path: Path, where: str) -> None:
    """A tokenizer the directory can be loaded with: ``tokenizer.json`` that parses as JSON, or a vocabulary file
    (:data:`VOCAB_FILES`); otherwise one line saying which, before transformers' "Couldn't instantiate the
    backend tokenizer from one of: ..." (a list it prints on the following lines)."""
    import json

    tok = path / "tokenizer.json"
    if tok.is_file():
        try:
            json.loads(tok.read_bytes())
        except ValueError as exc:
            raise SourceError(f"{where}: tokenizer.json is not valid JSON ({shorten(exc, 100)}); copy the model's "
                              "tokenizer files into the directory again") from None
        return
    if not any((path / name).is_file() for name in VOCAB_FILES):
        raise SourceError(f"{where} has no tokenizer: neither tokenizer.json nor a vocabulary file "
                          f"({', '.join(VOCAB_FILES)}); copy the model's tokenizer files into the directory")


def read_config(path: Path, where: str) -> dict:
    """config.json, size-capped, through the one safe loader (plain data, no duplicate keys)."""
    from .inputs import load_structured_file

    return load_structured_file(path / "config.json", where, MAX_CONFIG_BYTES, kind="JSON")


def shard_tensors(shards) -> dict:
    """``{name: (dtype, shape)}`` over the safetensors headers of ``shards`` (headers only, nothing loaded)."""
    from safetensors import safe_open

    out = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (sl.get_dtype(), tuple(int(d) for d in sl.get_shape()))
    return out


def check_layer_count(cfg: dict, tensors: dict, where: str) -> None:
    """The layer count config.json claims must be the number of layers whose tensors the weights hold: a config
    claiming 100,000 layers would otherwise allocate them (randomly initialised) before any check."""
    held = {int(m.group(1)) for k in tensors if (m := _LAYER_INDEX.search(k))}
    for key in LAYER_KEYS:
        claimed = cfg.get(key)
        if isinstance(claimed, int) and not isinstance(claimed, bool) and held and claimed != len(held):
            raise SourceError(f"{where}: config.json claims {key} = {claimed} but the weights hold {len(held)} "
                              "layers; the config does not belong to these weights")


def meta_model(path: Path):
    """The model config.json describes, built on the meta device: its parameters have shapes, no storage."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(path))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def loading_names(model, tensors: dict) -> dict | None:
    """``tensors`` under the names transformers loads them as: its checkpoint conversion mapping renames some
    file keys (GPT-NeoX's ``embed_out`` is the model's ``lm_head``, and ``save_pretrained`` writes it back as
    ``embed_out``). ``None`` when a transform that does more than rename (merges, splits) matches a key: the file's
    shapes are then not the model's."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers without conversion mappings loads file keys as they are
        return dict(tensors)
    try:
        transforms = get_model_conversion_mapping(model)
    except Exception:  # a model class the mapping cannot walk: the loading info after loading decides
        return None
    out = {}
    for key, value in tensors.items():
        for transform in transforms:
            renamed, matched = transform.rename_source_key(key)
            if matched is not None and type(transform) is not WeightRenaming:
                return None
            key = renamed
        out[key] = value
    return out


def check_against_meta_model(model, tensors: dict, where: str) -> None:
    """Compare the meta model's parameters with the tensors in the files (under the names transformers loads them
    as, :func:`loading_names`): a parameter with no tensor or a tensor of another shape is refused before anything
    is allocated."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {name: tuple(param.shape) for name, param in model.named_parameters()}  # tied ones once
    lookup = loading_names(model, tensors)
    if lookup is None:
        return
    if prefix:
        lookup.update({f"{prefix}.{k}": v for k, v in tensors.items() if not k.startswith(prefix + ".")})
    missing = [n for n in names if n not in lookup]
    mismatched = [f"{n} {list(lookup[n][1])} (the model needs {list(s)})" for n, s in names.items()
                  if n in lookup and lookup[n][1] != s]
    if mismatched:
        raise SourceError(f"{where}: tensors of the wrong shape for this config.json: {', '.join(mismatched[:3])}"
                          + (f" (+{len(mismatched) - 3} more)" if len(mismatched) > 3 else ""))
    if missing:
        raise SourceError(f"{where}: the weights lack {len(missing)} tensor(s) of this model: "
                          f"{', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}; they would be random")


def check_claimed_size(model, shards, where: str) -> None:
    """A quantized layout's tensors have other names and shapes; its size still bounds the model: at least one
    bit per parameter (2-bit codes, a bitmask) must be in the files."""
    params = sum(p.numel() for p in model.parameters())
    held = sum(Path(s).stat().st_size for s in shards)
    if params / 8 > held * 1.05 + 2**20:
        raise SourceError(f"{where}: config.json describes {params:,} parameters but the weights are {held:,} bytes "
                          "(under one bit each); the config does not belong to these weights")


def check_loading_info(info: dict, where: str) -> None:
    """After ``from_pretrained(..., output_loading_info=True)``: every parameter came from the file."""
    for key, what in (("missing_keys", "the weights lack"), ("mismatched_keys", "tensors of the wrong shape:"),
                      ("unexpected_keys", "the model has no place for")):
        found = sorted(_key_name(k) for k in (info.get(key) or ()))
        found = [k for k in found if not k.endswith(("inv_freq", "masked_bias", ".attn.bias"))]
        if found:
            more = f" (+{len(found) - 3} more)" if len(found) > 3 else ""
            raise SourceError(f"{where}: {what} {', '.join(shorten(k, 60) for k in found[:3])}{more}; the model would "
                              "not be the one in the files")


def _key_name(key) -> str:
    return key[0] if isinstance(key, tuple) else str(key)


def check_finite(model, where: str) -> None:
    """Every floating-point parameter is finite: a NaN or inf weight is a damaged file, said as such, not a
    failure of whatever step first multiplies by it."""
    import torch

    for name, param in model.named_parameters():
        if type(param.data) is not torch.Tensor or not param.is_floating_point() or param.device.type == "meta":
            continue  # tensor subclasses (torchao's packed int8) hold codes, not floats to test
        finite = torch.isfinite(param)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise SourceError(f"{where}: {name} holds {bad} non-finite value(s) (NaN or inf); the weights are "
                              "damaged")


def check_before_loading(path: Path, cfg: dict, where: str, exact: bool = True) -> None:
    """The checks that need no allocation, for a safetensors directory: the layer count, then the meta model's
    parameters against the tensors in the headers (plain layouts) or against the files' size (quantized)."""
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        return  # pickles (--allow-pickle): the loading info after loading decides
    tensors = shard_tensors(shards)
    check_layer_count(cfg, tensors, where)
    if cfg.get("auto_map"):
        return  # model code from the hub: not run to check it (from_pretrained refuses or runs it, as asked)
    try:
        model = meta_model(path)
    except Exception:  # a config transformers cannot build: from_pretrained says why, in one line
        return
    if exact and cfg.get("quantization_config") is None:
        check_against_meta_model(model, tensors, where)
    else:
        check_claimed_size(model, shards, where)


@dataclass
class LoadedModel:
    """What a model source (``gptopt_resolve_model``) returns.

    * ``model``: a causal LM (``torch.nn.Module``, usually a transformers ``PreTrainedModel``) in eval mode.
    * ``tokenizer``: its tokenizer (a transformers tokenizer).
    * ``source``: a short name recorded in run.json (``"local"``, ``"gguf"``, ``"hub"``, ``"my-zoo"``).
    * ``facts``: what the model already is, checked against the plan before any step runs: set
      ``quantized:4bit`` / ``quantized:8bit`` for a bitsandbytes model, ``adapter`` for a PEFT model, nothing for a
      plain float model (see :data:`gptopt_core.FACTS`). A model with no facts is moved to the run's device by the
      core; a source that sets facts places the model itself.
    """

    model: Any
    tokenizer: Any
    source: str  # e.g. "local", "gguf", "hub", "smollm2", "tiny"
    facts: set = field(default_factory=set)  # facts the loaded model already carries (e.g. quantized:4bit)


def load_tokenizer(*args, **kwargs):
    """``AutoTokenizer.from_pretrained``, with a panic of the tokenizers library (a ``pyo3_runtime.PanicException``,
    which is a ``BaseException``, not an ``Exception``) turned into one line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit, Exception):
        raise
    except BaseException as exc:
        raise SourceError(f"cannot read the tokenizer of {shorten(args[0], 160)}: the tokenizers library failed "
                          f"({type(exc).__name__}: {shorten(exc, 120)})") from None
