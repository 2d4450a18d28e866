"""The ``prune-experts`` step: REAP expert pruning of mixture-of-experts models (params, plan facts, the run).

The torch work is in :mod:`.experts` (imported torch inside its functions, so this module loads none at
``gptopt --help``).
"""
from __future__ import annotations

import time
from typing import Annotated, Literal, Optional

import pydantic

from gptopt_core import GptoptError, Params, SourceError, Step
from gptopt_core.kit.calibration import calibration_batches
from gptopt_core.kit.evaluate import model_device
from gptopt_core.options import as_percent

from .experts import check_moe, keep_count, prune_layer, reap_scores, routing_rule, set_config_count


class PruneExpertsParams(Params):
    keep: Optional[int] = pydantic.Field(
        None, ge=1, le=100_000, description="experts to keep in every MoE layer (at least the router's top-k)")
    keep_fraction: Annotated[Optional[float], as_percent()] = pydantic.Field(
        None, gt=0.0, le=1.0, description="fraction of each layer's experts to keep, rounded (e.g. 0.5 or 50%)")
    mode: Literal["drop", "merge"] = pydantic.Field(
        "drop", description="drop the lowest-scored experts, or merge each into its most similar kept expert "
                            "(weights averaged by routed mass)")
    calib_samples: int = pydantic.Field(
        64, ge=1, le=100_000, description="calibration blocks from the train split")
    calib_seq_len: int = pydantic.Field(
        128, ge=2, le=32_768, description="tokens per calibration block")

    @pydantic.model_validator(mode="after")
    def _one_count(self):
        if (self.keep is None) == (self.keep_fraction is None):
            raise ValueError("give exactly one of --keep N (experts kept per layer) or --keep-fraction F")
        return self


class PruneExpertsStep(Step):
    """Drop (or merge) the experts of every MoE layer with the least router-weighted output (REAP) on calibration
    text; the router's rows and the config's expert count follow, routing stays the family's own.

    Score of expert j: the mean, over the calibration tokens routed to j, of the routing weight times the norm of
    j's output. Per layer, the kept and dropped experts, their scores and routed token counts go to the metrics.
    """

    name = "prune-experts"
    Params = PruneExpertsParams
    provides = frozenset({"experts-pruned"})  # lossy: --kl-base auto takes its base before this step
    forbids = {"quantized": "expert pruning needs float weights; put prune-experts before quantize",
               "adapter": "merge the LoRA adapter first (lora --merge) or put prune-experts before lora"}

    def preflight(self, ctx):
        layers = check_moe(ctx.model)
        keep_count(layers, self.params.keep, self.params.keep_fraction)
        data = getattr(ctx, "data", None)
        have = int(data.train_ids.numel()) if data is not None else 0
        if have < self.params.calib_seq_len + 1:
            raise GptoptError(f"prune-experts needs training text for calibration: the train split of "
                              f"'{getattr(data, 'spec', '')}' has {have} tokens, fewer than one block of "
                              f"--calib-seq-len {self.params.calib_seq_len}+1; give more --data or a smaller "
                              "--calib-seq-len")

    def apply(self, ctx):
        return run_prune_experts(ctx, self.params)


def _slice_masks(ctx, layer, kept: list, total: int) -> None:
    """Masks a pruning step recorded on fused expert parameters (first dimension E) follow the kept experts."""
    masks = ctx.state.get("masks") or {}
    prefix = f"{layer.name}.experts."
    for key, mask in list(masks.items()):
        if key.startswith(prefix) and mask.dim() >= 1 and mask.shape[0] == total:
            masks[key] = mask[kept]


def _batches(ctx, params) -> list:
    """Calibration blocks from the train split, on the model's device."""
    if getattr(ctx, "data", None) is None:
        raise GptoptError("prune-experts needs training text for calibration; give --data")
    try:
        batches = calibration_batches(ctx, params.calib_samples, params.calib_seq_len)
    except SourceError as exc:
        raise GptoptError(f"prune-experts needs calibration text from the train split: {exc}") from None
    device = model_device(ctx.model)
    return [b.to(device) for b in batches]


def run_prune_experts(ctx, params) -> dict:
    model = ctx.model
    start = time.perf_counter()
    layers = check_moe(model)
    total = layers[0].num_experts
    n = keep_count(layers, params.keep, params.keep_fraction)
    batches = _batches(ctx, params)
    reap_scores(ctx, model, layers, batches)
    before = sum(p.numel() for p in model.parameters())
    per_layer = {}
    for layer in layers:
        result = prune_layer(layer, n, params.mode)
        _slice_masks(ctx, layer, result.kept, total)
        per_layer[layer.name] = result.as_dict()
    set_config_count(model, total, n)
    after = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - start
    ctx.log(f"  prune-experts {params.mode}: {len(layers)} MoE layers, {total} -> {n} experts each, "
            f"{before - after:,} parameters removed ({seconds:.1f}s)")
    return {"mode": params.mode, "experts_before": total, "experts_after": n, "moe_layers": len(layers),
            "top_k": max(layer.top_k for layer in layers), "routing": routing_rule(model),
            "params_before": before, "params_after": after, "calib_tokens": sum(b.numel() for b in batches),
            "prune_seconds": round(seconds, 3), "layers": per_layer}
