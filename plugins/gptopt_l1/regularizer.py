"""The L1 regularizer at work inside the core's training loop (torch is imported here, not in the entry module).

One :class:`Runtime` per training step holds the resolved target layers (plain or PEFT-LoRA-wrapped), the
currently selected weights (``--select prunable``) and the zero-fraction history. The hooks in
:mod:`gptopt_l1` call :meth:`Runtime.penalty` (every micro-batch) and :meth:`Runtime.after_step` (after every
optimizer step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from gptopt_core import GptoptError
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import weight_modules

SMALL = 1e-3


def find_targets(model, patterns, step: str = "l1") -> list:
    """``[(name, module)]`` of the layers ``<step> --targets`` names (default: every linear layer but the head).

    Works on the plain model; a PEFT-wrapped model is looked at through its base model. Raises
    :class:`GptoptError` when a pattern matches nothing.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = weight_modules(base)
    if not patterns:
        if not layers:
            raise GptoptError(f"{step}: this model has no linear or Conv1D layer to regularize")
        return layers
    every = weight_modules(base, with_head=True)
    for pattern in patterns:
        if not weight_modules(base, include=[pattern]):
            example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in every})[:8])
            raise GptoptError(f"{step}: --targets '{pattern}' matches no linear or Conv1D layer of this model; its "
                              f"layers are named like: {example}")
    return weight_modules(base, include=patterns)


@dataclass(eq=False)
class Layer:
    name: str
    module: Any  # the layer in the model being trained (a PEFT LoRA layer, or the plain Linear/Conv1D)
    lora: bool
    conv1d: bool
    sel: Optional[Any] = None  # bool tensor, stored orientation: the weights being penalised (None = all)

    @property
    def base(self):
        return self.module.base_layer if self.lora else self.module

    @property
    def weight(self):
        return self.base.weight

    def adapters(self) -> list:
        return [a for a in getattr(self.module, "active_adapters", []) if a in self.module.lora_A]

    def trainable(self) -> bool:
        if self.lora:
            return any(p.requires_grad for a in self.adapters() for p in self.module.lora_A[a].parameters())
        return bool(self.weight.requires_grad)

    def effective(self):
        """The weight the layer computes with, in stored orientation: W (+ scale·B·A for each active adapter);
        differentiable in whatever is being trained."""
        w = self.weight
        if self.lora:
            for a in self.adapters():
                w = w + self.module.get_delta_weight(a).to(w.dtype)
        return w

    def view(self, w):
        """(out, in) view of a stored-orientation tensor."""
        return w.t() if self.conv1d else w


