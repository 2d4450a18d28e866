"""Saving and loading a CPU-converted model.

Every saved directory holds ``config.json``, the tokenizer, and ``gptopt_cpu.json`` (the conversion record:
format, converted and kept layers, torch version). The weights:

* ``bf16``: a standard Hugging Face checkpoint in bfloat16 (``model.safetensors``); plain
  ``AutoModelForCausalLM.from_pretrained(dir, dtype="auto")`` loads it too.
* ``int8-dynamic``: ``gptopt_cpu.safetensors`` with the float tensors of everything not converted, and per
  converted layer ``<name>.weight_int8`` (int8), ``<name>.weight_scale`` / ``<name>.weight_zero_point`` (per
  tensor, or per channel with ``<name>.weight_axis``) and ``<name>.bias``: the exact int8 weights, ~1 byte per
  weight, no pickle. The loader builds the model from ``config.json``, applies the same conversion, and puts
  the stored int8 weights into the ``quantized.dynamic.Linear`` layers: the result computes bit for bit what
  the saved model computed.
* ``ao-int8-weight`` / ``ao-int8-dynamic``: ``gptopt_cpu.safetensors`` with the float tensors of everything
  not converted and, per converted weight, the tensors torchao's ``Int8Tensor`` holds
  (``<name>.weight.qdata`` int8, ``.scale``, ``.zero_point``); the loader applies the torchao config to a fresh
  model and copies them in: bit for bit the saved weights. ``ao-int8-weight-bf16`` is stored the same way,
  its float tensors in bfloat16.

With ``--compile`` the record says ``"compile": true`` and the loader compiles the loaded model again (the
compiled code itself is not saved; torch's inductor cache makes the second compilation faster).

Load with ``gptopt run --model DIR ...`` (this plugin's model source recognises ``gptopt_cpu.json``) or in
Python with :func:`gptopt_cpu.load_converted`.
"""
from __future__ import annotations

import json
from pathlib import Path

from gptopt_core import SourceError, error_text
from gptopt_core.kit.models import LoadedModel, check_local_dir

RECORD = "gptopt_cpu.json"
WEIGHTS = "gptopt_cpu.safetensors"


def _dedupe(tensors: dict) -> tuple[dict, dict]:
    """Drop tensors that share storage with an earlier one (tied weights); returns (tensors, aliases)."""
    out, aliases, seen = {}, {}, {}
    for key, t in tensors.items():
        ptr = (t.data_ptr(), t.numel(), t.dtype)
        if ptr in seen:
            aliases[key] = seen[ptr]
            continue
        seen[ptr] = key
        out[key] = t.detach().contiguous()
    return out, aliases


