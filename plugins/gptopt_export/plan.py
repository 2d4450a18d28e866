"""The export plan: every tensor the GGUF file will hold, where its values come from and the type it is written
as, built once per export and then read by everything that needs it (``--plan`` checks and ``--plan auto``, the
importance matrix's names, the writer).

The tensors are those of the model as the chain left it, so a plan built before the chain runs (the export step's
preflight, which needs it for its checks) is kept only while the model is unchanged: :meth:`ExportPlan.current`
compares a fingerprint of the model's modules, parameters (identity, storage, in-place version) and attached
grids taken when the plan was built. A chain whose earlier steps changed the model gets one new plan when the
export runs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from . import tensors, types


def fingerprint(model) -> tuple:
    """What a plan depends on in ``model``: modules, their parameters (identity, storage, shape, dtype and
    in-place version) and attached grids, and the config. A model whose tensors carry no version counter
    (inference tensors) gets a fresh object: never equal, so its plan is never reused."""
    from gptopt_core.kit.grids import grid_of

    out = []
    try:
        for name, module in model.named_modules():
            grid = grid_of(module)
            params = tuple((pname, id(p), p.data_ptr(), p._version, tuple(p.shape), str(p.dtype))
                           for pname, p in module.named_parameters(recurse=False))
            out.append((name, id(module), None if grid is None else id(grid), params))
    except RuntimeError:
        return (object(),)
    config = getattr(model, "config", None)
    try:
        out.append(config.to_json_string(use_diff=False))
    except Exception:  # a config that does not serialize: its identity and repr
        out.append((id(config), repr(config)))
    return tuple(out)


@dataclass
class ExportPlan:
    """The tensors of one export and their types, in file order."""

    arch: Any  # the model's row of the architecture table
    entries: list  # [(tensors.Source, types.Choice)]
    type_name: str  # --type
    embeddings: Optional[str]  # --embeddings
    overrides: dict = field(default_factory=dict)  # {GGUF name: type} of --plan (file or auto), applied
    stamp: tuple = ()  # fingerprint of the model when built

    @property
    def sources(self) -> list:
        return [src for src, _ in self.entries]

    def current(self, model) -> bool:
        """Whether the model still is what the plan was built from (see the module docstring)."""
        return bool(self.stamp) and fingerprint(model) == self.stamp

    def with_types(self, overrides: dict | None) -> "ExportPlan":
        """This plan with ``{GGUF name: type}`` over ``--type`` / ``--embeddings`` for the tensors it names."""
        overrides = {**self.overrides, **(overrides or {})}
        entries = [(src, types.choose(src, overrides[src.name], None) if src.name in overrides else choice)
                   for src, choice in self.entries]
        return replace(self, entries=entries, overrides=overrides)

    def weight_types(self) -> Counter:
        """Types of the weight matrices (2-D, not position tensors)."""
        return Counter(c.type for s, c in self.entries if s.values.dim() >= 2 and s.role != "position")

    def file_type(self) -> str:
        """The type most weights have (``general.file_type``), ``f32`` when there are none."""
        weights = self.weight_types()
        return weights.most_common(1)[0][0] if weights else "f32"


def build(model, plugins=None, type_name: str = "auto", embeddings: str | None = None,
          overrides: dict | None = None) -> ExportPlan:
    """The plan of ``model`` as it is now: its tensors in llama.cpp's names and layouts
    (:func:`gptopt_export.tensors.sources`, walked once here), each with its type from ``--type`` /
    ``--embeddings``, or from ``overrides`` (``{GGUF name: type}``, ``--plan``) for the tensors it names."""
    stamp = fingerprint(model)
    arch = tensors.family(model, plugins)
    entries = [(src, types.choose(src, type_name, embeddings)) for src in tensors.sources(model, plugins)]
    return ExportPlan(arch, entries, type_name, embeddings, stamp=stamp).with_types(overrides)
