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
from gptopt_core.kit.locks import publish_file
from gptopt_core.kit.paths import remove_stale_temporaries

from . import ggml_types, plan as export_plan, tensors, types, vocab


def _rope_theta(cfg):
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers' base
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    return None if theta is None else float(theta)


def hparams(model, arch, ignore_window: bool = False) -> dict:
    """``{gguf-py GGUFWriter method: value}``: the keys every family shares (as ``TextModel.set_gguf_parameters``
    writes them), then the family's own (:attr:`GgufLayout.hparams`), which win. Refused: what llama.cpp computes
    differently, and a sliding window it does not apply unless ``ignore_window`` (``--ignore-sliding-window``)."""
    cfg, layout = model.config, arch.gguf
    why = layout.refusal(cfg) if layout.refusal else None
    if not why and not ignore_window and layout.window_ignored:
        why = layout.window_ignored(cfg)
    if why:
        raise GptoptError(f"export --format gguf: {why}")
    n_head = cfg.num_attention_heads
    keys = {"add_block_count": cfg.num_hidden_layers, "add_context_length": cfg.max_position_embeddings,
            "add_embedding_length": cfg.hidden_size}
    if getattr(cfg, "intermediate_size", None):
        keys["add_feed_forward_length"] = cfg.intermediate_size
    keys["add_head_count"] = n_head
    if hasattr(cfg, "num_key_value_heads"):
        keys["add_head_count_kv"] = cfg.num_key_value_heads or n_head
    theta = _rope_theta(cfg) if arch.rotary != "learned positions" else None
    if theta is not None:
        keys["add_rope_freq_base"] = theta
    for method, names in (("add_layer_norm_rms_eps", ("rms_norm_eps", "norm_eps")),
                          ("add_layer_norm_eps", ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))):
        eps = next((getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None), None)
        if eps is not None:  # the config names the converter's find_hparam looks for, in its order
            keys[method] = float(eps)
    head_dim = getattr(cfg, "head_dim", None)
    if head_dim and head_dim != cfg.hidden_size // n_head:
        keys["add_key_length"] = keys["add_value_length"] = head_dim
    keys.update(layout.hparams(cfg) if layout.hparams else [])
    return keys


def add_hparams(writer, model, arch, ignore_window: bool = False) -> None:
    for method, value in hparams(model, arch, ignore_window).items():
        getattr(writer, method)(value)


def tensor_bytes(src, choice, importance=None):
    """numpy array for the writer and the raw GGML type (``None`` for plain f32/f16); ``importance``: the
    tensor's imatrix row, or ``None``. A merged expert tensor (3-D) is encoded as its stacked rows (its grid and
    codes are already stacked), one type for all its experts."""
    if src.values.dim() == 3:
        import dataclasses

        n = src.values.shape[0]
        flat = dataclasses.replace(src, values=src.values.reshape(-1, src.values.shape[-1]))
        data, raw = tensor_bytes(flat, choice, importance)
        return data.reshape(n, -1, data.shape[-1]), raw
    kind = ggml_types.get(choice.type)
    if choice.from_codes:
        return kind.pack(src.grid, src.codes), kind.qtype()
    data = ggml_types.encode(src.values, choice.type, importance)
    return data, (None if kind.native else kind.qtype())


#: llama.cpp sets these tokens' attributes when ``general.name`` contains "phi3" / "phi-3" and aborts the load
#: (``unordered_map::at``) when one is missing from the vocabulary (``llama_vocab::impl::load``)
PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def loadable_name(name: str, tokenizer) -> str:
    """``general.name`` as llama.cpp can load it: a name that makes llama.cpp look up Phi-3's special tokens is
    written as ``phi_3`` when the vocabulary lacks them (a tiny or re-tokenized model)."""
    import re

    if re.search("phi-?3", name, re.IGNORECASE) and not set(PHI3_TOKENS) <= set(tokenizer.get_vocab()):
        return re.sub("phi-?3", "phi_3", name, flags=re.IGNORECASE)
    return name


def check_model(model, plugins=None, ignore_window: bool = False):
    """Plan-independent refusals that need the model: unmerged adapter, a family the table cannot export, what
    llama.cpp would compute differently (a sliding window it ignores, unless ``ignore_window``). Returns the model's
    row of the architecture table."""
    if tensors.unmerged_adapter(model):
        raise GptoptError("export: the model carries an unmerged LoRA adapter; give lora --merge so the adapter is "
                          "folded into the weights, then export")
    arch = tensors.family(model, plugins)
    hparams(model, arch, ignore_window)
    return arch


