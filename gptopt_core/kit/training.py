"""The one training loop of gptopt, on :class:`accelerate.Accelerator`.

Every step that trains (``lora``, ``finetune``, and anything a plugin adds) runs this loop, so every plugin
that cares about training (pruning masks, L1 penalties, distillation) hooks into one place:

* **Loss**: causal-LM cross-entropy on blocks of ``seq_len`` tokens cut from the *train* split (never the
  held-out split), plus the extra terms returned by the ``gptopt_training_loss`` hook for every micro-batch.
* **Optimizer**: AdamW on the parameters with ``requires_grad`` (weight decay on matrices only), linear
  warmup then cosine decay to zero, gradient accumulation, gradient clipping (``max_grad_norm``).
* **After every optimizer step**: the ``gptopt_after_optimizer_step`` hook runs (the prune plugin's
  implementation keeps pruned weights exactly zero, l1's applies its proximal update). The loop itself knows
  nothing of masks or penalties.
* **Precision**: ``auto`` is bf16 autocast on a CUDA GPU that supports it, fp16 (with gradient scaling) on
  other GPUs, fp32 on CPU; ``bf16`` also works on CPU. The loop applies it itself (``torch.autocast`` around
  the forward pass, outputs cast back to fp32 as accelerate does): accelerate's own mixed precision is one
  setting per process, and two steps of one run may differ, so every Accelerator here is made with
  ``mixed_precision="no"`` (``accelerate launch --mixed_precision`` is not used; ``--precision`` is).
* **Multi-process**: under ``accelerate launch`` the same command runs data-parallel (gloo on CPU, NCCL on
  GPUs). ``batch_size`` is per process; the global batch of one optimizer step is
  ``batch_size * grad_accum * num_processes`` blocks. The block order is a pure function of (seed, step), and
  each process takes its own slice of every global batch, so a run with 2 processes × batch 2 sees exactly
  the blocks a single process with batch 4 sees. Only the main process logs and evaluates.
* **Checkpointing**: :meth:`Trainer.state_dict` / :meth:`Trainer.load_state_dict` hold everything needed to
  continue a run (step, optimizer, scheduler, RNG, histories); the data order needs only the step. With
  ``checkpoint_every`` the loop writes them with the trainable weights to ``--out`` (see
  :mod:`gptopt_core.kit.checkpoints`), and ``gptopt run --resume`` continues from the latest one.

Plugin-facing API::

    from gptopt_core.kit.training import TrainParams, Trainer, train

    class MyParams(TrainParams):          # shared options: lr, steps/epochs, batch-size, seq-len, ...
        ...

    metrics = train(ctx, model, params, name="mystep")   # or Trainer(ctx, model, params).run()

While a loop runs, ``ctx.state["trainer"]`` is the running :class:`Trainer` (hooks may read ``.step``,
``.total_steps``, ``.params``, ``.accelerator``); it is removed afterwards.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any

from . import checkpoints
from ..errors import GptoptError
from .evaluate import perplexity
from .modules import mask_targets
from .train_options import DEFAULT_STEPS, TrainParams, resolve_precision, train_blocks

__all__ = ["TrainParams", "Trainer", "train", "train_blocks", "resolve_precision", "mask_targets"]


class Trainer:
    """One training run of ``model`` with :class:`TrainParams` inside a step.

    Build it, optionally :meth:`load_state_dict` a checkpoint, then :meth:`run` (returns the metrics dict the
    step reports). The model is trained in place; afterwards it is unwrapped (no DDP / autocast wrappers) and
    left in eval mode.
    """

    def __init__(self, ctx, model, params: TrainParams, name: str = "train"):
        self.ctx, self.model, self.params, self.name = ctx, model, params, name
        self.step = 0  # optimizer steps done
        self.loss_history: list[float] = []  # mean training loss (CE + extra terms) of each optimizer step
        self.ce_history: list[float] = []  # the cross-entropy part alone
        self.eval_history: list[dict] = []  # {"step", "perplexity"}
        #: extra text hooks may show next to the loss in the progress bar, e.g. {"zeros": "12.5%"}
        self.progress_notes: dict[str, str] = {}
        self.tokens_seen = 0  # global tokens trained on
        self.train_seconds = 0.0  # time in forward/backward/optimizer (not eval)
        self.train_cpu_seconds = 0.0  # CPU time of this process (all threads) in the same spans
        self.accelerator = None
        self.mixed_precision = "no"  # accelerate's name for this run's precision, set by setup()
        self.scaler = None
        self.optimizer = None
        self.scheduler = None

    # -- data order: a pure function of (seed, step) ------------------------------------------------------
    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes if self.accelerator else 1

    @property
    def process_index(self) -> int:
        return self.accelerator.process_index if self.accelerator else 0

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step over all processes."""
        return self.params.batch_size * self.params.grad_accum * self.num_processes

    def _permutation(self, epoch: int):
        import torch

        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            gen = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + epoch)
            cache = (epoch, torch.randperm(self.n_blocks, generator=gen))
            self._perm_cache = cache
        return cache[1]

    def block_indices(self, step: int, micro: int, rank: int | None = None) -> list[int]:
        """Indices of the blocks process ``rank`` trains on in micro-batch ``micro`` of optimizer step ``step``."""
        p = self.params
        rank = self.process_index if rank is None else rank
        first = step * self.global_batch + micro * p.batch_size * self.num_processes + rank * p.batch_size
        out = []
        for g in range(first, first + p.batch_size):
            out.append(int(self._permutation(g // self.n_blocks)[g % self.n_blocks]))
        return out

    # -- setup ----------------------------------------------------------------------------------------------
    def _accelerator(self):
        """The process's :class:`accelerate.Accelerator`, always with ``mixed_precision="no"``.

        accelerate keeps one mixed-precision setting per process (its state is a process-wide singleton that
        refuses a second value), but two training steps of one run may ask for different ``--precision``. So
        accelerate is asked for devices, processes and DDP only, with the same settings every time, and the
        Trainer applies the step's precision itself (:meth:`autocast`, a ``GradScaler`` for fp16): what
        accelerate's own mixed precision does, with accelerate's public ``convert_to_fp32`` on the outputs.
        """
        from accelerate import Accelerator

        cpu = getattr(self.ctx.device, "type", str(self.ctx.device)) == "cpu"
        try:
            return Accelerator(cpu=cpu, mixed_precision="no")
        except ValueError as exc:  # someone else in this process set accelerate up differently
            raise GptoptError(f"{self.name}: accelerate was already set up differently in this process "
                              f"({str(exc).splitlines()[0]}); gptopt sets precision per step with --precision, "
                              "so leave accelerate's mixed precision at 'no'") from None

    def autocast(self):
        """The context this run's forward passes run in: ``torch.autocast`` to bf16/fp16, or nothing for fp32."""
        import torch

        if self.mixed_precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mixed_precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.accelerator.device.type, dtype=dtype)

    def setup(self) -> None:
        """Create the accelerator, optimizer and schedule; wrap the model. Called by :meth:`run` if needed."""
        import warnings

        import torch

        p = self.params
        self.blocks = train_blocks(self.ctx.data, p.seq_len)
        self.n_blocks = int(self.blocks.shape[0])
        self.mixed_precision = resolve_precision(p.precision, self.ctx.device)
        self.accelerator = self._accelerator()
        # fp16 gradients are scaled against underflow (bf16 has fp32's range and needs no scaler)
        self.scaler = torch.amp.GradScaler(self.accelerator.device.type) if self.mixed_precision == "fp16" else None
        self._count_steps()
        trainable = self._trainable()
        self._training_mode(self.model)
        optimizer = self._optimizer(trainable)
        # the scheduler is NOT handed to accelerate: it would step once per process per step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self.wrapped, self.optimizer = self.accelerator.prepare(self.model, optimizer)

    def _count_steps(self) -> None:
        """:attr:`total_steps` from --steps / --epochs (default 100) and :attr:`warmup_steps` (10% by default)."""
        p = self.params
        if p.steps is not None:
            self.total_steps = p.steps
        elif p.epochs is not None:
            self.total_steps = max(1, math.ceil(p.epochs * self.n_blocks / self.global_batch))
        else:
            self.total_steps = DEFAULT_STEPS
        self.warmup_steps = p.warmup_steps if p.warmup_steps is not None else int(0.1 * self.total_steps)
        self.warmup_steps = min(self.warmup_steps, self.total_steps)

    def _trainable(self) -> list:
        """``[(name, parameter)]`` that train (an error when there are none); counts them for the metrics."""
        trainable = [(n, q) for n, q in self.model.named_parameters() if q.requires_grad]
        if not trainable:
            raise GptoptError(f"{self.name}: the model has no trainable parameters")
        self.trainable_params = sum(q.numel() for _, q in trainable)
        self.total_params = sum(q.numel() for q in self.model.parameters())
        return trainable

    def _training_mode(self, model) -> None:
        """Gradient checkpointing when asked, the KV cache off (restored by :meth:`finish`)."""
        if self.params.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", True) and not hasattr(
                    model, "gradient_checkpointing_enable"):
                raise GptoptError(f"{self.name}: this model does not support --gradient-checkpointing")
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        config = getattr(model, "config", None)
        self._use_cache = getattr(config, "use_cache", None)
        if config is not None and self._use_cache is not None:
            config.use_cache = False

    def _optimizer(self, trainable):
        """AdamW, weight decay on matrices only."""
        import torch

        p = self.params
        decay = [q for n, q in trainable if q.ndim >= 2]
        no_decay = [q for n, q in trainable if q.ndim < 2]
        groups = [{"params": decay, "weight_decay": p.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=p.lr, betas=(0.9, 0.999), eps=1e-8)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup, then cosine decay to zero (LambdaLR counts from 0: step k uses lr * factor(k))."""
        warm, total = self.warmup_steps, self.total_steps
        if warm and step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # -- checkpoint state (gptopt_core.kit.checkpoints) --------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue this run at :attr:`step` (model weights are saved separately)."""
        return checkpoints.trainer_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (call after :meth:`setup`, or before: it is applied by setup)."""
        checkpoints.restore_trainer_state(self, state)

    # -- the loop -------------------------------------------------------------------------------------------
    def extra_loss(self, model, batch, outputs):
        terms = self.ctx.hook.gptopt_training_loss(ctx=self.ctx, model=model, batch=batch, outputs=outputs)
        terms = [t for t in terms if t is not None]
        return sum(terms) if terms else None

    def train_step(self) -> float:
        """One optimizer step (all micro-batches); returns its mean loss over all processes."""
        import torch
        from accelerate.utils import convert_to_fp32

        p, acc = self.params, self.accelerator
        model = self.wrapped
        plain = acc.unwrap_model(model)
        model.train()
        total = torch.zeros((), device=acc.device)
        total_ce = torch.zeros((), device=acc.device)
        for micro in range(p.grad_accum):
            ids = self.blocks[self.block_indices(self.step, micro)].to(acc.device)
            batch = {"input_ids": ids, "labels": ids}
            sync = micro == p.grad_accum - 1 or self.num_processes == 1
            ctx_mgr = acc.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx_mgr:
                with self.autocast():
                    outputs = model(**batch)
                outputs = convert_to_fp32(outputs)
                loss = outputs.loss
                extra = self.extra_loss(plain, batch, outputs)
                full = loss + extra if extra is not None else loss
                scaled = full / p.grad_accum
                acc.backward(self.scaler.scale(scaled) if self.scaler else scaled)
            total += full.detach().float() / p.grad_accum
            total_ce += loss.detach().float() / p.grad_accum
        if p.max_grad_norm > 0:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            acc.clip_grad_norm_(model.parameters(), p.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.ctx.hook.gptopt_after_optimizer_step(ctx=self.ctx, model=plain, step=self.step)
        if self.num_processes > 1:
            both = acc.reduce(torch.stack([total, total_ce]), reduction="mean")
            total, total_ce = both[0], both[1]
        self.loss_history.append(float(total))
        self.ce_history.append(float(total_ce))
        return self.loss_history[-1]

    def evaluate(self) -> float | None:
        """Held-out perplexity (the core's one method) on the main process; others wait."""
        acc, p = self.accelerator, self.params
        ppl = None
        if acc.is_main_process:
            valid = self.ctx.data.valid_ids
            block = min(512, p.eval_tokens - 1, max(8, int(valid.numel()) - 1))
            with self.autocast():
                ppl = perplexity(acc.unwrap_model(self.wrapped), valid, block, block, p.eval_tokens)["perplexity"]
            self.eval_history.append({"step": self.step, "perplexity": ppl})
            self.ctx.log(f"  {self.name} step {self.step}/{self.total_steps}: held-out ppl {ppl:.3f}")
        acc.wait_for_everyone()
        return ppl

    def run(self) -> dict:
        """Train up to :attr:`total_steps`; returns the step's metrics."""
        if self.accelerator is None:
            self._resume_from_checkpoint()
            pending = getattr(self, "_pending_state", None)
            self.setup()
            if pending is not None:
                self.load_state_dict(pending)
                self._pending_state = None
        p = self.params
        tokens_per_step = self.global_batch * p.seq_len
        self.ctx.state["trainer"] = self
        try:
            remaining = range(self.step, self.total_steps)
            for _ in self.ctx.progress(remaining, self.name, total=len(remaining)):
                start, cpu_start = time.perf_counter(), time.process_time()
                loss = self.train_step()
                self.train_seconds += time.perf_counter() - start
                self.train_cpu_seconds += time.process_time() - cpu_start
                self.tokens_seen += tokens_per_step
                if not math.isfinite(loss):
                    raise GptoptError(f"{self.name}: the training loss became {loss} at step {self.step}; "
                                      "lower --lr or use --precision fp32")
                tps = self.tokens_seen / max(self.train_seconds, 1e-9)
                notes = "".join(f"  {k} {v}" for k, v in self.progress_notes.items())
                self.ctx.progress_info(f"loss {loss:.3f}  {tps:,.0f} tok/s{notes}")
                if p.eval_every and (self.step % p.eval_every == 0 or self.step == self.total_steps):
                    self.evaluate()
                if p.checkpoint_every and (self.step % p.checkpoint_every == 0 or self.step == self.total_steps):
                    self.save_checkpoint()
        finally:
            self.ctx.state.pop("trainer", None)
            self.finish()
        return self.metrics()

    def save_checkpoint(self) -> None:
        """Write the run's state and trainable weights to ``--out`` (main process; the others wait)."""
        checkpoints.save_trainer(self)

    def _resume_from_checkpoint(self) -> None:
        """Under ``--resume``: load this step's latest checkpoint (weights now, state after setup)."""
        checkpoints.resume_trainer(self)

    def finish(self) -> None:
        """Drop the accelerate wrappers and restore the model's inference settings."""
        acc = self.accelerator
        if acc is None:
            return
        model = acc.unwrap_model(self.wrapped, keep_fp32_wrapper=False)
        if self.params.gradient_checkpointing:
            disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
                model, "gradient_checkpointing_disable", None)
            if disable is not None:
                disable()
        config = getattr(model, "config", None)
        if config is not None and self._use_cache is not None:
            config.use_cache = self._use_cache
        model.eval()
        model.zero_grad(set_to_none=True)
        self.model = model

    def metrics(self) -> dict:
        n = len(self.loss_history)
        out: dict[str, Any] = {
            "train_steps": self.step, "train_tokens": self.tokens_seen,
            "train_seconds": round(self.train_seconds, 3),
            "train_cpu_seconds": round(self.train_cpu_seconds, 3),
            "train_tokens_per_s": round(self.tokens_seen / self.train_seconds, 2) if self.train_seconds else None,
            "trainable_params": int(self.trainable_params),
            "trainable_percent": round(100.0 * self.trainable_params / max(self.total_params, 1), 4),
            "num_processes": self.num_processes, "global_batch_blocks": self.global_batch,
            "precision": resolve_precision(self.params.precision, self.ctx.device),
            "loss_first": self.loss_history[0] if n else None, "loss_last": self.loss_history[-1] if n else None,
            "loss_history": [round(x, 6) for x in self.loss_history],
        }
        if self.ce_history != self.loss_history:
            out["ce_history"] = [round(x, 6) for x in self.ce_history]
        if self.eval_history:
            out["eval_history"] = self.eval_history
            out["train_eval_perplexity"] = self.eval_history[-1]["perplexity"]
        return out


def train(ctx, model, params: TrainParams, name: str = "train") -> tuple[Any, dict]:
    """Train ``model`` in place with the one loop; returns ``(model, metrics)`` (the model unwrapped)."""
    trainer = Trainer(ctx, model, params, name=name)
    metrics = trainer.run()
    return trainer.model, metrics
