"""Which GGML type each tensor gets (``--type`` / ``--embeddings``), and whether its grid is written exactly."""
from __future__ import annotations

from dataclasses import dataclass

from .blocks import FLOAT_TYPES, exact_type, fits, nearest_type

#: GGUF ``general.file_type`` (llama.cpp's ``LlamaFileType``) for the type most weights have
FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "bf16": 32,
              "q4_k": 14, "q5_k": 16, "q6_k": 18, "iq4_nl": 25}
#: how a tensor whose rows are not whole 256-weight super-blocks is described (llama.cpp's fallback type)
FALLBACK = "fallback, "
#: bitsandbytes layers under ``--type auto``: int8 -> q8_0; NF4/FP4 -> q4_1 (32-blocks with a min, the closest
#: GGUF 4-bit type to their 64-block absmax codebooks; re-rounded from bitsandbytes' own de-quantization)
BNB_AUTO = {"bnb-int8": "q8_0", "bnb-nf4": "q4_1", "bnb-fp4": "q4_1"}
#: how a grid written from its codes with q4_1's min rounded to fp16 is described (see blocks.q4_1_min_inexact)
GRID_CODES = "grid codes, "
FLOAT_OF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class Choice:
    type: str
    how: str  # "exact grid", "grid codes, min ... rounded", "re-rounded (...)", "float", "kept f32", ...


def choose(src, requested: str, embeddings: str | None) -> Choice:
    """The type for one :class:`~gptopt_export.tensors.Source` (see docs/export.md for the rules)."""
    if src.role in ("norm", "bias", "position") or src.values.dim() < 2:
        return Choice("f32", "1-D / position tensor, f32 as llama.cpp's converter writes it")
    if src.role == "router":
        return Choice("f32", "MoE router, f32 as llama.cpp's converter writes it")
    target = embeddings if src.role in ("embedding", "head") and embeddings else requested
    row = src.values.shape[-1]
    if target == "auto":
        if src.origin == "grid":
            exact, why = exact_type(src.grid, src.codes)
            choice = (Choice(nearest_type(src.grid), f"re-rounded ({why})") if exact is None
                      else Choice(exact, GRID_CODES + why if why else "exact grid"))
        elif src.origin in BNB_AUTO:
            choice = Choice(BNB_AUTO[src.origin], f"re-rounded from {src.origin}")
        else:
            choice = Choice(FLOAT_OF_DTYPE.get(src.float_dtype, "f32"), "float")
    elif src.origin == "grid" and target not in FLOAT_TYPES:
        exact, why = exact_type(src.grid, src.codes)
        if exact == target:
            choice = Choice(target, GRID_CODES + why if why else "exact grid")
        else:
            choice = Choice(target, f"re-rounded ({why if exact is None else src.grid.describe() + ' is not ' + target})")
    else:
        how = "float" if target in FLOAT_TYPES and src.origin == "float" else (
            "de-quantized" if target in FLOAT_TYPES else f"quantized from {src.origin}")
        choice = Choice(target, how)
    if not fits(choice.type, row):
        from .kquants import fallback

        other = fallback(choice.type, row)
        if other != choice.type and fits(other, row):
            return Choice(other, f"{FALLBACK}{choice.type} -> {other} as llama.cpp (rows of {row} are not whole "
                                 f"256-weight super-blocks); {choice.how}")
        return Choice("f32", f"kept f32: rows of {row} are not whole 32-weight blocks")
    return choice
