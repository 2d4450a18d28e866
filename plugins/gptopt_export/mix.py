"""``export --plan``: a GGUF type per tensor, from measured sensitivity within a bits-per-weight budget, or a file.

llama.cpp's ``_M`` mixes give some tensors a bigger type by a fixed rule (``attn_v`` and some ``ffn_down`` get
q6_k). ``--plan auto`` measures instead, on the model as the chain left it:

1. each float block weight (and an untied output head and input embedding, as llama.cpp's mixes upgrade
   ``output.weight``), alone in place with its de-quantized ``--type`` values (a quantized type: q4_0,
   q4_1, q4_k, ...; with an imatrix, weighted as the file will be): the calibration loss change
   (:func:`gptopt_core.module_sensitivity`, train split);
2. the order: that change per byte the upgrade to ``--upgrade-type`` costs, largest first;
3. upgrade in that order while the file's bits per weight (its 2-D tensors, as :func:`.quantize_llamacpp.
   weight_bits` reads a file) stay within ``--max-bpw``; a tensor that does not fit is passed over for smaller
   ones after it.

Grids the chain fitted (written exactly) and bitsandbytes layers keep the type ``--type`` gives them, and
``--embeddings`` fixes the embedding's and head's. ``--plan FILE`` (JSON or YAML) maps GGUF tensor names
(``blk.0.attn_v.weight``) or model module names (``model.layers.0.self_attn.v_proj``) to types, for a plan kept
from an earlier run.
"""
from __future__ import annotations

import math
import time

from gptopt_core import GptoptError

from . import ggml_types, types

#: tokens per calibration block of the sensitivity measurement
PLAN_SEQ_LEN = 256


def type_bytes(type_name: str, shape) -> int:
    """Bytes of a ``(rows, cols)`` tensor stored as ``type_name`` (ggml's block sizes, as the file holds it)."""
    return ggml_types.get(type_name).nbytes(shape)


def counted(src) -> bool:
    """Whether a tensor counts in bits per weight (a 2-D tensor of more than one row, as ``weight_bits``)."""
    return src.values.dim() >= 2 and src.values.shape[0] > 1


def bits_per_weight(chosen) -> float:
    """Bits per weight over the 2-D tensors of ``[(source, Choice)]``."""
    nbytes = sum(type_bytes(c.type, s.values.shape) for s, c in chosen if counted(s))
    elems = sum(s.values.numel() for s, c in chosen if counted(s))
    return 8 * nbytes / max(elems, 1)


def roundtrip(values, type_name: str, importance=None):
    """``values`` (float32 ``(out, in)``) as llama.cpp will compute with them after writing them as ``type_name``."""
    import gguf
    import torch

    data = ggml_types.encode(values, type_name, importance)
    return torch.from_numpy(gguf.quants.dequantize(data, ggml_types.get(type_name).qtype())).reshape(values.shape)


def with_weight(module, weight):
    """A shallow copy of a ``nn.Linear`` / ``Conv1D`` computing with ``weight`` (``(out, in)``); the original is
    untouched."""
    import copy

    import torch

    from gptopt_core.kit.layertypes import is_conv1d

    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    w = weight.t().contiguous() if is_conv1d(module) else weight
    new.weight = torch.nn.Parameter(w.to(module.weight.dtype).to(module.weight.device), requires_grad=False)
    return new


def candidates(chosen, upgrade: str, embeddings):
    """``[(source, low Choice, upgraded Choice, weight)]``: float weights that ``--type`` (``--embeddings``)
    quantizes and the upgrade makes bigger: block weights, and an output head and input embedding that are not
    tied (a tied pair is one tensor in the file, and replacing one module would measure half of it)."""
    from gptopt_core.kit.modules import weight_matrix

    head = next((s for s, _ in chosen if s.role == "head"), None)
    untied = head is not None and head.module is not None
    out = []
    for src, low in chosen:
        role_ok = src.role == "weight" or (untied and src.role in ("head", "embedding"))
        if not role_ok or src.origin != "float" or src.module is None or ggml_types.get(low.type).is_float:
            continue
        high = types.choose(src, upgrade, embeddings)
        if type_bytes(high.type, src.values.shape) > type_bytes(low.type, src.values.shape):
            out.append((src, low, high, weight_matrix(src.module)))
    return out


def check_budget(chosen, max_bpw: float) -> float:
    """The file's bits per weight without upgrades; a one-line error when that is over the budget already."""
    base_bpw = bits_per_weight(chosen)
    if base_bpw > max_bpw:
        raise GptoptError(f"export --plan auto: --max-bpw {max_bpw:g} is below the file without upgrades "
                          f"({base_bpw:.3f} bits per weight at --type alone); give a larger budget or a smaller --type")
    return base_bpw


