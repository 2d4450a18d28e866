"""What vLLM's CPU build cannot load, refused in one line before vLLM starts.

Each rule was seen with vLLM CPU 0.32.0 on artifacts gptopt writes (docs/save-formats.md, "Served in vLLM"):
vLLM's own failure is a multi-process traceback after a minute of start-up, so the step reads the saved
``config.json`` first and names the cause and the way out.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptopt_core import GptoptError
from gptopt_core.kit.inputs import check_input_file, read_input_file

#: head sizes vLLM CPU's attention kernel has (``CPUAttentionBackend.get_supported_head_sizes``, vLLM 0.32.0)
HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _fail(where: str, why: str):
    raise GptoptError(f"vllm: {where}: {why}")


def _group_refusal(name: str, group: dict, fmt: str) -> str | None:
    weights = group.get("weights") or {}
    acts = group.get("input_activations")
    bits = weights.get("num_bits")
    targets = ", ".join(map(str, group.get("targets") or [])) or name
    if (group.get("format") or fmt) == "naive-quantized" and not acts:
        return (f"the {targets} group is int{bits} naive-quantized without input activations (quantized embeddings "
                "or head, --embeddings 8), which vLLM's scheme map rejects; save without --embeddings for vLLM")
    if bits == 8 and not acts:
        return ("int8 weight-only layers (uint8b128) have no kernel in vLLM's CPU build (CPUWNA16 runs 4-bit "
                "weights only); use quantize --method rtn|gptq --bits 8 --activations 8 (W8A8) or --bits 4")
    if acts and (acts.get("num_bits") != 8 or acts.get("type") != "int" or not acts.get("dynamic")):
        return (f"input activations {acts.get('type')}{acts.get('num_bits')} "
                f"({'dynamic' if acts.get('dynamic') else 'static'}) are not the dynamic int8 vLLM's CPU W8A8 runs")
    return None


def check_quantization(qconfig: dict) -> str | None:
    """Why vLLM CPU cannot run this ``quantization_config``, or ``None``."""
    method = qconfig.get("quant_method")
    if method == "bitsandbytes":
        return ("vLLM's CPU build has no bitsandbytes method ('Unknown quantization method: bitsandbytes'); "
                "quantize --method rtn|gptq --bits 4 writes 4-bit weights it runs")
    if method != "compressed-tensors":
        return None  # vLLM decides; its error is mapped to one line when it fails
    sparsity = qconfig.get("sparsity_config") or {}
    if sparsity.get("format"):
        return (f"{sparsity['format']} sparsity is not supported by vLLM (support was removed upstream); save the "
                "pruned model with --format safetensors (zeros stored dense) or on an integer grid")
    fmt = qconfig.get("format") or ""
    for name, group in (qconfig.get("config_groups") or {}).items():
        why = _group_refusal(name, group, fmt)
        if why:
            return why
    return None


def head_size(config: dict) -> int | None:
    text = config.get("text_config") or config
    if isinstance(text.get("head_dim"), int):
        return text["head_dim"]
    hidden, heads = text.get("hidden_size", text.get("n_embd")), text.get("num_attention_heads", text.get("n_head"))
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def check_dtype(qconfig: dict, dtype: str) -> str | None:
    """vLLM CPU's 4-bit kernel (``cpu_gemm_wna16``) has no float32 version."""
    if dtype != "float32" or qconfig.get("quant_method") != "compressed-tensors":
        return None
    groups = (qconfig.get("config_groups") or {}).values()
    if any((g.get("weights") or {}).get("num_bits") == 4 and not g.get("input_activations") for g in groups):
        return ("vLLM CPU's 4-bit kernel (cpu_gemm_wna16) has no float32 version; use --dtype auto or bfloat16")
    return None


def check_model_dir(path: Path, dtype: str = "auto") -> dict:
    """The saved directory's ``config.json`` if vLLM CPU can serve it; :class:`GptoptError` (exit 2) otherwise."""
    where = str(path)
    if path.suffix == ".gguf":
        _fail(where, "a GGUF file; vLLM's CPU build has no GGUF loader: measure it with the llamacpp step and "
                     "give vllm a directory written by save")
    if not path.is_dir():
        _fail(where, "not a directory (give vllm --dir a directory written by save)")
    if (path / "adapter").is_dir() or (path / "adapter_config.json").is_file():
        _fail(where, "holds an unmerged LoRA adapter; use lora --merge before save")
    cfg_path = path / "config.json"
    if not check_input_file(cfg_path, "vllm", missing_ok=True):
        _fail(where, "has no config.json (give vllm --dir a directory written by save)")
    try:
        config = json.loads(read_input_file(cfg_path, "vllm"))
    except ValueError as exc:
        _fail(str(cfg_path), f"not JSON ({exc})")
    if not isinstance(config, dict):
        _fail(str(cfg_path), "not a JSON object")
    qconfig = config.get("quantization_config") or {}
    why = check_quantization(qconfig) or check_dtype(qconfig, dtype)
    if why:
        _fail(where, why)
    size = head_size(config)
    if size is not None and size not in HEAD_SIZES:
        _fail(where, f"attention heads of size {size}; vLLM's CPU attention runs sizes "
                     f"{', '.join(map(str, HEAD_SIZES))}")
    return config
