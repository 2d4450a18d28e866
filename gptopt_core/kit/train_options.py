"""The options every training step shares (:class:`TrainParams`), and what the loop derives from them before it
starts: the accelerate precision for a device, the train split cut into blocks."""
from __future__ import annotations

from typing import Literal, Optional

import pydantic

from ..errors import GptoptError, SourceError
from ..steps import Params

DEFAULT_STEPS = 100


class TrainParams(Params):
    """Options every training step shares (``lora``, ``finetune`` subclass it and may change defaults)."""

    lr: float = pydantic.Field(1e-4, gt=0, le=1.0, description="peak learning rate (AdamW)")
    steps: Optional[int] = pydantic.Field(None, ge=1, le=10_000_000,
                                          description=f"optimizer steps (default {DEFAULT_STEPS} unless --epochs)")
    epochs: Optional[float] = pydantic.Field(None, gt=0, le=10_000,
                                             description="passes over the train split (instead of --steps)")
    batch_size: int = pydantic.Field(4, ge=1, le=65_536, description="blocks per micro-batch per process")
    seq_len: int = pydantic.Field(256, ge=8, le=131_072, description="tokens per training block")
    grad_accum: int = pydantic.Field(1, ge=1, le=65_536, description="micro-batches per optimizer step")
    warmup_steps: Optional[int] = pydantic.Field(None, ge=0,
                                                 description="linear warmup steps (default: 10% of the steps)")
    weight_decay: float = pydantic.Field(0.0, ge=0, le=10, description="AdamW weight decay (matrices only)")
    max_grad_norm: float = pydantic.Field(1.0, ge=0, description="gradient clipping norm (0: no clipping)")
    eval_every: int = pydantic.Field(0, ge=0, description="held-out perplexity every N steps and at the end (0: off)")
    eval_tokens: int = pydantic.Field(4096, ge=16, description="held-out tokens scored by --eval-every")
    checkpoint_every: int = pydantic.Field(
        0, ge=0, description="write a resumable checkpoint to --out every N optimizer steps and at the end (0: off); "
                             "continue an interrupted run with `gptopt run --resume`")
    gradient_checkpointing: bool = pydantic.Field(False, description="recompute activations to save memory")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = pydantic.Field(
        "auto", description="autocast: auto = bf16/fp16 on a GPU, fp32 on CPU")

    @pydantic.model_validator(mode="after")
    def _check(self):
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give --steps or --epochs, not both")
        return self


def resolve_precision(precision: str, device) -> str:
    """The accelerate ``mixed_precision`` value ("no" | "bf16" | "fp16") for a precision option on a device."""
    import torch

    is_cuda = getattr(device, "type", str(device)).startswith("cuda")
    if precision == "auto":
        if is_cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "no"
    if precision == "fp16" and not is_cuda:
        raise GptoptError("--precision fp16 needs a CUDA GPU; use --precision bf16 or fp32 on CPU")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def train_blocks(data, seq_len: int):
    """The train split cut into non-overlapping blocks: a LongTensor [n_blocks, seq_len] (tail dropped)."""
    ids = data.train_ids
    n = int(ids.numel()) // seq_len
    if n < 1:
        raise SourceError(
            f"no train data: the train split of '{data.spec}' has {int(ids.numel())} tokens, fewer than one "
            f"training block of --seq-len {seq_len}; give more text with --data or a smaller --seq-len")
    return ids[: n * seq_len].view(n, seq_len)
