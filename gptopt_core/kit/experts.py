"""Mixture-of-experts: each expert seen as linear layers, for the steps that compress linear layers.

transformers 5 holds a MoE block's experts FUSED (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): ``mlp.experts.gate_up_proj``
``(E, 2*I, H)`` (gate rows then up rows) and ``mlp.experts.down_proj`` ``(E, H, I)``, with a router ``mlp.gate``
(``weight (E, H)``) that is no ``nn.Linear``. ``save_pretrained`` splits them back into the per-expert checkpoint
layout (``experts.N.w1/w3/w2`` for Mixtral, ``experts.N.gate_proj/up_proj/down_proj`` for the others) and
``from_pretrained`` merges them (transformers' ``conversion_mapping.py``): the fused layout is what every step sees.

:func:`expert_linears` shows each expert ``e`` of each MoE block as two ``nn.Linear`` layers named
``<block>.mlp.experts.<e>.gate_up_proj`` ``(2*I, H)`` and ``<block>.mlp.experts.<e>.down_proj`` ``(H, I)``, whose
weights are VIEWS of the fused parameters (a write in place is a write into the model), and runs the experts
through them: expert ``e``'s layers see exactly the tokens the router sent to ``e``. So the calibration engine's
hooks (:func:`gptopt_core.run_blockwise`) collect each expert's Hessian / activation norms from its own routed
tokens, and RTN / GPTQ / Wanda / SparseGPT / magnitude treat each expert like any linear layer. Gate and up stay
one ``gate_up_proj`` layer per expert: they read the same input, so their per-row grids, Hessian and Wanda norms are
those of two separate layers (llama.cpp's export splits them into ``ffn_gate_exps`` / ``ffn_up_exps``).

The routers stay float: Mixtral's and the others' are no linear layer, and Qwen2-MoE's shared-expert gate (a linear
layer of one row) is left out of :func:`gptopt_core.weight_modules` unless named, so no step touches them; each step
says what it did to experts and routers in its metrics (:func:`moe_effect`).

An expert whose calibration saw fewer than ``min_tokens`` tokens (default :data:`MIN_EXPERT_TOKENS`) gets
uninformative statistics (identity Hessian, unit activation norms), the one stated rule: GPTQ on it is then
round-to-nearest, Wanda and SparseGPT magnitude pruning; such experts are listed in the step's metrics
(``experts_below_min``), beside the tokens every expert saw (``expert_tokens``: per block, per expert).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

#: default ``--min-expert-tokens``: below it an expert's statistics are replaced (see the module docstring); 16
#: tokens give a Hessian of rank at most 16, a quarter of the tiny models' width, far less than a real one's
MIN_EXPERT_TOKENS = 16
EXPERT_ATTR = "gptopt_expert"  # on a view layer: (block index, expert index, "gate_up_proj" | "down_proj")
PARTS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class MoeLayout:
    """How a family holds its experts: an :class:`gptopt_core.Architecture`'s ``moe`` field (names relative to
    the block)."""

    #: the module holding ``gate_up_proj`` ``(E, 2*I, H)`` and ``down_proj`` ``(E, H, I)`` as parameters
    experts: str = "mlp.experts"
    #: the router (``weight (E, H)``); kept float
    router: str = "mlp.gate"
    #: config attributes: number of experts, experts per token
    count: str = "num_experts"
    used: str = "num_experts_per_tok"
    #: a shared expert beside the routed ones (Qwen2-MoE ``mlp.shared_expert``; its linear layers are in the
    #: row's groups), and its scalar gate (kept float like the router); empty: none
    shared: str = ""
    shared_gate: str = ""


_views: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # experts module -> [ModuleDict per expert]


def _linear_view(param, e: int):
    import torch.nn as nn

    rows, cols = param.shape[1], param.shape[2]
    layer = nn.Linear(cols, rows, bias=False, device="meta")
    layer.weight = nn.Parameter(param.data[e], requires_grad=param.requires_grad)
    layer.gptopt_fused_ptr = param.data[e].data_ptr()  # where the view was made: to tell who moved
    return layer


def _linked(layer, param, e: int) -> bool:
    w = layer.weight
    return w.device == param.device and w.dtype == param.dtype and w.data_ptr() == param.data[e].data_ptr()


def _experts_views(experts, block: int):
    """The per-expert views of one fused experts module, made once and linked again when they no longer share
    storage: a view whose weight a step replaced is copied back into the fused parameter; a fused parameter the
    model replaced (a dtype or device move) wins. A relinked layer keeps its grid (the export checks it is still
    on it)."""
    import torch
    import torch.nn as nn

    views = _views.get(experts)
    n = experts.gate_up_proj.shape[0]
    if views is None or len(views) != n:
        views = [nn.ModuleDict() for _ in range(n)]
        _views[experts] = views
    for e, view in enumerate(views):
        for part in PARTS:
            param = getattr(experts, part)
            old = view[part] if part in view else None
            if old is None or not _linked(old, param, e):
                layer = _linear_view(param, e)
                if old is not None:
                    if old.gptopt_fused_ptr == param.data[e].data_ptr():  # a step replaced the view's weight
                        with torch.no_grad():
                            param.data[e].copy_(old.weight.data.to(param.dtype))
                    layer.__dict__.update({k: v for k, v in old.__dict__.items()
                                           if k.startswith("gptopt_") and k != "gptopt_fused_ptr"})
                setattr(layer, EXPERT_ATTR, (block, e, part))
                view[part] = layer
    return views


def _fused(experts):
    """The module holding the fused parameters: peft's ``target_parameters`` LoRA wraps it (``ParamWrapper``, one
    per parameter, nested), the wrapped module is its ``base_layer``."""
    while "gate_up_proj" not in experts._parameters and hasattr(experts, "base_layer"):
        experts = experts.base_layer
    return experts


@dataclass(frozen=True, eq=False)
class MoeBlock:
    """One mixture-of-experts block of a model, found by its architecture row (:func:`moe_layers`)."""

    index: int  # the transformer block's index
    name: str  # qualified name of the MoE module holding experts and router (``model.layers.0.mlp``)
    module: object  # that module
    experts_name: str  # qualified name of the experts module (``model.layers.0.mlp.experts``)
    experts: object  # the module holding the fused ``gate_up_proj`` / ``down_proj`` (a peft wrapper looked through)
    router: object  # the router (``weight (E, H)``)
    shared_gate: object = None  # Qwen2-MoE's shared-expert gate (an ``nn.Linear`` of one row), else None

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])


def moe_layers(model, arch=None) -> list:
    """The :class:`MoeBlock` s of a model, in block order (by its architecture row's ``moe``; a PEFT wrapper is
    looked through); ``[]`` for a dense model or a family the table does not know."""
    from ..architectures import architecture_of

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    arch = arch or architecture_of(base)
    if arch is None or getattr(arch, "moe", None) is None:
        return []
    moe = arch.moe
    parent = moe.experts.rsplit(".", 1)[0] if "." in moe.experts else ""
    out = []
    for i, block in enumerate(base.get_submodule(arch.blocks)):
        prefix = f"{arch.blocks}.{i}"
        out.append(MoeBlock(i, f"{prefix}.{parent}" if parent else prefix, block.get_submodule(parent),
                            f"{prefix}.{moe.experts}", _fused(block.get_submodule(moe.experts)),
                            block.get_submodule(moe.router),
                            block.get_submodule(moe.shared_gate) if moe.shared_gate else None))
    return out


def moe_blocks(model, arch=None) -> list:
    """``[(block index, qualified name of the experts module, experts module, router module)]`` of a MoE model (by
    its architecture row's ``moe``); ``[]`` for a dense model."""
    return [(b.index, b.experts_name, b.experts, b.router) for b in moe_layers(model, arch)]


def router_ids(model) -> set:
    """``id()`` of every router and shared-expert gate of a MoE model: the modules every step keeps float unless
    asked (:func:`gptopt_core.weight_modules` leaves them out unless ``include`` names them); none while
    ``expert_linears(model, routers=True)`` shows them as layers to quantize."""
    from ..architectures import architecture_table

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = getattr(getattr(base, "config", None), "model_type", None)
    row = architecture_table().get(kind) if isinstance(kind, str) else None
    if row is None or row.moe is None or getattr(base, ROUTERS_SHOWN, False):  # a dense model: nothing to look up
        return set()
    return {id(m) for b in moe_layers(model) for m in (b.router, b.shared_gate) if m is not None}


#: what a step that does not touch routers says of them
ROUTER_FLOAT = "float (not quantized or pruned)"
ROUTER_INCLUDED = ("quantized like the linear layers (--router include: routers and shared-expert gates on the "
                   "step's grids)")
ROUTER_VIEW = "gptopt_linear"  # --router include: the child nn.Linear of a router that is no linear layer
ROUTERS_SHOWN = "gptopt_routers_shown"  # on the model while routers are shown as layers


def _show_routers(model, blocks) -> list:
    """``--router include``: each router that is no linear layer gets a child ``nn.Linear`` holding the very same
    weight parameter, run on the router's input by a forward pre-hook (so calibration sees the router's tokens);
    Qwen2-MoE's shared-expert gate is a linear layer already. Returns the hooks to remove."""
    import torch.nn as nn

    from .layertypes import is_weight_layer

    hooks = []
    (model.get_base_model() if hasattr(model, "get_base_model") else model).__dict__[ROUTERS_SHOWN] = True
    for b in blocks:
        if is_weight_layer(b.router):
            continue
        rows, cols = b.router.weight.shape
        view = nn.Linear(cols, rows, bias=False, device="meta")
        view.weight = b.router.weight
        b.router.add_module(ROUTER_VIEW, view)
        hooks.append(b.router.register_forward_pre_hook(_run_view(view)))
    return hooks


def _run_view(view):
    def hook(module, args):
        view(args[0])  # the calibration engine's hooks on the view see the router's input; the router runs as it is
    return hook


def _hide_routers(model, blocks, hooks) -> None:
    """Undo :func:`_show_routers`; a router weight a step replaced on the view is copied back."""
    import torch

    for h in hooks:
        h.remove()
    (model.get_base_model() if hasattr(model, "get_base_model") else model).__dict__.pop(ROUTERS_SHOWN, None)
    for b in blocks:
        view = b.router._modules.pop(ROUTER_VIEW, None)
        if view is not None and view.weight is not b.router.weight:
            with torch.no_grad():
                b.router.weight.copy_(view.weight.to(b.router.weight.dtype))


def moe_effect(model, experts: str, router: str = ROUTER_FLOAT) -> dict:
    """``{"experts": experts, "router": router}``: what a step did to a mixture of experts' experts and routers,
    for its metrics; ``{}`` for a dense model."""
    return {"experts": experts, "router": router} if moe_layers(model) else {}


def expert_layers(model) -> list:
    """``[(qualified name, nn.Linear view)]`` of every expert's ``gate_up_proj`` and ``down_proj`` (see the module
    docstring), in block then expert order; ``[]`` for a dense model. The views share storage with the fused
    parameters and keep what steps attach to them (integer grids)."""
    out = []
    for i, name, experts, _ in moe_blocks(model):
        for e, view in enumerate(_experts_views(experts, i)):
            out.extend((f"{name}.{e}.{part}", view[part]) for part in PARTS)
    return out


def _routed_forward(experts, views):
    """The experts' forward through the per-expert views: the reference loop of transformers' eager experts
    (tokens grouped by expert, weighted by their router weight, summed back)."""
    def forward(hidden_states, top_k_index, top_k_weights):
        import torch

        out = torch.zeros_like(hidden_states)
        for e, view in enumerate(views):
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            gate, up = view["gate_up_proj"](hidden_states[token]).chunk(2, dim=-1)
            y = view["down_proj"](experts.act_fn(gate) * up) * top_k_weights[token, pos, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out
    return forward


class expert_linears:
    """``with expert_linears(model) as moe:`` the experts of a MoE model are ``nn.Linear`` children of their
    experts module (``...mlp.experts.<e>.gate_up_proj``) that run the routed tokens, so :func:`weight_modules`,
    the calibration engine and every per-layer compressor see them; on exit they are unhooked again (the weights
    live in the fused parameters all along; one a step replaced is copied back). A dense model is left as it is.
    ``moe.min_tokens``: the ``--min-expert-tokens`` rule (module docstring); ``moe.metrics()``: what the step
    reports (number of experts, and the coverage the calibration engine recorded)."""

    def __init__(self, model, min_tokens: int = MIN_EXPERT_TOKENS, routers: bool = False):
        self.model, self.min_tokens, self.blocks = model, int(min_tokens), moe_blocks(model)
        self.routers, self.router_hooks = routers and bool(self.blocks), []
        self.coverage: dict = {}  # {block: {expert: tokens}} filled by the calibration engine
        self.below: list = []

    def __enter__(self):
        for i, _, experts, _ in self.blocks:
            views = _experts_views(experts, i)
            for e, view in enumerate(views):
                experts.add_module(str(e), view)
                for layer in view.values():
                    layer.gptopt_expert_rule = self
            experts.forward = _routed_forward(experts, views)
        if self.routers:
            self.router_hooks = _show_routers(self.model, moe_layers(self.model))
        return self

    def __exit__(self, *exc):
        if self.routers:
            _hide_routers(self.model, moe_layers(self.model), self.router_hooks)
        for i, _, experts, _ in self.blocks:
            for e, view in enumerate(_views.get(experts, [])):
                experts._modules.pop(str(e), None)
                for layer in view.values():
                    layer.__dict__.pop("gptopt_expert_rule", None)
            experts.__dict__.pop("forward", None)
            _experts_views(experts, i)  # write back any view a step replaced
        return False

    def record(self, layer, stats) -> None:
        """Called by the calibration engine with an expert view's gathered statistics: note its tokens and apply
        the ``min_tokens`` rule."""
        block, e, part = getattr(layer, EXPERT_ATTR)
        if part == "gate_up_proj":
            self.coverage.setdefault(block, {})[e] = int(stats.samples)
        if stats.samples < self.min_tokens:
            import torch

            cols = layer.weight.shape[1]
            if part == "gate_up_proj":
                self.below.append(f"{block}.{e}")
            if stats.hessian is not None:
                stats.hessian = torch.eye(cols, device=layer.weight.device) * 2.0
            if stats.sq_norms is not None:
                stats.sq_norms = torch.ones(cols, device=layer.weight.device)

    def metrics(self) -> dict:
        if not self.blocks:
            return {}
        n = self.blocks[0][2].gate_up_proj.shape[0]
        out = {"moe_blocks": len(self.blocks), "experts_per_block": n,
               "router": ROUTER_INCLUDED if self.routers else ROUTER_FLOAT}
        if self.coverage:
            out["expert_tokens"] = {str(b): [self.coverage[b].get(e, 0) for e in range(n)]
                                    for b in sorted(self.coverage)}
            out["min_expert_tokens"] = self.min_tokens
            out["experts_below_min"] = self.below
        return out


def record_experts(layers: dict, gathered: dict) -> None:
    """The calibration engine hands each group's statistics here: an expert view running under
    :class:`expert_linears` records its coverage and gets the ``min_tokens`` rule."""
    for name, stats in gathered.items():
        rule = getattr(layers[name], "gptopt_expert_rule", None)
        if rule is not None:
            rule.record(layers[name], stats)


def peak_routers(model, logit_std: float = 4.0) -> None:
    """Scale every router so that its logits on the model's hidden states have a standard deviation near
    ``logit_std`` (random init gives ~0.16: uniform routing). The tiny MoE models use it, so each token strongly
    prefers its top-k and a wrong expert order or router layout changes the predictions."""
    import torch

    with torch.no_grad():
        for _, _, _, router in moe_blocks(model):
            w = router.weight
            # a normalized hidden state has unit-scale entries: logit std = ||row|| on average
            w.mul_(logit_std / float(w.norm(dim=1).mean()))


def with_experts(model, run, min_tokens=None, log=None, offload=None, step: str = "", routers: bool = False) -> dict:
    """``run()`` (a step's body, returning its metrics) with the experts shown as linear layers
    (:class:`expert_linears`), the experts' figures added to its metrics; a dense model just runs it. ``log``
    (``ctx.log``) gets one line naming the experts below ``min_tokens`` (``block.expert``). ``offload`` (the step's
    ``--offload``): block offloading moves each view apart from its fused parameter, so a MoE model refuses it
    (one-line :class:`gptopt_core.GptoptError` naming ``step``). ``routers``: ``--router include``, the routers and
    shared-expert gates are layers of the step too (the metrics' ``router`` says so)."""
    if offload not in (None, "none") and moe_blocks(model):
        from ..errors import GptoptError

        raise GptoptError(f"{step} --offload {offload}: not supported on a mixture of experts yet (offloading "
                          "moves each expert's layers apart from the fused expert weights); use --offload none")
    with expert_linears(model, MIN_EXPERT_TOKENS if min_tokens is None else min_tokens, routers) as moe:
        metrics = run()
    if moe.below and log is not None:
        log(f"  {len(moe.below)} experts saw fewer than {moe.min_tokens} calibration tokens (identity statistics: "
            f"round-to-nearest / magnitude on them): {', '.join(moe.below)}")
    return {**metrics, **moe.metrics()}
