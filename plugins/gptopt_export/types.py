"""Which GGML type each tensor gets (``--type`` / ``--embeddings`` / ``--plan``), and whether its grid is written
exactly; every fact about a type comes from the type table (:mod:`.ggml_types`)."""
from __future__ import annotations

from dataclasses import dataclass

from . import ggml_types

#: how a tensor whose rows are not whole 256-weight super-blocks is described (llama.cpp's fallback type)
FALLBACK_NOTE = "fallback, "
#: bitsandbytes layers under ``--type auto``: int8 -> q8_0; NF4/FP4 -> q4_1 (32-blocks with a min, the closest
#: GGUF 4-bit type to their 64-block absmax codebooks; re-rounded from bitsandbytes' own de-quantization)
BNB_AUTO = {"bnb-int8": "q8_0", "bnb-nf4": "q4_1", "bnb-fp4": "q4_1"}
#: how a grid written from its codes with q4_1's min rounded to fp16 is described (see q4_1_min_inexact)
GRID_CODES = "grid codes, "
FLOAT_OF_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class Choice:
    type: str
    how: str  # "exact grid", "grid codes, min ... rounded", "re-rounded (...)", "float", "kept f32", ...

    @property
    def from_codes(self) -> bool:
        """Written from the grid's codes and scales (exactly, or with q4_1's min rounded), not re-rounded."""
        return self.how == "exact grid" or self.how.startswith(GRID_CODES)


def exact_type(grid, codes) -> tuple[str | None, str]:
    """The GGUF type holding ``grid``'s codes and scales, or ``None``, and a note: ``""`` when the block type
    holds the grid exactly, else why not (for ``None``) or what is rounded (the min of an asymmetric grid, see
    :func:`q4_1_min_inexact`)."""
    exact = [t for t in ggml_types.TYPES.values() if t.exact_grid]
    if grid.group_size not in {t.block for t in exact}:
        return None, f"{grid.describe()}: GGUF blocks are {'/'.join(sorted({str(t.block) for t in exact}))} weights"
    found = next((t for t in exact if t.exact_grid == (grid.bits, grid.symmetric) and t.block == grid.group_size),
                 None)
    if found is None:
        return None, f"{grid.describe()}: no GGUF block type with these codes"
    if grid.symmetric:
        return found.name, ""
    inexact = q4_1_min_inexact(grid)
    return found.name, (f"min -zero*scale rounded to fp16 in {inexact:.1%} of blocks" if inexact else "")


def nearest_type(grid) -> str:
    """The type a grid that has no exact GGUF form is re-rounded to."""
    if grid.bits >= 8:
        return "q8_0"
    if grid.bits == 5:
        return "q5_0" if grid.symmetric else "q5_1"
    return "q4_0" if grid.symmetric else "q4_1"


def q4_1_min_inexact(grid) -> float:
    """Fraction of blocks whose q4_1 min ``m = -zero * scale`` is not an fp16 value. q4_1 stores ``m`` as fp16, so
    such a block keeps its codes and scale and gets the nearest fp16 ``m``: every weight of the block moves by the
    same offset, at most half an fp16 step of ``m`` (far less than re-rounding the block to a new grid)."""
    m = -(grid.zero.float() * grid.scale.float())
    return float((m.half().float() != m).float().mean())


def _grid_choice(src, target: str) -> Choice:
    """A grid tensor under an explicit ``target``: from its codes when that type holds the grid, else re-rounded."""
    exact, why = exact_type(src.grid, src.codes)
    if exact == target:
        return Choice(target, GRID_CODES + why if why else "exact grid")
    return Choice(target, f"re-rounded ({why if exact is None else src.grid.describe() + ' is not ' + target})")


def _auto_choice(src) -> Choice:
    if src.origin == "grid":
        exact, why = exact_type(src.grid, src.codes)
        return (Choice(nearest_type(src.grid), f"re-rounded ({why})") if exact is None
                else Choice(exact, GRID_CODES + why if why else "exact grid"))
    if src.origin in BNB_AUTO:
        return Choice(BNB_AUTO[src.origin], f"re-rounded from {src.origin}")
    return Choice(FLOAT_OF_DTYPE.get(src.float_dtype, "f32"), "float")


def choose(src, requested: str, embeddings: str | None) -> Choice:
    """The type for one :class:`~gptopt_export.tensors.Source` (see docs/export.md for the rules)."""
    if src.role in ("norm", "bias", "position") or src.values.dim() < 2:
        return Choice("f32", "1-D / position tensor, f32 as llama.cpp's converter writes it")
    if src.role == "router":
        return Choice("f32", "MoE router, f32 as llama.cpp's converter writes it")
    target = embeddings if src.role in ("embedding", "head") and embeddings else requested
    if target == "auto":
        choice = _auto_choice(src)
    elif src.origin == "grid" and not ggml_types.get(target).is_float:
        choice = _grid_choice(src, target)
    else:
        is_float = ggml_types.get(target).is_float
        how = "float" if is_float and src.origin == "float" else (
            "de-quantized" if is_float else f"quantized from {src.origin}")
        choice = Choice(target, how)
    return _fitted(choice, src.values.shape[-1])


def _fitted(choice: Choice, row: int) -> Choice:
    """``choice``, or llama.cpp's fallback type where rows are not whole blocks of it, or f32 where neither fits."""
    kind = ggml_types.get(choice.type)
    if kind.fits(row):
        return choice
    other = ggml_types.get(kind.fallback) if kind.fallback else None
    if other is not None and other.fits(row):
        return Choice(other.name, f"{FALLBACK_NOTE}{choice.type} -> {other.name} as llama.cpp (rows of {row} are not "
                                  f"whole {kind.block}-weight super-blocks); {choice.how}")
    return Choice("f32", f"kept f32: rows of {row} are not whole {(other or kind).block}-weight blocks")
