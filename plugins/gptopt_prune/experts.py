"""Expert pruning (REAP: router-weighted expert activation pruning) of mixture-of-experts layers.

A mixture-of-experts layer, as transformers 5 holds it (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a block with a
router ``gate`` (``weight`` ``(E, hidden)``, softmax over the E experts, top-k) and ``experts``, whose parameters are
fused over the experts, first dimension E (``gate_up_proj`` ``(E, 2*I, hidden)``, ``down_proj`` ``(E, hidden, I)``).

Each expert ``j`` of a layer gets the REAP score on calibration text (Lasby et al. 2025, "REAP the Experts"):
``S_j = mean over the tokens x routed to j of g_j(x) * ||f_j(x)||_2``, with ``g_j(x)`` the routing weight the
family's router gave ``j`` for ``x`` (after its top-k renormalization, where it does one) and ``f_j(x)`` the expert's
output. An expert no token reached scores 0. The lowest-scored experts of every layer go: their slices of every fused
parameter and their router rows, so the kept experts keep their order. ``merge`` folds each dropped expert into the
kept expert of the same layer whose weights are most similar (cosine), weighted by the two experts' routed mass
(sum of g over their tokens).

Routing after pruning is the family's own over the kept experts: the router's softmax runs over the kept rows, so
where the family renormalizes the top-k weights (Mixtral always; Qwen2/3-MoE and OLMoE with ``norm_topk_prob``) a
token's weights still sum to 1, and where it does not they are the softmax over the kept experts (each kept weight
grows by the dropped experts' share of the softmax).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gptopt_core import GptoptError
from gptopt_core.kit.experts import moe_layers

#: config keys that count a model's routed experts (aliases of each other in the families that have both)
COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(eq=False)
class MoeLayer:
    """One mixture-of-experts block: ``name`` (qualified), the block, its router and its fused experts."""

    name: str
    block: Any
    gate: Any
    experts: Any
    score_sum: Any = None
    tokens: Any = None
    mass: Any = None

    @property
    def num_experts(self) -> int:
        return int(self.gate.weight.shape[0])

    @property
    def top_k(self) -> int:
        for owner in (self.gate, self.block):
            k = getattr(owner, "top_k", None)
            if isinstance(k, int):
                return k
        raise GptoptError(f"prune-experts: {self.name}'s router has no top_k; this MoE layout is not supported")

    def fused(self) -> dict:
        """The experts' parameters fused over the experts (first dimension E), by name."""
        return {n: p for n, p in self.experts.named_parameters(recurse=False) if p.dim() >= 1
                and p.shape[0] == self.num_experts}

    def scores(self) -> list:
        """REAP score per expert (0 where no token was routed to it)."""
        return [float(s) / int(n) if int(n) else 0.0 for s, n in zip(self.score_sum, self.tokens)]


def check_moe(model, what: str = "prune-experts") -> list[MoeLayer]:
    """The model's MoE blocks in model order, as the architecture table finds them (:func:`gptopt_core.moe_layers`,
    a PEFT wrapper looked through); one-line refusal for a model without any, or with layers of different expert
    counts."""
    layers = [MoeLayer(b.name, b.module, b.router, b.experts) for b in moe_layers(model)]
    if not layers:
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise GptoptError(f"{what}: the model ('{kind}') has no mixture-of-experts layers (no MoE family of the "
                          "architecture table); it applies to MoE models such as Mixtral, Qwen2/3-MoE, OLMoE")
    counts = sorted({layer.num_experts for layer in layers})
    if len(counts) > 1:
        raise GptoptError(f"{what}: the MoE layers hold different expert counts ({counts}); the config holds one")
    return layers


def keep_count(layers: list[MoeLayer], keep, keep_fraction) -> int:
    """Experts to keep per layer from ``--keep`` or ``--keep-fraction``; refuses fewer than top-k or more than E."""
    total, top_k = layers[0].num_experts, max(layer.top_k for layer in layers)
    n = keep if keep is not None else max(1, round(keep_fraction * total))
    how = f"--keep {keep}" if keep is not None else f"--keep-fraction {keep_fraction} ({n} of {total})"
    if n < top_k:
        raise GptoptError(f"prune-experts: {how} is fewer experts than the router picks per token (top-k "
                          f"{top_k}); keep at least {top_k}")
    if n > total:
        raise GptoptError(f"prune-experts: {how} is more experts than the layers hold ({total})")
    return n


# -- scoring ------------------------------------------------------------------------------------------
class ReapCollector:
    """Forward hooks on every layer's experts module: per expert, sum of g * ||f(x)|| and the routed token count."""

    def __init__(self, layers: list[MoeLayer]):
        self.layers, self.handles, self.busy = layers, [], False

    def __enter__(self):
        import torch

        for layer in self.layers:
            e, dev = layer.num_experts, layer.gate.weight.device
            layer.score_sum = torch.zeros(e, dtype=torch.float64, device=dev)
            layer.tokens = torch.zeros(e, dtype=torch.long, device=dev)
            layer.mass = torch.zeros(e, dtype=torch.float64, device=dev)
            self.handles.append(layer.experts.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer):
        def hook(module, args, output):
            if self.busy:  # our own per-expert calls below
                return
            self.busy = True
            try:
                self.collect(layer, *args[:3])
            finally:
                self.busy = False
        return hook

    def collect(self, layer: MoeLayer, hidden, top_k_index, top_k_weights) -> None:
        """Each expert's output on the tokens routed to it, through the experts module itself (whatever layout or
        kernel the family uses): all tokens sent to expert ``j`` with weight 1."""
        import torch

        hidden = hidden.reshape(-1, hidden.shape[-1])
        with torch.no_grad():
            for j in torch.unique(top_k_index).tolist():
                if not 0 <= j < layer.num_experts:
                    continue
                rows, slot = torch.where(top_k_index == j)
                x = hidden[rows]
                index = torch.full((x.shape[0], 1), j, dtype=top_k_index.dtype, device=x.device)
                ones = torch.ones((x.shape[0], 1), dtype=top_k_weights.dtype, device=x.device)
                out = layer.experts(x, index, ones)
                g = top_k_weights[rows, slot].double()
                layer.score_sum[j] += (g * out.double().norm(dim=-1)).sum()
                layer.tokens[j] += rows.numel()
                layer.mass[j] += g.sum()


