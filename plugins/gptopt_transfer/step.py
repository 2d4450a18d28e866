"""The ``finetune`` and ``lora`` steps: their params (the core's training options plus distillation and LoRA) and
the LoRA target choice; peft and torch are imported when a step runs (:mod:`.masked`, :mod:`.adapter`).
"""
from __future__ import annotations

from typing import List, Literal, Optional

import pydantic

from gptopt_core import GptoptError, PlanError, Step
from gptopt_core.architectures import architecture_of
from gptopt_core.kit.experts import moe_effect
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.metrics import sparsity
from gptopt_core.kit.modules import apply_masks, weight_modules
from gptopt_core.kit.train_options import TrainParams, resolve_precision, train_blocks
from gptopt_core.kit.training import Trainer

from .experts import expert_parameters, is_router

DISTILL_WEIGHT, TEMPERATURE = 1.0, 2.0


class DistillParams(TrainParams):
    """The core's training options plus distillation, which this plugin implements (``gptopt_training_loss``)."""

    distill_from: Optional[Literal["original"]] = pydantic.Field(
        None, description="add a KL term against the model as it was loaded (before lossy steps)")
    distill_weight: Optional[float] = pydantic.Field(None, gt=0, le=1000,
                                                     description=f"weight of the KL term [default: {DISTILL_WEIGHT}]")
    temperature: Optional[float] = pydantic.Field(None, gt=0, le=100,
                                                  description=f"distillation temperature [default: {TEMPERATURE}]")

    @pydantic.model_validator(mode="after")
    def _check_distill(self):
        if self.distill_from is None and (self.distill_weight is not None or self.temperature is not None):
            raise ValueError("--distill-weight/--temperature need --distill-from original")
        return self


class FinetuneParams(DistillParams):
    lr: float = pydantic.Field(5e-5, gt=0, le=1.0, description="peak learning rate (AdamW)")
    experts: Literal["include", "exclude"] = pydantic.Field(
        "include", description="mixture-of-experts models: train the fused expert weights too, or keep them frozen")


