"""Which model a KL measurement compares against, and the cache that computes its logits once per (model, tokens).

``--kl-base auto`` (the default of ``eval`` and ``llamacpp``): the chain's model just before its first lossy step (a
step whose facts belong to a family declared ``lossy``: quantize, prune, cpu-fast, prune-experts). Before that step runs,
the core's ``gptopt_step_started`` hook computes the base's top-k log-probs on every later step's token set and
windows (:meth:`gptopt_core.Step.kl_windows`). A measurement before any lossy step has no base to differ from
(``eval`` stores its own log-probs as the base instead, so the hook finds them); ``llamacpp`` then measures against
the torch model as it is. ``--kl-base PATH``: a reference model (directory, .gguf, anything ``--model`` takes) in
torch; ``llamacpp --kl-base FILE.gguf`` runs the reference in llama.cpp. ``--kl-base none``: no KL.

Cache: ``$GPTOPT_CACHE/kl-base/<sha256>/`` (``codes.npy``, memory-mapped when read, and ``meta.pt``), the key being
the base model's content hash (or a reference file's sha256), the token ids, the windows and the storage version;
also kept in ``ctx.state['kl_base']`` for the run. Delete the folder to free the space (1.6 GB per 16k SmolLM2
tokens).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .divergence import BaseLogits
from ..errors import GptoptError

CACHE_VERSION = 2  # 2: llama.cpp's uint16 full-vocabulary storage


def is_lossy(step) -> bool:
    """Whether ``step`` changes the model's numbers in a way KL is meant to measure: a fact it plans belongs to a
    family declared ``lossy`` (:class:`gptopt_core.Fact`, e.g. the core's ``quantized``)."""
    from ..vocabulary import lossy_families

    lossy = lossy_families(getattr(step, "plugins", None))
    return any(f.split(":")[0] in lossy for f in step.next_facts(set()))


def cache_key(model_key: str, ids, block_size: int, stride: int, max_tokens: int) -> str:
    ids = ids[:max_tokens].reshape(-1).long().cpu().contiguous()
    token_hash = hashlib.sha256(ids.numpy().tobytes()).hexdigest()
    spec = {"v": CACHE_VERSION, "model": model_key, "tokens": token_hash, "n": int(ids.numel()),
            "block_size": block_size, "stride": stride}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _cache_path(key: str) -> Path:
    from .models import cache_dir

    return cache_dir() / "kl-base" / key


def cached_kl_base(ctx, model_key: str, ids, block_size: int, stride: int, max_tokens: int, compute=None):
    """The base logits for (model, tokens, windows): from this run's memory, else the disk cache, else
    ``compute()`` (then stored in both). ``None`` when absent and ``compute`` is ``None``."""
    key = cache_key(model_key, ids, block_size, stride, max_tokens)
    memory = ctx.state.setdefault("kl_base", {}) if ctx is not None else {}
    if key in memory:
        return memory[key]
    path = _cache_path(key)
    base = load(path) if path.is_dir() else None
    if base is None and compute is not None:
        base = compute()
        store(path, base)
        base = load(path) or base  # memory-mapped from the cache: the computed copy is freed
    if base is not None:
        memory[key] = base
    return base


def load(path: Path) -> BaseLogits | None:
    import numpy as np
    import torch

    try:
        meta = torch.load(path / "meta.pt", map_location="cpu", weights_only=True)
        codes = np.load(path / "codes.npy", mmap_mode="r")
        return BaseLogits(codes, meta["scale"], meta["min_logp"], meta["target_logp"], meta["top_id"],
                          [int(n) for n in meta["window_tokens"]])
    except Exception:  # a truncated or foreign entry: recompute
        return None


def store(path: Path, base: BaseLogits) -> None:
    """Write atomically (a temporary folder, then rename); a cache that cannot be written is only a cache."""
    import shutil

    import numpy as np
    import torch

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "codes.npy", np.asarray(base.codes))
        torch.save({"scale": base.scale, "min_logp": base.min_logp, "target_logp": base.target_logp,
                    "top_id": base.top_id, "window_tokens": torch.tensor(base.window_tokens)}, tmp / "meta.pt")
        os.replace(tmp, path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class KLPlan:
    """What a measurement does about KL: compare with ``base`` (or not), and/or keep its own top log-probs as the
    base of later measurements (``store(base_logits)``)."""

    base: BaseLogits | None = None
    store: object = None
    source: str = ""


def _torch_base(ctx, model, model_key, ids, block_size, stride, max_tokens):
    from .evaluate import perplexity

    def compute():
        return perplexity(model, ids, block_size, stride, max_tokens, keep_base=True)["base_logits"]

    return cached_kl_base(ctx, model_key, ids, block_size, stride, max_tokens, compute)


def reference_base(ctx, spec: str, ids, block_size, stride, max_tokens) -> BaseLogits:
    """A reference model's base logits in torch (loaded through the model sources, freed afterwards)."""
    from .models import content_hash

    options = {"device": str(ctx.device), "allow_pickle": False, "trust_remote_code": False}
    loaded = ctx.plugins.hook.gptopt_resolve_model(spec=spec, options=options)
    if loaded is None:
        raise GptoptError(f"--kl-base {spec}: no model source understands it")
    if not loaded.facts:
        loaded.model.to(ctx.device)
    try:
        return _torch_base(ctx, loaded.model, content_hash(loaded.model), ids, block_size, stride, max_tokens)
    finally:
        del loaded


def kl_plan(ctx, ids, block_size: int, stride: int, max_tokens: int, reference: str = "auto",
            own_base: bool = True) -> KLPlan:
    """The KL plan of a measurement of ``ctx.model`` on these tokens and windows (see the module docstring).
    ``own_base``: the measured logits are ``ctx.model``'s (``eval``); ``False`` for another runtime (``llamacpp``),
    whose base before any lossy step is ``ctx.model`` in torch."""
    from .models import content_hash

    if reference == "none":
        return KLPlan()
    if reference != "auto":
        return KLPlan(reference_base(ctx, reference, ids, block_size, stride, max_tokens), source=reference)
    captured = ctx.state.get("kl_base_hash")
    if captured is not None:
        base = cached_kl_base(ctx, captured, ids, block_size, stride, max_tokens)
        if base is None:
            raise GptoptError("the base logits for KL were not captured for these tokens and windows; give "
                              "--kl-base PATH or --kl-base none")
        return KLPlan(base, source="model before the first lossy step")
    key = content_hash(ctx.model)
    if own_base:  # this model is the base: keep its log-probs for the steps after the lossy one
        def keep(base):
            return cached_kl_base(ctx, key, ids, block_size, stride, max_tokens, lambda: base)
        return KLPlan(store=keep if _lossy_later(ctx) else None)
    return KLPlan(_torch_base(ctx, ctx.model, key, ids, block_size, stride, max_tokens), source="torch model")


def _lossy_later(ctx) -> bool:
    return any(is_lossy(s) for s in ctx.steps[ctx.step_index + 1:])


def capture_before_lossy(ctx, step) -> None:
    """Before the chain's first lossy step: the base logits of every later measurement's tokens and windows
    (computed now, from the model as it still is, or found in the cache)."""
    from .models import content_hash

    if ctx is None or "kl_base_hash" in ctx.state or not is_lossy(step):  # ctx None: a hook test's bare call
        return
    later = ctx.steps[ctx.step_index + 1:]
    wanted = [w for w in (s.kl_windows(ctx) for s in later) if w]
    key = content_hash(ctx.model) if wanted else ""
    ctx.state["kl_base_hash"] = key
    for ids, block_size, stride, max_tokens in wanted:
        _torch_base(ctx, ctx.model, key, ids, block_size, stride, max_tokens)


def kl_metrics(result: dict, source: str) -> dict:
    """The KL figures of a :func:`gptopt_core.perplexity_of` result, with where the base came from."""
    keys = ("kl_mean", "kl_mean_ci95", "kl_median", "kl_p99", "kl_p999", "kl_max", "same_top1", "perplexity_base",
            "perplexity_ratio", "perplexity_ratio_ci95", "kl_tokens", "kl_windows")
    out = {k: result[k] for k in keys if k in result}
    if out:
        out["kl_base"] = source
    return out
