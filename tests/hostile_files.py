"""Hostile copies of files gptopt writes (issue 29): a GGUF with fields or tensors edited, a model directory with
its config or weights edited. Used by tests/test_hostile_formats.py."""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def rewrite_gguf(src, dst, fields=None, drop_fields=(), drop_tensors=(), arch=None, keep_tensors=True,
                 tensor_filter=None):
    """Copy the GGUF ``src`` to ``dst`` with ``fields`` ``{key: (value, GGUFValueType[, sub_type])}`` set, the keys in
    ``drop_fields`` and the tensors in ``drop_tensors`` left out, and ``general.architecture`` set to ``arch``."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    old_arch = reader.fields["general.architecture"].contents()
    arch = arch or old_arch
    writer = gguf.GGUFWriter(str(dst), arch)
    fields = dict(fields or {})
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name in drop_fields or name in fields:
            continue
        if arch != old_arch and name.startswith(old_arch + "."):
            name = arch + name[len(old_arch):]  # relabelled: the hyper-parameters move with the label
            if name in fields:
                continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for name, spec in fields.items():  # (value, type[, sub type]); types by name or GGUFValueType
        value, *types = spec
        types = [gguf.GGUFValueType[t] if isinstance(t, str) else t for t in types]
        writer.add_key_value(name, value, types[0], sub_type=types[1] if len(types) > 1 else None)
    if keep_tensors:
        for t in reader.tensors:
            if t.name in drop_tensors or (tensor_filter and not tensor_filter(t.name)):
                continue
            data = np.array(t.data)
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor(t.name, data)
            else:
                writer.add_tensor(t.name, data, raw_shape=list(reversed([int(d) for d in t.shape])),
                                  raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(dst)


def copy_model_dir(src, dst, config=None, drop=(), tensors=None):
    """Copy a save_pretrained directory with config.json keys updated from ``config``, the tensors in ``drop`` left
    out and ``tensors`` ``{name: tensor}`` added or replaced."""
    from safetensors.torch import load_file, save_file

    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config)
        (dst / "config.json").write_text(json.dumps(cfg))
    if drop or tensors:
        sd = load_file(str(dst / "model.safetensors"))
        for name in drop:
            sd.pop(name)
        sd.update(tensors or {})
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