class Runtime:
    """The regularizer's state during one training step."""

    def __init__(self, ctx, model, cfg: dict):
        self.ctx, self.cfg, self.model_id = ctx, cfg, id(model)
        trainer = ctx.state.get("trainer")
        self.total_steps = int(getattr(trainer, "total_steps", 0) or 0)
        self.eval_every = int(getattr(getattr(trainer, "params", None), "eval_every", 0) or 0)
        modules = dict(model.named_modules())
        self.layers: list[Layer] = []
        self.untrained: list[str] = []
        seen = set()
        for name in cfg["target_names"]:
            module = modules.get(name)
            if module is None or not hasattr(module, "weight") and not hasattr(module, "base_layer"):
                module = next((m for n, m in modules.items() if n.endswith("." + name)
                               and (hasattr(m, "weight") or hasattr(m, "base_layer"))), None)
            if module is None:
                self.untrained.append(name)
                continue
            lora = hasattr(module, "base_layer") and hasattr(module, "lora_A")
            base = module.base_layer if lora else module
            layer = Layer(name, module, lora, is_conv1d(base))
            if id(layer.weight) in seen:
                continue
            seen.add(id(layer.weight))
            if not layer.trainable():
                self.untrained.append(name)
                continue
            self.layers.append(layer)
        if not self.layers:
            step = cfg.get("active") or "training"
            raise GptoptError(f"l1: none of the {len(cfg['target_names'])} targeted layers is trained by this "
                              f"{step} step (frozen, or not adapted by lora); choose --targets among the layers "
                              "being trained, or lora --target-modules that include them")
        self.mode_used = "penalty" if any(l.lora for l in self.layers) else cfg["mode"]
        self.history: list[dict] = []
        self.last: dict = {}
        self.select()

    # -- schedule --------------------------------------------------------------------------------------
    def lam(self, step: int) -> float:
        """λ at optimizer step ``step`` (1-based)."""
        lam = float(self.cfg["weight"])
        if self.cfg["schedule"] == "linear-warmup" and self.total_steps:
            warm = max(1, round(self.cfg["warmup_fraction"] * self.total_steps))
            lam *= min(1.0, step / warm)
        return lam

    def lr_used(self, step: int) -> float:
        """The learning rate the optimizer used for optimizer step ``step`` (1-based)."""
        trainer = self.ctx.state.get("trainer")
        sched = getattr(trainer, "scheduler", None)
        if sched is not None and getattr(sched, "lr_lambdas", None):
            return float(sched.base_lrs[0]) * float(sched.lr_lambdas[0](step - 1))
        opt = getattr(trainer, "optimizer", None)
        if opt is not None:
            return float(opt.param_groups[0]["lr"])
        raise GptoptError("l1 --mode proximal needs the core training loop's optimizer (run it inside a training step)")

    # -- which weights ---------------------------------------------------------------------------------
    def select(self) -> None:
        """(Re-)choose the weights the later prune would remove now (``--select prunable``)."""
        import torch

        if self.cfg["select"] != "prunable":
            return
        s, rule = float(self.cfg["sparsity"]), self.cfg["rule"]
        with torch.no_grad():
            scores = [l.view(l.effective().detach().abs().float()) for l in self.layers]
            if rule == "global":
                flat = torch.cat([x.flatten() for x in scores])
                k = max(1, round(s * flat.numel()))
                threshold = flat.kthvalue(k).values
                sels = [x <= threshold for x in scores]
            else:
                sels = [select_lowest(x, s, rule) for x in scores]
            for layer, sel in zip(self.layers, sels):
                layer.sel = sel.t().contiguous() if layer.conv1d else sel

    # -- the two modes ---------------------------------------------------------------------------------
    def penalty(self):
        """λ_t·Σ_selected |W_eff| for this micro-batch (None in proximal mode or while λ_t is 0)."""
        if self.mode_used != "penalty":
            return None
        trainer = self.ctx.state.get("trainer")
        lam = self.lam(int(getattr(trainer, "step", 0)) + 1)
        if lam == 0:
            return None
        return lam * l1_sum(self.layers)

    def after_step(self, step: int) -> None:
        import torch

        if self.mode_used == "proximal":
            tau = self.lam(step) * self.lr_used(step)
            if tau > 0:
                with torch.no_grad():
                    for layer in self.layers:
                        soft_threshold_(layer.weight, tau, layer.sel)
        if self.cfg["select"] == "prunable" and step % int(self.cfg["reselect_every"]) == 0:
            self.select()
        at_eval = bool(self.eval_every) and step % self.eval_every == 0
        at_end = self.total_steps and step >= self.total_steps
        if at_eval or at_end or not self.ctx.quiet:
            self.last = {"step": step, **self.fractions()}
            trainer = self.ctx.state.get("trainer")
            if trainer is not None and hasattr(trainer, "progress_notes"):
                trainer.progress_notes["zeros"] = f"{100 * self.last['l1_zero_fraction']:.1f}%"
                trainer.progress_notes["|w|<1e-3"] = f"{100 * self.last['l1_small_fraction']:.1f}%"
            if at_eval or at_end:
                self.history.append(self.last)

    def fractions(self) -> dict:
        """Exact zeros and |w| < 1e-3 among the targeted (effective) weights; zeros among the selected ones."""
        import torch

        zeros = small = total = sel_zero = sel_total = 0
        with torch.no_grad():
            for layer in self.layers:
                w = layer.effective().detach()
                z = w == 0
                zeros += int(z.sum())
                small += int((w.abs() < SMALL).sum())
                total += w.numel()
                if layer.sel is not None:
                    sel_zero += int((z & layer.sel).sum())
                    sel_total += int(layer.sel.sum())
        out = {"l1_zero_fraction": round(zeros / total, 6), "l1_small_fraction": round(small / total, 6)}
        if sel_total:
            out["l1_selected_zero_fraction"] = round(sel_zero / sel_total, 6)
        return out

    def final_metrics(self, metrics: dict) -> dict:
        last = self.last or {"step": None, **self.fractions()}
        out = {k: v for k, v in last.items() if k != "step"}
        out.update({"l1_mode_used": self.mode_used, "l1_select": self.cfg["select"],
                    "l1_layers_regularized": len(self.layers), "l1_layers_untrained": len(self.untrained),
                    "l1_history": self.history})
        history = metrics.get("eval_history")
        if history:
            by_step = {h["step"]: h for h in self.history}
            out["eval_history"] = [{**e, **{k: v for k, v in by_step.get(e.get("step"), {}).items()
                                           if k != "step"}} for e in history]
        return out


