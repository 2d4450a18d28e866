"""Write a model as a GGUF file llama.cpp loads: hyper-parameters, tokenizer, tensors; atomically.

Keys and values follow llama.cpp's ``convert_hf_to_gguf.py`` for ``LlamaModel`` and ``GPT2Model``; the file goes
through gguf-py's ``GGUFWriter`` into a temporary name next to the target, which is renamed into place only when
complete (an interrupted export leaves nothing behind).
"""
from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path

from gptopt_core import GptoptError

from . import blocks, tensors, types, vocab


def _check_llama(cfg) -> dict:
    act = getattr(cfg, "hidden_act", "silu")
    if act != "silu":
        raise GptoptError(f"export --format gguf: Llama with hidden_act '{act}' is not what llama.cpp's llama "
                          f"architecture computes (silu)")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = getattr(cfg, "rope_scaling", None)
    if isinstance(legacy, dict):
        rope.update(legacy)
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise GptoptError(f"export --format gguf: rope scaling '{rope.get('rope_type', rope.get('type'))}' is not "
                          f"supported by this exporter yet; supported: default rotary embeddings")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    return {"rope_theta": float(theta)}


def add_hparams(writer, model, arch: str) -> None:
    cfg = model.config
    if arch == "llama":
        extra = _check_llama(cfg)
        n_head = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(cfg.num_key_value_heads or n_head)
        writer.add_rope_freq_base(extra["rope_theta"])
        writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // n_head:
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
    else:
        act = getattr(cfg, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
            raise GptoptError(f"export --format gguf: GPT-2 with activation '{act}' is not what llama.cpp computes "
                              f"(gelu)")
        writer.add_block_count(cfg.n_layer)
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(getattr(cfg, "n_inner", None) or 4 * cfg.n_embd)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(float(cfg.layer_norm_epsilon))


def tensor_bytes(src, choice, importance=None):
    """numpy array for the writer and the raw GGML type (``None`` for plain f32/f16); ``importance``: the
    tensor's imatrix row, or ``None``."""
    if choice.how == "exact grid" or choice.how.startswith(types.GRID_CODES):
        return blocks.pack_exact(choice.type, src.grid, src.codes), blocks.ggml_type(choice.type)
    data = blocks.encode(src.values, choice.type, importance)
    return data, (None if choice.type in ("f32", "f16") else blocks.ggml_type(choice.type))


def check_model(model) -> str:
    """Plan-independent refusals that need the model: unmerged adapter, architecture. Returns the architecture."""
    if tensors.unmerged_adapter(model):
        raise GptoptError("export: the model carries an unmerged LoRA adapter; give lora --merge so the adapter is "
                          "folded into the weights, then export")
    return tensors.architecture(model)


def write_gguf(model, tokenizer, target: Path, type_name: str = "auto", embeddings: str | None = None,
               name: str = "", log=None, importance: dict | None = None) -> dict:
    """Write ``model`` to ``target`` (atomically); returns metrics: bytes, tensor types, exact-grid counts.
    ``importance``: ``{GGUF tensor name: mean x^2 per input column}`` (``--imatrix``) for the re-rounded
    q4_0 / iq4_nl tensors' block scales."""
    import gguf

    arch = check_model(model)
    srcs = tensors.sources(model)
    chosen = [(src, types.choose(src, type_name, embeddings)) for src in srcs]
    weight_types = Counter(c.type for s, c in chosen if s.values.dim() >= 2 and s.role != "position")
    file_type = types.FILE_TYPES[weight_types.most_common(1)[0][0]] if weight_types else 0

    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=str(target.parent))
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or str(getattr(model.config, "name_or_path", "") or arch))
        add_hparams(writer, model, arch)
        writer.add_file_type(file_type)
        with tempfile.TemporaryDirectory(prefix="gptopt-export-tok-") as workdir:
            vocab_info = vocab.add_vocab(writer, tokenizer, int(model.config.vocab_size), Path(workdir))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        importance = importance or {}
        for src, choice in chosen:
            data, raw = tensor_bytes(src, choice, importance.get(src.name))
            writer.add_tensor(src.name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the GGUF gets the user's usual mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    exact = sum(1 for _, c in chosen if c.how == "exact grid")
    rerounded = [f"{s.name}: {c.how}" for s, c in chosen if s.origin == "grid" and "re-rounded" in c.how]
    from_bnb = sum(1 for s, _ in chosen if s.origin.startswith("bnb-"))
    min_rounded = [f"{s.name}: {c.how}" for s, c in chosen if c.how.startswith(types.GRID_CODES)]
    changed = [s.name for s, _ in chosen if s.origin == "grid-changed"]
    return {
        "gguf_path": str(target),
        "gguf_bytes": target.stat().st_size,
        "gguf_architecture": arch,
        "gguf_file_type": weight_types.most_common(1)[0][0] if weight_types else "f32",
        "gguf_tensor_types": dict(sorted(Counter(c.type for _, c in chosen).items())),
        "gguf_tensors": len(chosen),
        "gguf_exact_grid_tensors": exact,
        "gguf_grid_min_rounded_tensors": len(min_rounded),
        "gguf_grid_min_rounded_examples": min_rounded[:3],
        "gguf_rerounded_grid_tensors": len(rerounded),
        "gguf_rerounded_examples": rerounded[:5],
        "gguf_grid_changed_tensors": changed[:5],
        "gguf_bitsandbytes_tensors": from_bnb,
        **_peer_metrics(chosen, importance),
        **vocab_info,
    }


def _peer_metrics(chosen, importance) -> dict:
    """K-quant fallbacks (rows not whole super-blocks) and imatrix-weighted re-rounding, counted."""
    fallback = [f"{s.name}: {c.how}" for s, c in chosen if c.how.startswith(types.FALLBACK)]
    weighted = sum(1 for s, c in chosen if s.name in importance and c.type in blocks.WEIGHTED
                   and not (c.how == "exact grid" or c.how.startswith(types.GRID_CODES)))
    return {"gguf_imatrix_weighted_tensors": weighted, "gguf_fallback_tensors": len(fallback),
            "gguf_fallback_examples": fallback[:3]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
