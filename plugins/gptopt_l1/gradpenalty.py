"""The gradient-L1 penalty of the ``robust`` step at work inside the core's training loop (torch imported inside).

For the targeted weights P (the ``weight`` of each targeted linear / Conv1D layer), the trained parameters T and
the micro-batch's cross-entropy L, the term added to the loss is λ_t·‖∇_P L‖₁:

* ``exact``: g = ∇_P L by ``torch.autograd.grad(..., create_graph=True)``; the term λ_t·Σ|g| stays on the
  graph, so the loop's one ``backward`` of loss + terms is a double backward and reaches T with
  λ_t·H_{T,P}·sign(g) (|x|' = sign(x), 0 at x = 0: zero-safe, no square root).
* ``fd``: the first-order finite-difference form of gradient-norm penalties. g = ∇_P L (one backward with the
  graph kept), then one extra forward/backward at P + r·sign(g) (sign(g) is the dual direction of the L1 norm,
  so L(P + r·sign g) ≈ L + r‖g‖₁) gives g' = ∇_T L(P + r·sign g); the weights are restored bit for bit. The
  returned term has the value (λ_t/r)·(L(P + r·sign g) − L) ≈ λ_t‖g‖₁ and the gradient (λ_t/r)·(g' − ∇_T L) ≈
  λ_t·H_{T,P}·sign(g): no second-order graph, so its memory is that of plain training plus one gradient.

Under ``lora`` the base weights are frozen; P is then the frozen base weight itself, reached through a *probe*:
a forward hook on each targeted base layer recomputes its output from a fresh leaf copy of the weight, so that
∇_W L exists (it equals the gradient with respect to the effective weight W + s·BA) while the optimizer never
sees W. The penalty's gradient reaches the adapters only.
"""
from __future__ import annotations

from gptopt_core import GptoptError
from gptopt_core.kit.layertypes import is_conv1d

from .regularizer import find_targets


def exact_term(loss, weights):
    """(λ-free) ‖∇_weights loss‖₁ as a differentiable scalar (double backward), and its value as a float."""
    import torch

    grads = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
    parts = [g.abs().sum() for g in grads if g is not None]
    total = torch.stack(parts).sum() if parts else loss * 0
    return total, float(total.detach())


def fd_term(forward, loss, weights, trained, r: float):
    """The finite-difference form of ‖∇_weights loss‖₁ (see the module docstring); λ-free.

    :param forward: callable returning the loss of the same micro-batch at the current weights.
    :param weights: the penalised tensors P (perturbed in place by r·sign(g) during the extra pass, restored).
    :param trained: the parameters T the term's gradient must reach.
    :returns: ``(term, ‖g‖₁)``: ``term`` has value (L(P + r·sign g) − L)/r and gradient (g' − ∇_T L)/r.
    """
    import torch

    grads = torch.autograd.grad(loss, weights, retain_graph=True, allow_unused=True)
    grad_l1 = float(sum(float(g.abs().sum()) for g in grads if g is not None))
    moved = [(w, g.sign()) for w, g in zip(weights, grads) if g is not None]
    saved = [w.detach().clone() for w, _ in moved]
    try:
        with torch.no_grad():  # through .data: the main graph's saved weights are restored before its backward
            for w, s in moved:
                w.data.add_(s.to(w.dtype), alpha=r)
        loss2 = forward()
        grads2 = torch.autograd.grad(loss2, trained, allow_unused=True)
    finally:
        with torch.no_grad():
            for (w, _), old in zip(moved, saved):
                w.data.copy_(old)
    surrogate = loss * 0
    for g2, q in zip(grads2, trained):
        if g2 is not None:
            surrogate = surrogate + (g2.detach().to(q.dtype) * (q - q.detach())).sum()
    term = (surrogate + loss2.detach().to(loss.dtype) - loss) / r
    return term, grad_l1