# -- building blocks (also tested directly) -----------------------------------------------------------
def select_lowest(score, sparsity: float, rule: str = "layer"):
    """Bool mask on an (out, in) score: True where a prune by this score would remove the weight.

    ``layer``: the round(sparsity·numel) lowest of the layer; ``row``: the round(sparsity·in) lowest of every
    row; ``nm:N:M``: the M−N lowest of every M consecutive inputs of each row.
    """
    import torch

    rows, cols = score.shape
    if rule.startswith("nm:"):
        n, m = (int(x) for x in rule.split(":")[1:])
        if cols % m:
            sel = torch.zeros_like(score, dtype=torch.bool)  # prune will refuse this layer; nothing to aim for
            return sel
        groups = score.reshape(rows, cols // m, m)
        idx = groups.topk(m - n, dim=-1, largest=False).indices
        sel = torch.zeros(groups.shape, dtype=torch.bool, device=score.device)
        sel.scatter_(-1, idx, True)
        return sel.reshape(rows, cols)
    if rule == "row":
        k = round(sparsity * cols)
        sel = torch.zeros_like(score, dtype=torch.bool)
        if k:
            sel.scatter_(1, score.topk(k, dim=1, largest=False).indices, True)
        return sel
    k = round(sparsity * score.numel())
    sel = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        sel[torch.topk(score.flatten(), k, largest=False, sorted=False).indices] = True
    return sel.reshape(score.shape)


def soft_threshold_(w, tau: float, sel=None) -> None:
    """In place: w ← sign(w)·max(|w| − tau, 0), on the entries where ``sel`` is True (all when ``sel`` is None)."""
    import torch

    shrunk = w.sign() * (w.abs() - tau).clamp_min(0)
    if sel is None:
        w.copy_(shrunk)
    else:
        w.copy_(torch.where(sel, shrunk, w))


def l1_sum(layers):
    """Σ over the layers of |W_eff| on the selected entries (differentiable)."""
    total = None
    for layer in layers:
        a = layer.effective().abs()
        if layer.sel is not None:
            a = a * layer.sel.to(a.dtype)
        part = a.sum()
        total = part if total is None else total + part
    return total


def runtime(ctx, model) -> Runtime:
    """The :class:`Runtime` of the running training step (built on first use)."""
    rt = ctx.state.get("l1_runtime")
    if rt is None or rt.model_id != id(model):
        rt = Runtime(ctx, model, ctx.state["l1"])
        ctx.state["l1_runtime"] = rt
    return rt