def write_gguf(model, tokenizer, target: Path, type_name: str = "auto", embeddings: str | None = None,
               name: str = "", log=None, plugins=None, importance: dict | None = None,
               plan: dict | None = None, ignore_window: bool = False, overwrite: bool = True) -> dict:
    """Write ``model`` to ``target`` (atomically); returns metrics: bytes, tensor types, exact-grid counts.
    ``importance``: ``{GGUF tensor name: mean x^2 per input column}`` (``--imatrix``) for the re-rounded
    tensors of the types that weight their rounding by it (q4_0 / iq4_nl block scales); ``plan``: ``{GGUF tensor
    name: type}`` (``--plan``), over ``type_name`` and ``embeddings`` for the tensors it names; ``ignore_window``:
    write a sliding window llama.cpp does not apply (``--ignore-sliding-window``) instead of refusing it. Without
    ``overwrite`` an existing ``target`` (even one that appeared while writing) is never replaced: a one-line
    error. The export step builds its :class:`~gptopt_export.plan.ExportPlan` once and calls :func:`write_plan`."""
    check_model(model, plugins, ignore_window)
    built = export_plan.build(model, plugins, type_name, embeddings, plan)
    return write_plan(built, model, tokenizer, target, name, importance, ignore_window, overwrite)


def write_plan(plan, model, tokenizer, target: Path, name: str = "", importance: dict | None = None,
               ignore_window: bool = False, overwrite: bool = True) -> dict:
    """Write the tensors of ``plan`` (:class:`~gptopt_export.plan.ExportPlan` of ``model``) with ``model``'s
    hyper-parameters and ``tokenizer`` to ``target``, atomically; see :func:`write_gguf`."""
    import gguf

    arch, file_type = plan.arch, plan.file_type()
    target = Path(target)
    remove_stale_temporaries(target.parent, f".{target.name}.", ".part")  # left by an export killed with -9
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".part", dir=str(target.parent))
    os.close(fd)
    tmp, writer = Path(tmp_name), None
    importance = importance or {}
    try:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf.arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(loadable_name(name or str(getattr(model.config, "name_or_path", "") or arch.gguf.arch),
                                      tokenizer))
        add_hparams(writer, model, arch, ignore_window)
        writer.add_file_type(ggml_types.get(file_type).file_type)
        with tempfile.TemporaryDirectory(prefix="gptopt-export-tok-") as workdir:
            vocab_info = vocab.add_vocab(writer, tokenizer, int(model.config.vocab_size), Path(workdir))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for src, choice in plan.entries:
            data, raw = tensor_bytes(src, choice, importance.get(src.name))
            writer.add_tensor(src.name, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the GGUF gets the user's usual mode
        publish_file(tmp, target, overwrite, "export --to")
    except BaseException:
        _close_quietly(writer)  # a failed write (disk full) must not keep the file open: its disk stays busy
        tmp.unlink(missing_ok=True)
        raise
    return {
        "gguf_path": str(target),
        "gguf_bytes": target.stat().st_size,
        "gguf_architecture": arch.gguf.arch,
        "gguf_file_type": file_type,
        **_grid_metrics(plan.entries),
        **_peer_metrics(plan.entries, importance),
        **vocab_info,
    }


def _close_quietly(writer) -> None:
    """Close gguf-py's output files after a failed write; a flush that fails again (no space) still closes them."""
    for f in (getattr(writer, "fout", None) or []):
        try:
            f.close()
        except OSError:
            pass


def _grid_metrics(chosen) -> dict:
    """Tensor types, and how the chain's grids and bitsandbytes layers were written."""
    exact = sum(1 for _, c in chosen if c.how == "exact grid")
    rerounded = [f"{s.name}: {c.how}" for s, c in chosen if s.origin == "grid" and "re-rounded" in c.how]
    from_bnb = sum(1 for s, _ in chosen if s.origin.startswith("bnb-"))
    min_rounded = [f"{s.name}: {c.how}" for s, c in chosen if c.how.startswith(types.GRID_CODES)]
    changed = [s.name for s, _ in chosen if s.origin == "grid-changed"]
    return {
        "gguf_tensor_types": dict(sorted(Counter(c.type for _, c in chosen).items())),
        "gguf_tensors": len(chosen),
        "gguf_exact_grid_tensors": exact,
        "gguf_grid_min_rounded_tensors": len(min_rounded),
        "gguf_grid_min_rounded_examples": min_rounded[:3],
        "gguf_rerounded_grid_tensors": len(rerounded),
        "gguf_rerounded_examples": rerounded[:5],
        "gguf_grid_changed_tensors": changed[:5],
        "gguf_bitsandbytes_tensors": from_bnb,
    }


def _peer_metrics(chosen, importance) -> dict:
    """K-quant fallbacks (rows not whole super-blocks) and imatrix-weighted re-rounding, counted."""
    fallback = [f"{s.name}: {c.how}" for s, c in chosen if c.how.startswith(types.FALLBACK_NOTE)]
    weighted = sum(1 for s, c in chosen if s.name in importance and ggml_types.get(c.type).weighted is not None
                   and not c.from_codes)
    return {"gguf_imatrix_weighted_tensors": weighted, "gguf_fallback_tensors": len(fallback),
            "gguf_fallback_examples": fallback[:3]}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
