"""Resumable training checkpoints under ``--out``, and the training state (optimizer, schedule, RNG, histories) in them.

A training step with ``--checkpoint-every N`` writes, every N optimizer steps and at its end::

    OUT/checkpoints/chain.json                      the chain (model, data, seed, steps) the run was started with
    OUT/checkpoints/step02-lora/00000040/           one complete checkpoint (older ones are removed)
        trainable.safetensors                       the parameters being trained (LoRA adapters, or all weights)
        trainer.pt                                  optimizer, schedule, RNG, histories (loaded weights_only=True)
        meta.json                                   step, total steps, step name

Each checkpoint is written to a hidden temporary directory and renamed into place, so a kill at any moment
leaves the previous checkpoint intact (an interrupted write removes its temporary directory; one left by a
``kill -9`` is removed by the next checkpoint of that step). Nothing under ``--out`` is trusted on ``--resume``:
the whole directory is walked without following links before the model loads, each directory is checked again
right before it is written to or cleaned, and files are opened with ``O_NOFOLLOW | O_NONBLOCK``
(:mod:`gptopt_core.kit.outfiles`): a planted link or FIFO is a one-line refusal, never followed, never waited on. ``gptopt run --resume --out OUT`` (the same chain) replays the steps
before training (deterministic for a seed) and continues each training step from its latest checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import GptoptError
from .outfiles import check_run_tree, open_regular, read_regular, real_dir, write_file

DIRNAME = "checkpoints"
CHAIN = "chain.json"


def chain_of(recipe: dict) -> dict:
    """The part of a resolved recipe a resumed run must repeat exactly (not the gptopt version or device)."""
    return {k: recipe.get(k) for k in ("model", "data", "eval_data", "seed", "steps")}


def write_chain(out_dir: Path, recipe: dict) -> None:
    root = real_dir(Path(out_dir) / DIRNAME, out_dir, "--checkpoint-every", create=True)
    write_file(root / CHAIN, json.dumps(chain_of(recipe), indent=2, sort_keys=True))


def check_resumable(out_dir, recipe: dict) -> None:
    """Raise a one-line error unless ``out_dir`` holds checkpoints written by this same chain."""
    if out_dir is None:
        raise GptoptError("--resume needs --out DIR: the directory the interrupted run wrote its checkpoints to")
    path = Path(out_dir) / DIRNAME / CHAIN
    if not os.path.lexists(path.parent) or not os.path.isdir(out_dir):
        raise GptoptError(f"--resume: {out_dir} holds no training checkpoints (a training step writes them with "
                          "--checkpoint-every N); run without --resume")
    check_run_tree(out_dir)  # no link, FIFO or device anywhere below --out, before anything there is read
    if not os.path.isdir(path.parent):  # no links below --out by now: isdir is about the entry itself
        raise GptoptError(f"--resume: {path.parent} is not a directory; it is not what gptopt wrote (remove it)")
    for entry in os.scandir(path.parent):  # each step's checkpoints are a directory (checked without following)
        if entry.name.startswith("step") and not entry.is_dir(follow_symlinks=False):
            raise GptoptError(f"--resume: {DIRNAME}/{entry.name} is not a directory; it is not a checkpoint gptopt "
                              "wrote (remove it)")
    if not os.path.lexists(path):
        raise GptoptError(f"--resume: {out_dir} holds no training checkpoints (a training step writes them with "
                          "--checkpoint-every N); run without --resume")
    try:
        recorded = json.loads(read_regular(path, "--resume", 2**20))
    except ValueError:
        raise GptoptError(f"--resume: {path} is unreadable; run again without --resume into a new --out") from None
    now = json.loads(json.dumps(chain_of(recipe)))  # same normalisation as the written file
    if not isinstance(recorded, dict):
        raise GptoptError(f"--resume: {path} is not a chain gptopt wrote; run again without --resume into a new --out")
    if recorded != now:
        diff = next((k for k in now if recorded.get(k) != now[k]), "steps")
        raise GptoptError(f"--resume: {out_dir} was written by a different chain ({diff} differs); repeat the "
                          "interrupted command exactly, or start a new run without --resume")


def step_dir(out_dir, step_index: int, name: str) -> Path:
    return Path(out_dir) / DIRNAME / f"step{step_index + 1:02d}-{name}"


def latest(out_dir, step_index: int, name: str) -> Path | None:
    """The newest complete checkpoint of a step, or ``None``."""
    root = real_dir(step_dir(out_dir, step_index, name), out_dir, "--resume")
    if not os.path.lexists(root):
        return None
    done = [Path(e.path) for e in os.scandir(root) if e.name.isdigit() and e.is_dir(follow_symlinks=False)
            and os.path.isfile(os.path.join(e.path, "meta.json"))
            and not os.path.islink(os.path.join(e.path, "meta.json"))]
    return max(done, key=lambda d: int(d.name)) if done else None


def _remove(path: Path) -> None:
    """A link or file (by its name, never what it points to) or a real directory tree."""
    if os.path.islink(path) or not os.path.isdir(path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    else:
        shutil.rmtree(path, ignore_errors=True)


def save(trainer, model) -> Path:
    """Write ``trainer``'s state and ``model``'s trainable parameters as the step's newest checkpoint."""
    import torch
    from safetensors.torch import save_file

    ctx = trainer.ctx
    where = f"{trainer.name} --checkpoint-every"
    root = real_dir(step_dir(ctx.out_dir, ctx.step_index, trainer.name), ctx.out_dir, where, create=True)
    final = root / f"{trainer.step:08d}"
    tmp = root / f".tmp-{trainer.step:08d}-{os.getpid()}"
    _remove(tmp)
    tmp.mkdir()
    try:
        weights = {n: q.detach().to("cpu").contiguous() for n, q in model.named_parameters() if q.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(trainer.state_dict(), tmp / "trainer.pt")
        meta = {"step": trainer.step, "total_steps": trainer.total_steps, "name": trainer.name,
                "step_index": ctx.step_index, "trainable_tensors": len(weights)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        real_dir(root, ctx.out_dir, where)  # again, right before the rename and the clean-up below
        _remove(final)
        os.replace(tmp, final)
    except BaseException:  # interrupted (Ctrl-C, SIGTERM, disk full): no half-written directory is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in os.scandir(root):
        if old.name != final.name and (old.name.isdigit() or old.name.startswith(".tmp-")):
            _remove(Path(old.path))
    return final


def load(trainer, model, path: Path) -> None:
    """Copy a checkpoint's trainable parameters into ``model`` and hand its state to ``trainer``."""
    import torch
    from safetensors.torch import load as load_bytes

    # opened without following a link and without blocking on a FIFO; read from the checked descriptor
    with os.fdopen(open_regular(path / "trainable.safetensors", "--resume"), "rb") as f:
        raw = f.read()
    try:
        weights = load_bytes(raw)
        with os.fdopen(open_regular(path / "trainer.pt", "--resume"), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except GptoptError:
        raise
    except Exception as exc:  # a damaged file: safetensors / torch raise assorted types
        raise GptoptError(f"--resume: checkpoint {path} is damaged ({type(exc).__name__}); remove it to fall back "
                          "to the one before, or start a new run") from None
    params = {n: q for n, q in model.named_parameters() if q.requires_grad}
    if set(params) != set(weights) or any(params[n].shape != weights[n].shape for n in params):
        raise GptoptError(f"--resume: checkpoint {path} does not match the model being trained (different "
                          "trainable parameters); repeat the interrupted command exactly")
    with torch.no_grad():
        for n, q in params.items():
            q.copy_(weights[n].to(device=q.device, dtype=q.dtype))
    trainer.load_state_dict(state)


def save_trainer(trainer) -> None:
    """:meth:`gptopt_core.Trainer.save_checkpoint`: the newest checkpoint of a running training step, written by
    the main process while the others wait."""
    if trainer.ctx.out_dir is None:
        raise GptoptError(f"{trainer.name}: --checkpoint-every needs --out DIR")
    if trainer.accelerator.is_main_process:
        save(trainer, trainer.accelerator.unwrap_model(trainer.wrapped))
    trainer.accelerator.wait_for_everyone()


def resume_trainer(trainer) -> None:
    """Under ``--resume``: load the training step's latest checkpoint (weights now, state after setup)."""
    ctx = trainer.ctx
    if not getattr(ctx, "resume", False) or ctx.out_dir is None:
        return
    remove_stale_writes(step_dir(ctx.out_dir, ctx.step_index, trainer.name), ctx.out_dir)
    path = latest(ctx.out_dir, ctx.step_index, trainer.name)
    if path is None:
        ctx.log(f"  {trainer.name}: no checkpoint of this step yet; training from the start")
        return
    load(trainer, trainer.model, path)
    ctx.log(f"  {trainer.name}: resumed at step {trainer.step} from {path}")


def remove_stale_writes(root: Path, out_dir) -> list[str]:
    """Remove a step's ``.tmp-STEP-PID`` directories whose process no longer runs (a checkpoint write killed
    with -9); a live process's is left alone. Returns the names removed."""
    from .paths import pid_alive

    root = real_dir(root, out_dir, "--resume")
    if not os.path.isdir(root):
        return []
    removed = []
    for entry in os.scandir(root):
        pid = entry.name.rsplit("-", 1)[-1]
        if entry.name.startswith(".tmp-") and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            _remove(Path(entry.path))
            removed.append(entry.name)
    return removed


# -- the trainer's state (trainer.pt) ---------------------------------------------------------------------------
def trainer_state(trainer) -> dict:
    """Everything needed to continue a training run at ``trainer.step`` (the weights are saved separately)."""
    return {"step": trainer.step, "optimizer": trainer.optimizer.state_dict() if trainer.optimizer else None,
            "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None, "rng": rng_state(),
            "grad_scaler": trainer.scaler.state_dict() if trainer.scaler else None,
            "loss_history": list(trainer.loss_history), "ce_history": list(trainer.ce_history),
            "eval_history": list(trainer.eval_history), "tokens_seen": trainer.tokens_seen,
            "train_seconds": trainer.train_seconds, "train_cpu_seconds": trainer.train_cpu_seconds,
            "params": trainer.params.model_dump(mode="json")}


def restore_trainer_state(trainer, state: dict) -> None:
    """Put a :func:`trainer_state` back (before the trainer's setup, it is kept and applied by setup)."""
    trainer.step = int(state["step"])
    trainer.loss_history = list(state.get("loss_history", []))
    trainer.ce_history = list(state.get("ce_history", []))
    trainer.eval_history = list(state.get("eval_history", []))
    trainer.tokens_seen = int(state.get("tokens_seen", 0))
    trainer.train_seconds = float(state.get("train_seconds", 0.0))
    trainer.train_cpu_seconds = float(state.get("train_cpu_seconds", 0.0))
    if trainer.optimizer is None:
        trainer._pending_state = state
        return
    if state.get("optimizer") is not None:
        trainer.optimizer.load_state_dict(state["optimizer"])
    if state.get("scheduler") is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("rng") is not None:
        set_rng_state(state["rng"])
    if state.get("grad_scaler") is not None and trainer.scaler is not None:
        trainer.scaler.load_state_dict(state["grad_scaler"])


def rng_state() -> dict:
    """Python's, torch's and (on a GPU) CUDA's random generator states."""
    import random

    import torch

    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def set_rng_state(rng: dict) -> None:
    import random

    import torch

    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