def reap_scores(ctx, model, layers: list[MoeLayer], batches) -> None:
    """Run the calibration batches through the model with :class:`ReapCollector` on (scores land on ``layers``)."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with ReapCollector(layers), torch.no_grad():
            for batch in ctx.progress(batches, "prune-experts (REAP scores)"):
                model(input_ids=batch, use_cache=False)
    finally:
        model.train(was_training)


# -- dropping and merging -----------------------------------------------------------------------------
def choose(scores: list, n: int) -> tuple[list, list]:
    """``(kept, dropped)`` expert indices, each ascending: the ``n`` highest scores kept (ties: lower index)."""
    order = sorted(range(len(scores)), key=lambda j: (-scores[j], j))
    return sorted(order[:n]), sorted(order[n:])


def merge_targets(layer: MoeLayer, kept: list, dropped: list) -> dict:
    """``{dropped: kept}``: the kept expert whose weights (all fused parameters, flattened) are most similar."""
    import torch

    flat = torch.cat([p.detach().reshape(layer.num_experts, -1).float() for p in layer.fused().values()], dim=1)
    flat = torch.nn.functional.normalize(flat, dim=1)
    sim = flat[dropped] @ flat[kept].t()
    return {d: kept[int(i)] for d, i in zip(dropped, sim.argmax(dim=1).tolist())}


def fold(layer: MoeLayer, into: dict) -> None:
    """Each kept expert becomes the routed-mass-weighted mean of itself and the experts folded into it."""
    import torch

    mass = layer.mass.float().clamp_min(1e-12)
    groups: dict = {}
    for d, k in into.items():
        groups.setdefault(k, [k]).append(d)
    with torch.no_grad():
        for p in layer.fused().values():
            for k, members in groups.items():
                w = mass[members].to(p.device, torch.float32)
                mixed = (p[members].float() * (w / w.sum()).view(-1, *([1] * (p.dim() - 1)))).sum(0)
                p[k].copy_(mixed.to(p.dtype))


def _slice_params(module, total: int, keep_idx) -> list:
    """Keep rows ``keep_idx`` of every direct parameter / buffer whose first dimension is ``total``."""
    import torch

    sliced = []
    for name, p in list(module.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == total:
            new = torch.nn.Parameter(p.detach()[keep_idx.to(p.device)].clone(), requires_grad=p.requires_grad)
            setattr(module, name, new)
            sliced.append(name)
    for name, b in list(module.named_buffers(recurse=False)):
        if b is not None and b.dim() >= 1 and b.shape[0] == total:
            module.register_buffer(name, b[keep_idx.to(b.device)].clone())
            sliced.append(name)
    return sliced


def slice_layer(layer: MoeLayer, kept: list) -> None:
    """Keep experts ``kept`` (ascending) of ``layer``: fused parameters, router rows, expert counts."""
    import torch

    total = layer.num_experts
    keep_idx = torch.tensor(kept, dtype=torch.long)
    _slice_params(layer.experts, total, keep_idx)
    _slice_params(layer.gate, total, keep_idx)
    for owner in (layer.block, layer.gate, layer.experts):
        if getattr(owner, "num_experts", None) == total:
            owner.num_experts = len(kept)


def set_config_count(model, before: int, after: int) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for cfg in {id(c): c for c in (base.config, getattr(base.config, "text_config", None)) if c is not None}.values():
        for key in COUNT_KEYS:
            if getattr(cfg, key, None) == before:
                setattr(cfg, key, after)


def routing_rule(model) -> str:
    cfg = model.config
    kind = getattr(cfg, "model_type", "?")
    renorm = True if kind == "mixtral" else bool(getattr(cfg, "norm_topk_prob", False))
    if renorm:
        return "softmax over the kept experts, top-k weights renormalized to sum 1 (as the family does)"
    return ("softmax over the kept experts, top-k weights not renormalized (norm_topk_prob false: each kept "
            "expert's weight grows by the dropped experts' share)")


def _sig(value: float) -> float:
    """Six significant digits (scores of small models are small)."""
    return float(f"{value:.6g}")


@dataclass
class LayerResult:
    kept: list
    dropped: list
    scores: list
    tokens: list
    mass: list
    merged_into: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"kept": self.kept, "dropped": self.dropped, "scores": [_sig(s) for s in self.scores],
               "tokens": self.tokens, "routed_mass": [_sig(m) for m in self.mass]}
        if self.merged_into:
            out["merged_into"] = {str(d): k for d, k in self.merged_into.items()}
        return out


def prune_layer(layer: MoeLayer, n: int, mode: str) -> LayerResult:
    scores = layer.scores()
    kept, dropped = choose(scores, n)
    into = merge_targets(layer, kept, dropped) if mode == "merge" and dropped else {}
    if into:
        fold(layer, into)
    result = LayerResult(kept, dropped, scores, [int(t) for t in layer.tokens], [float(m) for m in layer.mass],
                         into)
    slice_layer(layer, kept)
    return result
