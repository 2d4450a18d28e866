"""Held-out perplexity: one fixed method (block size, stride, max tokens) for every number gptopt reports."""
from __future__ import annotations

import math

from ..errors import GptoptError


def model_device(model):
    """The device of the model's first parameter (CPU for a model without parameters)."""
    import torch

    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def eval_windows(n_tokens: int, block_size: int = 512, stride: int = 512) -> list:
    """``[(begin, end, scored_from)]``: the windows :func:`perplexity` scores over ``n_tokens`` tokens.

    Windows of ``block_size`` tokens start every ``stride`` tokens; each window scores its targets (positions
    ``begin + 1 .. end - 1``) from index ``scored_from`` on, leaving out the ones an earlier window scored (the
    Hugging Face sliding-window method), so ``stride == block_size`` means disjoint blocks."""
    windows, prev_end = [], 0
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + block_size, n_tokens)
        if end - begin < 2:
            break
        windows.append((begin, end, max(prev_end - begin - 1, 0)))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity_of(window_logits, ids, block_size: int = 512, stride: int = 512, max_tokens: int = 4096,
                  progress=None, base=None, keep_base: bool = False) -> dict:
    """Perplexity of any model given as ``window_logits(input_ids) -> logits`` (``[len, vocab]`` for a 1-D
    window of token ids) on the first ``max_tokens`` of ``ids``: the one perplexity computation, shared by
    torch models (:func:`perplexity`) and other runtimes (e.g. llama.cpp's logits). Returns
    ``{"perplexity", "nll", "tokens"}``.

    ``base``: a :class:`gptopt_core.BaseLogits` of the same token set and windows: the result then also has the KL
    figures of :func:`gptopt_core.kit.divergence.summarize` (KL from the base, same top token, perplexity ratio with
    bootstrap intervals). ``keep_base``: also return these logits as ``"base_logits"`` (another measurement's base).
    """
    import torch

    from .divergence import summarize

    ids = ids[:max_tokens]
    if ids.numel() < block_size + 1:
        raise GptoptError(
            f"validation split has {ids.numel()} tokens, fewer than one eval block of {block_size}+1; give more "
            "data or a smaller --block-size"
        )
    windows = eval_windows(ids.numel(), block_size, stride)
    if base is not None and [e - b - 1 - s for b, e, s in windows] != list(base.window_tokens):
        raise GptoptError("the KL base was measured on other windows than these; measure both on the same tokens, "
                          "--block-size and --stride")
    sums = {"tokens": [], "nll": [], "base_nll": [], "kl": [], "same_top": []}
    acc = _Accumulator(base, keep_base, sum(e - b - 1 - s for b, e, s in windows))
    iterator = progress(windows, "eval") if progress else windows
    for begin, end, scored_from in iterator:
        input_ids = ids[begin:end]
        logits = torch.as_tensor(window_logits(input_ids))[:-1].float()
        targets = input_ids[1:].to(logits.device)[scored_from:]
        logp = torch.log_softmax(logits[scored_from:], dim=-1)
        target_logp = logp.gather(1, targets[:, None])[:, 0]
        sums["nll"].append(-float(target_logp.double().sum()))
        sums["tokens"].append(int(targets.numel()))
        acc.add(logits[scored_from:], logp, target_logp, sums)
    total_tokens = sum(sums["tokens"])
    mean = sum(sums["nll"]) / max(total_tokens, 1)
    out = {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}
    if keep_base:
        out["base_logits"] = acc.kept(sums["tokens"])
    if base is not None:
        out.update(summarize(sums, torch.cat(acc.token_kl)))
    return out


class _Accumulator:
    """Per window: KL against ``base`` (per-token values and window sums), and/or these logits kept as a base."""

    def __init__(self, base, keep: bool, n: int):
        self.parts = base.slices() if base is not None else None
        self.keep, self.n, self.at, self.token_kl = keep, n, 0, []
        self.codes, self.rest = None, []

    def add(self, logits, logp, target_logp, sums) -> None:
        import numpy as np
        import torch

        from .divergence import encode, token_divergence

        if self.keep:
            codes, scale, min_logp = encode(logits)
            if self.codes is None:
                self.codes = np.empty((self.n, codes.shape[1]), dtype=np.uint16)
            self.codes[self.at:self.at + len(codes)] = codes
            self.at += len(codes)
            self.rest.append((scale, min_logp, target_logp.cpu(), logp.argmax(-1).cpu()))
        if self.parts is not None:
            codes, scale, min_logp, b_target, b_top = next(self.parts)
            if codes.shape[1] != logp.shape[1]:
                raise GptoptError(f"the KL base has a vocabulary of {codes.shape[1]}, this model {logp.shape[1]}; "
                                  "compare models with the same tokenizer")
            dev = logp.device
            kl, same = token_divergence(codes.to(dev), scale.to(dev), min_logp.to(dev), b_top.to(dev), logp)
            self.token_kl.append(kl.cpu())
            sums["kl"].append(float(kl.sum()))
            sums["same_top"].append(int(same.sum()))
            sums["base_nll"].append(-float(torch.as_tensor(b_target).double().sum()))

    def kept(self, window_tokens):
        import torch

        from .divergence import BaseLogits

        scale, min_logp, target, top = (torch.cat(c) for c in zip(*self.rest))
        return BaseLogits(self.codes, scale, min_logp, target, top, list(window_tokens))


def perplexity(model, ids, block_size: int = 512, stride: int = 512, max_tokens: int = 4096, progress=None,
               base=None, keep_base: bool = False) -> dict:
    """Perplexity of ``model`` on the first ``max_tokens`` of ``ids`` (1-D LongTensor).

    Windows of ``block_size`` tokens start every ``stride`` tokens; each window scores only the tokens not
    scored by an earlier window (the Hugging Face sliding-window method), so ``stride == block_size`` means
    disjoint blocks (see :func:`eval_windows`). Returns ``{"perplexity", "nll", "tokens"}``; ``base`` and
    ``keep_base`` as in :func:`perplexity_of` (KL from a base, or this model's log-probs kept as a base).
    """
    import torch

    device = model_device(model)
    was_training = model.training
    model.eval()

    def window_logits(input_ids):
        return model(input_ids=input_ids.unsqueeze(0).to(device)).logits[0]

    try:
        with torch.inference_mode():
            return perplexity_of(window_logits, ids, block_size, stride, max_tokens, progress, base, keep_base)
    finally:
        model.train(was_training)


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (``max_new_tokens`` tokens), decoded to text without the prompt."""
    import torch

    device = model_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