class Runtime:
    """The penalty's state during one training step: the targeted base layers, their probes, the schedule."""

    def __init__(self, ctx, cfg: dict):
        self.ctx, self.cfg = ctx, cfg
        modules = dict(ctx.model.named_modules())
        self.layers = [(name, modules[name]) for name in cfg["target_names"] if name in modules]
        for name, module in self.layers:
            w = getattr(module, "weight", None)
            if w is None or not w.is_floating_point():
                raise GptoptError(f"robust: layer {name} has no float weight (quantized?); the gradient penalty "
                                  "needs float weights: put robust and its training step before quantize")
        self.probes: dict[int, object] = {}
        self.attn_model = ctx.model  # the model as the step starts (lora wraps it later; this object is kept)
        self.attn = self._twice_differentiable(ctx.model) if cfg["mode"] == "exact" else None
        self.handles = [m.register_forward_hook(self._probe) for _, m in self.layers]
        self.history: list[dict] = []
        self.grad_l1: list[float] = []
        self.last_eval_step = 0

    @staticmethod
    def _twice_differentiable(model):
        """exact mode: fused attention kernels (torch's SDPA flash kernels) have no double backward; the step
        trains with transformers' eager attention instead (restored afterwards). Returns the previous setting."""
        config = getattr(model, "config", None)
        old = getattr(config, "_attn_implementation", None)
        if old in (None, "eager") or not hasattr(model, "set_attn_implementation"):
            return None
        model.set_attn_implementation("eager")
        return old

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles, self.probes = [], {}
        if self.attn is not None:
            self.attn_model.set_attn_implementation(self.attn)
            self.attn = None

    def _probe(self, module, args, output):
        """Forward hook: a frozen weight (lora) is replaced by a leaf copy, so ∇_W L can be asked for."""
        import torch
        import torch.nn.functional as F

        w = module.weight
        if w.requires_grad or not torch.is_grad_enabled() or self.ctx.state.get("trainer") is None:
            return None
        probe = w.detach().requires_grad_(True)
        self.probes[id(module)] = probe
        x = args[0]
        if is_conv1d(module):
            flat = torch.addmm(module.bias, x.reshape(-1, x.shape[-1]), probe)
            return flat.view(*x.shape[:-1], module.nf)
        return F.linear(x, probe, module.bias)

    def penalised(self) -> list:
        out = []
        for name, module in self.layers:
            w = module.weight
            probe = None if w.requires_grad else self.probes.get(id(module))
            if not w.requires_grad and probe is None:
                raise GptoptError(f"robust: layer {name} took no part in this forward pass")
            out.append(w if w.requires_grad else probe)
        return out

    def lam(self, step: int, total: int) -> float:
        lam = float(self.cfg["weight"])
        if self.cfg["schedule"] == "linear-warmup" and total:
            warm = max(1, round(self.cfg["warmup_fraction"] * total))
            lam *= min(1.0, step / warm)
        return lam

    def term(self, model, batch, outputs):
        """λ_t·‖∇_P L‖₁ for this micro-batch (``None`` while λ_t is 0)."""
        trainer = self.ctx.state.get("trainer")
        if trainer is None:
            raise GptoptError("robust: the gradient penalty runs inside the core training loop only")
        if trainer.num_processes > 1:
            raise GptoptError("robust: the gradient penalty runs in one process only (not under accelerate launch "
                              "with several processes); run the training step in one process")
        lam = self.lam(int(trainer.step) + 1, int(getattr(trainer, "total_steps", 0) or 0))
        if lam == 0:
            return None
        weights = self.penalised()
        if self.cfg["mode"] == "exact":
            term, value = exact_term(outputs.loss, weights)
        else:
            def forward():
                with trainer.autocast():
                    return model(**batch).loss.float()

            trained = [q for q in model.parameters() if q.requires_grad]
            term, value = fd_term(forward, outputs.loss, weights, trained, float(self.cfg["fd_step"]))
        self.grad_l1.append(value)
        return lam * term

    def after_step(self, step: int) -> None:
        trainer = self.ctx.state.get("trainer")
        total = int(getattr(trainer, "total_steps", 0) or 0)
        every = int(getattr(getattr(trainer, "params", None), "eval_every", 0) or 0)
        if self.grad_l1 and (every and step % every == 0 or total and step >= total):
            recent = self.grad_l1[-max(1, int(getattr(trainer.params, "grad_accum", 1))):]
            self.history.append({"step": step, "robust_grad_l1": round(sum(recent) / len(recent), 6)})
        if trainer is not None and hasattr(trainer, "progress_notes") and self.grad_l1:
            trainer.progress_notes["|∇L|₁"] = f"{self.grad_l1[-1]:.3g}"

    def final_metrics(self) -> dict:
        g = self.grad_l1
        return {"robust_mode": self.cfg["mode"], "robust_layers": len(self.layers),
                "robust_grad_l1_first": round(g[0], 6) if g else None,
                "robust_grad_l1_last": round(g[-1], 6) if g else None, "robust_history": self.history}


def target_names(model, patterns) -> list:
    """Names of the layers ``robust --targets`` names (default: every linear / Conv1D layer but the head)."""
    return [n for n, _ in find_targets(model, patterns, step="robust")]