class LoraParams(DistillParams):
    lr: float = pydantic.Field(5e-4, gt=0, le=1.0, description="peak learning rate (AdamW)")
    r: int = pydantic.Field(16, ge=1, le=4096, description="LoRA rank")
    alpha: float = pydantic.Field(32.0, gt=0, le=1e6, description="LoRA alpha (scale = alpha / r)")
    dropout: float = pydantic.Field(0.05, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: List[str] = pydantic.Field(
        default_factory=lambda: ["auto"],
        description="'auto' (per architecture) or glob patterns on module names, e.g. '*q_proj' (repeatable)")
    experts: Literal["exclude", "include"] = pydantic.Field(
        "exclude", description="mixture-of-experts models: also adapt the fused expert weights (peft "
                               "target_parameters, one low-rank update per expert; needs --dropout 0); routers are "
                               "never targets unless --target-modules names them")
    merge: bool = pydantic.Field(False, description="merge the adapter into the weights (a plain model)")
    masked_update: bool = pydantic.Field(
        True, description="with --merge on a pruned model: train the update the merge keeps (mask * B@A), so the "
                          "merged model is the trained one")

    @pydantic.field_validator("target_modules")
    @classmethod
    def _targets(cls, value):
        value = [v.strip() for v in value]
        if not value or any(not v for v in value):
            raise ValueError("give 'auto' or non-empty glob patterns")
        if "auto" in value and len(value) > 1:
            raise ValueError("'auto' cannot be combined with other patterns")
        return value

    @pydantic.model_validator(mode="after")
    def _check_experts(self):
        if self.experts == "include" and self.dropout:
            raise ValueError("--experts include: peft's LoRA on fused expert parameters has no dropout; add "
                             "--dropout 0")
        return self


class _TrainingStep(Step):
    trains = True

    def wants_original_model(self) -> bool:
        """``--distill-from original``: the pipeline keeps a copy of the model as loaded (``ctx.original_model()``)."""
        return self.params.distill_from == "original"

    def preflight(self, ctx):
        train_blocks(ctx.data, self.params.seq_len)  # "no train data" fails before anything runs
        resolve_precision(self.params.precision, ctx.device)

    def _train(self, ctx, model):
        p = self.params
        if p.distill_from:
            ctx.state["distill"] = {"weight": p.distill_weight or DISTILL_WEIGHT,
                                    "temperature": p.temperature or TEMPERATURE}
        try:
            trainer = Trainer(ctx, model, p, name=self.name)
            metrics = trainer.run()
        finally:
            ctx.state.pop("distill", None)
        return trainer.model, metrics


class FinetuneStep(_TrainingStep):
    """Full fine-tuning of every weight on the train split (sparsity-preserving when masks are present)."""

    name = "finetune"
    Params = FinetuneParams
    forbids = {
        "quantized": "full fine-tuning cannot update packed low-bit weights; put finetune before quantize, "
                     "or use lora (QLoRA) on the quantized model",
        "adapter": "the model carries an unmerged LoRA adapter; use lora --merge before finetune",
    }

    def preflight(self, ctx):
        super().preflight(ctx)
        if self.params.experts == "exclude" and not expert_parameters(ctx.model):
            raise GptoptError("finetune --experts exclude: the model has no fused expert parameters (it is not a "
                              "mixture-of-experts model); leave --experts out")

    def apply(self, ctx):
        model = ctx.model
        model.requires_grad_(True)
        frozen = expert_parameters(model) if self.params.experts == "exclude" else []
        for name in frozen:
            model.get_parameter(name).requires_grad_(False)
        model, metrics = self._train(ctx, model)
        ctx.model = model
        if frozen:
            metrics["frozen_expert_parameters"] = len(frozen)
        metrics.update(moe_effect(model, "frozen (--experts exclude)" if frozen else
                                  "trained in their fused layout (--experts include)"))
        if ctx.state.get("masks"):
            from .masked import masks_hold  # torch

            metrics["masked_sparsity_kept"] = masks_hold(model, ctx.state["masks"])
            metrics["sparsity"] = sparsity(model)
        return metrics


class LoraStep(_TrainingStep):
    """LoRA adapters (PEFT) trained on the train split; QLoRA on a 4-bit base; optional sparsity-keeping merge."""

    name = "lora"
    Params = LoraParams
    forbids = {
        "adapter": "the model already carries an unmerged LoRA adapter; give the earlier lora step --merge",
    }

    def next_facts(self, facts):
        facts = super().next_facts(facts)
        return facts if self.params.merge else facts | {"adapter"}

    def check_plan(self, before, after, facts):
        quantized = any(f.startswith("quantized") for f in facts)
        if self.params.merge and quantized and "masks" in facts:
            raise PlanError("lora --merge on a quantized, pruned model cannot keep the pruned weights exactly zero "
                            "(the merge re-quantizes them); run lora --merge before quantize, or keep the adapter "
                            "unmerged (--no-merge)")

    def preflight(self, ctx):
        super().preflight(ctx)
        resolve_targets(ctx.model, self.params.target_modules)
        self._expert_targets(ctx)

    def _expert_targets(self, ctx) -> list[str]:
        if self.params.experts == "exclude":
            return []
        names = expert_parameters(ctx.model)
        if not names:
            raise GptoptError("lora --experts include: the model has no fused expert parameters (it is not a "
                              "mixture-of-experts model); leave --experts out")
        if any(f.startswith("quantized") for f in ctx.facts):
            raise GptoptError("lora --experts include adapts float expert weights; on a quantized model leave "
                              "--experts out (LoRA on the quantized linear layers only)")
        return names

    def apply(self, ctx):
        import warnings

        p = self.params
        targets, conv1d = resolve_targets(ctx.model, p.target_modules)
        experts = self._expert_targets(ctx)
        k_bit = "quantized:4bit" in ctx.facts or bool(getattr(ctx.model, "is_loaded_in_4bit", False)) or any(
            f.startswith("quantized") for f in ctx.facts)
        model = self._with_adapter(ctx.model, targets, conv1d, k_bit, experts)
        masks = ctx.state.get("masks")
        masked = []
        if p.merge and p.masked_update and masks and not k_bit:
            from .masked import mask_lora_updates  # torch

            masked = mask_lora_updates(model, masks)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*inputs will be cast from.*")  # 8-bit matmul, per call
            model, metrics = self._train(ctx, model)
        metrics["lora_targets"] = len(targets)
        metrics["lora_expert_parameters"] = len(experts)
        merged = ", merged into them in their fused layout" if p.merge else ""
        metrics.update(moe_effect(ctx.model, f"LoRA on the fused expert weights (--experts include){merged}"
                                  if experts else "not adapted (--experts exclude)"))
        metrics["qlora"] = bool(k_bit)
        if masks:
            metrics["lora_masked_layers"] = len(masked)
        if p.merge:
            model = self._merged(model, masks, metrics)
        model.eval()
        ctx.model = model
        return metrics

    def _with_adapter(self, model, targets, conv1d, k_bit, experts=()):
        """``model`` wrapped by PEFT with LoRA on ``targets`` (and the fused expert parameters ``experts``); a
        quantized base is prepared QLoRA-style."""
        import warnings

        import peft

        p = self.params
        config = peft.LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                                 fan_in_fan_out=conv1d, bias="none", task_type="CAUSAL_LM",
                                 target_parameters=list(experts) or None)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            if k_bit:  # QLoRA-style: freeze the base, upcast non-quantized params, enable input grads
                model = peft.prepare_model_for_kbit_training(
                    model, use_gradient_checkpointing=p.gradient_checkpointing,
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.requires_grad_(False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            return peft.get_peft_model(model, config)

    @staticmethod
    def _merged(model, masks, metrics):
        """The adapter merged into the weights; pruned weights re-zeroed where masks exist."""
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Mm]erg.*")
            model = model.merge_and_unload()
        if masks:
            from .masked import masks_hold  # torch

            apply_masks(model, masks)
            metrics["masked_sparsity_kept"] = masks_hold(model, masks)
            metrics["sparsity"] = sparsity(model)
        return model


def resolve_targets(model, patterns) -> tuple[list[str], bool]:
    """The qualified names of the layers LoRA adapts, and whether they are GPT-2 ``Conv1D`` layers.

    ``auto``: the block's linear layers of the model's family in the architecture table
    (``gptopt_core.architecture_of``), else every linear layer but the output head; never a MoE router
    (:data:`.experts.ROUTER_LEAVES`).
    Otherwise glob patterns on qualified names (a bare name also matches as a suffix).
    Raises :class:`GptoptError` when nothing matches or Conv1D and Linear layers are mixed.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = weight_modules(base)
    if patterns == ["auto"]:
        kind = getattr(getattr(base, "config", None), "model_type", "")
        arch = architecture_of(base)
        leaf = arch.lora_targets if arch is not None else None
        chosen = [(n, m) for n, m in layers if (leaf is None or n.rsplit(".", 1)[-1] in leaf) and not is_router(n)]
        what = f"auto targets for model type '{kind}' ({', '.join(leaf) if leaf else 'all linear layers'})"
    else:
        chosen = [(n, m) for n, m in weight_modules(base, include=patterns)]
        what = f"--target-modules {' '.join(patterns)}"
    if not chosen:
        examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n, _ in layers})[:8])
        raise GptoptError(f"lora: {what} matched no linear layer of this model; its layers are named like: "
                          f"{examples}")
    conv = {is_conv1d(m) for _, m in chosen}
    if len(conv) > 1:
        raise GptoptError(f"lora: {what} mixes GPT-2 Conv1D and nn.Linear layers; target one kind at a time")
    return [n for n, _ in chosen], conv.pop()