def auto_plan(ctx, chosen, upgrade: str, max_bpw: float, n_blocks: int, embeddings, importance) -> tuple:
    """``({GGUF name: type}, metrics)``: the upgrades ``--plan auto`` picks (see the module docstring)."""
    from gptopt_core.kit.sensitivity import module_sensitivity

    started = time.perf_counter()
    base_bpw = check_budget(chosen, max_bpw)
    cands = candidates(chosen, upgrade, embeddings)
    importance = importance or {}
    by_module = {src.hf_name: (src, low, w) for src, low, _, w in cands}
    replacements = {name: (lambda m, src=src, low=low, w=w: with_weight(
        m, roundtrip(w.detach().float(), low.type, importance.get(src.name)))) for name, (src, low, w) in
        by_module.items()}
    ctx.log(f"  plan auto: measuring {len(replacements)} tensors' sensitivity to their --type on "
            f"{n_blocks}x{PLAN_SEQ_LEN} calibration tokens (train split)")
    sens = module_sensitivity(ctx.model, ctx.calibration_blocks(n_blocks, PLAN_SEQ_LEN), replacements,
                              progress=ctx.progress)["delta_nll"]
    elems = sum(s.values.numel() for s, _ in chosen if counted(s))
    budget = max_bpw * elems / 8 - sum(type_bytes(c.type, s.values.shape) for s, c in chosen if counted(s))
    extra = {src.name: type_bytes(high.type, src.values.shape) - type_bytes(low.type, src.values.shape)
             for src, low, high, _ in cands}
    order = sorted(cands, key=lambda c: -sens[c[0].hf_name] / extra[c[0].name])
    plan = {}
    for src, _, high, _ in order:
        if sens[src.hf_name] > 0 and extra[src.name] <= budget:
            plan[src.name] = high.type
            budget -= extra[src.name]
    final = [(s, types.choose(s, plan[s.name], None) if s.name in plan else c) for s, c in chosen]
    return plan, {"gguf_plan_upgrade_type": upgrade, "gguf_plan_max_bpw": max_bpw,
                  "gguf_plan_base_bpw": round(base_bpw, 4), "gguf_plan_bpw": round(bits_per_weight(final), 4),
                  "gguf_plan_candidates": len(cands), "gguf_plan_upgraded": len(plan),
                  "gguf_plan_calib_tokens": n_blocks * PLAN_SEQ_LEN,
                  # every candidate's ppl ratio at --type alone, in the order upgrades were considered
                  "gguf_plan_sensitivity": {s.name: round(math.exp(sens[s.hf_name]), 7) for s, *_ in order},
                  "gguf_plan": plan, "gguf_plan_seconds": round(time.perf_counter() - started, 3)}


def read_plan_file(path) -> dict:
    """``{name: type}`` from a ``--plan`` JSON/YAML file, every check the file alone allows passed (before the model
    loads): a regular file read by the one safe loader, a non-empty mapping of names (strings) to known GGUF type
    names (strings). One-line errors, names and values escaped."""
    from gptopt_core import safe_text
    from gptopt_core.kit.inputs import load_structured_file

    where = f"export --plan {path}"
    data = load_structured_file(path, where)
    if not isinstance(data, dict) or not data:
        raise GptoptError(f"{where}: give a mapping of tensor names to GGUF types (got {_kind(data)})")
    for key, value in data.items():
        if not isinstance(key, str) or not key.strip():
            raise GptoptError(f"{where}: key {safe_text(repr(key), 40)} is not a tensor name")
        if not isinstance(value, str):
            raise GptoptError(f"{where}: '{safe_text(key, 80)}': give a type name such as q8_0, not {_kind(value)}")
        if value not in ggml_types.TYPES:
            raise GptoptError(f"{where}: '{safe_text(key, 80)}': type '{safe_text(value, 40)}' unknown; use one of "
                              f"{', '.join(ggml_types.NAMES)}")
    return data


def _kind(value) -> str:
    names = {dict: "a mapping", list: "a list", bool: "a boolean", int: "a number", float: "a number",
             type(None): "null"}
    if isinstance(value, dict) and not value:
        return "an empty mapping"
    return names.get(type(value), "a string")


def file_plan(data: dict, srcs, where: str) -> dict:
    """``{GGUF name: type}`` from :func:`read_plan_file`'s mapping of GGUF tensor names or module names to types,
    matched to the model's tensors (``tensors.Source`` list) right after it loads; a name that is no tensor of the
    model, or two names of one tensor (its GGUF name and its module name), is one line."""
    from gptopt_core import safe_text

    by_name = {s.name: s.name for s in srcs}
    by_name.update({s.hf_name: s.name for s in srcs if s.role in ("weight", "embedding", "head") and s.hf_name})
    plan, given = {}, {}
    for key, value in data.items():
        if key not in by_name:
            raise GptoptError(f"{where}: '{safe_text(key, 80)}' is not a tensor of this model (give GGUF names such "
                              f"as {srcs[-1].name} or module names)")
        name = by_name[key]
        if name in given:
            raise GptoptError(f"{where}: '{safe_text(given[name], 80)}' and '{safe_text(key, 80)}' name the same "
                              f"tensor ({name}); give it once")
        given[name] = key
        plan[name] = value
    return plan