def save_converted(model, path: Path) -> list[str]:
    """Write ``model`` (converted by ``cpu-fast``, record in ``model.gptopt_cpu``) into ``path``."""
    import torch
    from safetensors.torch import save_file

    from .convert import is_dynamic_int8

    record = dict(model.gptopt_cpu)
    record["torch"] = torch.__version__
    fmt = record["format"]
    path = Path(path)
    if fmt in ("bf16", "fp32"):
        model.save_pretrained(str(path), safe_serialization=True)
        (path / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return sorted(p.name for p in path.iterdir())
    model.config.save_pretrained(str(path))
    converted = set(record["converted"])
    tensors = {}
    if fmt == "int8-dynamic":
        for key, value in model.state_dict().items():
            if key.split("._packed_params")[0] in converted or key.rsplit(".", 1)[0] in converted:
                continue  # packed params, scale, zero_point of a converted layer: written below
            if isinstance(value, torch.Tensor):
                tensors[key] = value
        for name in converted:
            module = model.get_submodule(name)
            if not is_dynamic_int8(module):
                raise RuntimeError(f"layer {name} is recorded as int8-dynamic but is {type(module).__name__}")
            weight, bias = module._weight_bias()
            tensors[f"{name}.weight_int8"] = weight.int_repr()
            if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                tensors[f"{name}.weight_scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
                tensors[f"{name}.weight_zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int64)
            else:
                tensors[f"{name}.weight_scale"] = weight.q_per_channel_scales().to(torch.float64)
                tensors[f"{name}.weight_zero_point"] = weight.q_per_channel_zero_points().to(torch.int64)
                tensors[f"{name}.weight_axis"] = torch.tensor([weight.q_per_channel_axis()], dtype=torch.int64)
            if bias is not None:
                tensors[f"{name}.bias"] = bias
    else:  # torchao: the tensors its int8 weights hold (int8 values, scales, zero points), exactly
        wrapped = {}
        for key, value in model.state_dict().items():
            flatten = getattr(value, "__tensor_flatten__", None)
            if flatten is None:
                tensors[key] = value
                continue
            names = list(flatten()[0])
            wrapped[key] = names
            for inner in names:
                tensors[f"{key}.{inner}"] = getattr(value, inner)
        record["wrapped"] = wrapped
    tensors, aliases = _dedupe(tensors)
    record["aliases"] = aliases
    save_file(tensors, str(path / WEIGHTS), metadata={"format": "gptopt-cpu", "conversion": fmt})
    (path / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return sorted(p.name for p in path.iterdir())


def read_record(path: Path) -> dict | None:
    file = Path(path) / RECORD
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def load_converted(path, trust_remote_code: bool = False):
    """Load a directory saved after ``cpu-fast``: ``(model, tokenizer, record)``, the model converted again."""
    from .convert import quiet  # torch: the engine, imported where it runs

    with quiet():
        return _load_converted(Path(path), trust_remote_code)


def _load_converted(path: Path, trust_remote_code: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .convert import convert_model  # torch: the engine, imported where it runs

    record = read_record(path)
    if record is None:
        raise FileNotFoundError(f"{path} has no {RECORD}")
    fmt = record["format"]
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if fmt in ("bf16", "fp32"):
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=torch.bfloat16 if fmt == "bf16" else torch.float32, use_safetensors=True,
            trust_remote_code=trust_remote_code)
    else:
        from safetensors.torch import load_file

        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
        tensors = load_file(str(path / WEIGHTS))
        for key, first in record.get("aliases", {}).items():
            tensors[key] = tensors[first]
        if fmt == "int8-dynamic":
            convert_model(model, fmt, keep=record.get("keep", []))
            _fill_dynamic(model, tensors, record["converted"])
        else:
            wrapped = record.get("wrapped", {})
            inner_keys = {f"{k}.{i}" for k, names in wrapped.items() for i in names}
            _copy_tensors(model, {k: v for k, v in tensors.items() if k not in inner_keys})
            convert_model(model, fmt, keep=record.get("keep", []))
            with torch.no_grad():  # the re-quantized random weights get the saved int8 values and scales
                for key, names in wrapped.items():
                    owner, _, leaf = key.rpartition(".")
                    weight = getattr(model.get_submodule(owner), leaf)
                    for inner in names:
                        getattr(weight, inner).copy_(tensors[f"{key}.{inner}"])
    model.eval()
    model.gptopt_cpu = {k: v for k, v in record.items() if k not in ("torch", "aliases")}
    if record.get("compile"):
        from .convert import compile_model  # torch: the engine, imported where it runs

        compile_model(model)  # as saved: compiled again (at the first call)
    return model, tokenizer, record


def _copy_tensors(model, tensors: dict) -> None:
    """Copy float tensors into the model by qualified name (every one must exist)."""
    import torch

    with torch.no_grad():
        for key, value in tensors.items():
            owner, _, leaf = key.rpartition(".")
            try:
                target = getattr(model.get_submodule(owner) if owner else model, leaf)
            except AttributeError:
                raise ValueError(f"checkpoint does not match the model: unexpected {key}") from None
            target.copy_(value)


def _tied_ok(model, key: str) -> bool:
    """A missing key is fine when it is the output head tied to the input embedding."""
    head = model.get_output_embeddings()
    if head is None or not key.endswith("weight"):
        return False
    try:
        return model.get_submodule(key.rsplit(".", 1)[0]) is head and head.weight is model.get_input_embeddings().weight
    except AttributeError:
        return False


def _fill_dynamic(model, tensors: dict, converted) -> None:
    import torch

    floats = {}
    names = set(converted)
    for key, value in tensors.items():
        owner = key.rsplit(".", 1)[0]
        if owner in names:
            continue
        floats[key] = value
    state_keys = set(model.state_dict())
    unexpected = [k for k in floats if k not in state_keys]
    missing = [k for k in state_keys if k not in floats and k.split("._packed_params")[0] not in names
               and k.rsplit(".", 1)[0] not in names and not _tied_ok(model, k)]
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():  # tensor by tensor: quantized layers' own state-dict loader wants their keys too
        for key, value in floats.items():
            owner, _, leaf = key.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            getattr(module, leaf).copy_(value)
    for name in names:
        module = model.get_submodule(name)
        q = tensors[f"{name}.weight_int8"]
        scale, zero = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_zero_point"]
        if f"{name}.weight_axis" in tensors:
            weight = torch._make_per_channel_quantized_tensor(q, scale, zero, int(tensors[f"{name}.weight_axis"]))
        else:
            weight = torch._make_per_tensor_quantized_tensor(q, float(scale[0]), int(zero[0]))
        module.set_weight_bias(weight, tensors.get(f"{name}.bias"))


def resolve(spec: str, options: dict):
    """A :class:`gptopt_core.LoadedModel` for a directory written by ``save`` after ``cpu-fast`` (it holds
    ``gptopt_cpu.json``), converted again; ``None`` for any other spec."""
    path = Path(spec).expanduser()
    if not (path / RECORD).is_file():
        return None
    # FIFOs / devices, config.json, layer count and size against the files (int8 layers are packed: not exact)
    check_local_dir(path, allow_pickle=False, exact=False)
    if not str(options.get("device", "cpu")).startswith("cpu"):
        raise SourceError(f"{spec} holds a cpu-fast model, which runs on CPU only; run with --device cpu")
    try:
        model, tokenizer, record = load_converted(path, trust_remote_code=bool(options.get("trust_remote_code")))
    except Exception as exc:  # safetensors / transformers / torch raise many types for broken files
        first = error_text(exc)
        raise SourceError(f"cannot load the cpu-fast model in {spec}: {first}") from None
    facts = {"cpu-only", "quantized:cpu-bf16" if record["format"] == "bf16" else "quantized:cpu-int8"}
    return LoadedModel(model, tokenizer, "gptopt-cpu", facts)
