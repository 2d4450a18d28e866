"""Distillation from the model as it was loaded: the KL term the plugin adds to every training batch."""
from __future__ import annotations


def distill_loss(ctx, cfg: dict, batch: dict, outputs):
    """``weight * T^2 * KL(teacher_T || student_T)`` per token, teacher = the model as loaded
    (``cfg``: ``ctx.state["distill"]``, ``{"weight", "temperature"}``)."""
    import torch
    import torch.nn.functional as F

    teacher = ctx.original_model()
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits.float()
    T = cfg["temperature"]
    s = F.log_softmax(outputs.logits.float() / T, dim=-1)
    t = F.log_softmax(t_logits / T, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="none").sum(-1).mean()
    return cfg["weight"] * T * T * kl
