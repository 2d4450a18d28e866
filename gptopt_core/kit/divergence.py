"""KL divergence from a base model's next-token distribution, as ``llama-perplexity --kl-divergence`` reports it:
mean / median / 99th / 99.9th percentile of the per-token KL(base || model), the share of positions where the
model's top token is the base's, perplexity with its ratio to the base's, and paired bootstrap intervals over
windows. Scored positions are exactly those of :func:`gptopt_core.perplexity_of` (same windows, same targets).

The base is stored as llama.cpp's ``--kl-divergence-base`` file stores it: per position, every log-prob of the
vocabulary as a uint16 code over ``[max_logit - 16, max_logit]`` (a float32 scale and minimum per position; codes
of log-probs below that range are 0) and KL summed over the base log-probs above -16, exactly llama.cpp's formula.
Measured on SmolLM2 against an RTN int4 copy (``benchmarks/kl_exactness.py``, 4,088 tokens): mean KL within 0.11 %
of the exact float64 full-vocabulary value, largest per-token difference 0.0021 nats; a top-k store (k = 128 plus a
tail bucket) was 10 % low there, so it was not used. Perplexity and same-top-1 use exact values (the target's
float32 log-prob and the base's top token are stored as such). 2 bytes per vocabulary entry and position: 98 KB
per position for SmolLM2's 49,152 tokens (1.6 GB for 16,384 tokens, memory-mapped from the cache).
"""
from __future__ import annotations

from dataclasses import dataclass

RANGE = 16.0  #: nats below the top logit that the codes cover (llama.cpp's)
LEVELS = 65535.0


@dataclass
class BaseLogits:
    """A base model's distributions at the scored positions of a token set, in window order.

    ``codes`` ``[n, vocab]`` uint16 (numpy, possibly memory-mapped), ``scale`` / ``min_logp`` ``[n]`` float32
    (log-prob = ``scale * code + min_logp``), ``target_logp`` ``[n]`` float32, ``top_id`` ``[n]`` int64,
    ``window_tokens``: scored positions per window (sums to ``n``)."""

    codes: object
    scale: object
    min_logp: object
    target_logp: object
    top_id: object
    window_tokens: list

    def slices(self):
        """``(codes, scale, min_logp, target_logp, top_id)`` per window (codes as a torch int32 tensor)."""
        import numpy as np
        import torch

        start = 0
        for n in self.window_tokens:
            end = start + n
            codes = torch.from_numpy(np.asarray(self.codes[start:end]).astype(np.int32))
            yield codes, self.scale[start:end], self.min_logp[start:end], self.target_logp[start:end], \
                self.top_id[start:end]
            start = end


def encode(logits):
    """llama.cpp's storage of one window's logits ``[n, vocab]``: ``(codes uint16 numpy, scale, min_logp)``."""
    import torch

    logits = logits.float()
    mx = logits.max(-1, keepdim=True).values
    mn = torch.maximum(logits.min(-1, keepdim=True).values, mx - RANGE)
    lse = torch.logsumexp(logits - mx, -1, keepdim=True)
    scale = (mx - mn) / LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.where(logits > mn, torch.round((logits - mn) / safe), torch.zeros_like(logits))
    return (codes.to(torch.int32).cpu().numpy().astype("uint16"), scale[:, 0].cpu(), (mn - mx - lse)[:, 0].cpu())


def token_divergence(codes, scale, min_logp, top_id, logp):
    """Per position: KL(base || model) in nats, llama.cpp's formula over the stored base log-probs above -16,
    and whether the base's top token is a top token of the model. ``codes`` ``[n, vocab]`` (int), ``scale`` /
    ``min_logp`` / ``top_id`` ``[n]``; ``logp`` ``[n, vocab]``: the model's log-softmax. Returns ``(kl [n]
    float64, same_top [n] bool)``."""
    import torch

    p_logp = codes.float() * scale[:, None].float() + min_logp[:, None].float()
    terms = torch.where(p_logp > -RANGE, p_logp.exp() * (p_logp - logp.float()), torch.zeros_like(p_logp))
    same_top = logp.gather(1, top_id[:, None].long())[:, 0] >= logp.max(1).values
    return terms.double().sum(1), same_top


def percentile(values, fraction: float) -> float:
    """llama.cpp's percentile of sorted values: linear interpolation between closest ranks."""
    import torch

    v = torch.sort(torch.as_tensor(values, dtype=torch.float64).reshape(-1)).values
    if v.numel() == 0:
        return float("nan")
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (v.numel() - 1)
    i = int(p)
    p -= i
    return float((1 - p) * v[i] + p * v[min(i + 1, v.numel() - 1)])


def paired_bootstrap(stat, *columns, resamples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of ``stat`` over windows, resampling the same windows for every column (so
    two models measured on the same tokens are compared pairwise). ``columns``: per-window 1-D sequences of equal
    length; ``stat(*resampled)`` gets tensors ``[resamples, windows]`` and returns ``[resamples]``. Seeded:
    the same inputs and seed give the same interval. Returns ``(low, high)``."""
    import torch

    cols = [torch.as_tensor(c, dtype=torch.float64).reshape(-1) for c in columns]
    n = cols[0].numel()
    if n == 0 or any(c.numel() != n for c in cols):
        raise ValueError("paired_bootstrap: columns must be non-empty and of equal length")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (resamples, n), generator=gen)
    values = stat(*[c[idx] for c in cols]).double()
    alpha = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([alpha, 1 - alpha], dtype=torch.float64)).tolist()
    return low, high


def ppl_ratio(nll_a, nll_b, tokens) -> tuple:
    """Perplexity of A over B on the same windows, ``exp((sum nll_a - sum nll_b) / sum tokens)`` (per-window NLL
    sums and scored-token counts), with its paired bootstrap 95 % interval: ``(ratio, low, high)``."""
    import math

    def stat(a, b, t):
        return ((a.sum(-1) - b.sum(-1)) / t.sum(-1)).exp()

    ratio = math.exp((sum(nll_a) - sum(nll_b)) / sum(tokens))
    return (ratio, *paired_bootstrap(stat, nll_a, nll_b, tokens))


def mean_interval(sums, tokens) -> tuple:
    """Token-weighted mean of per-window sums, with its bootstrap 95 % interval over windows: ``(mean, lo, hi)``."""
    def stat(s, t):
        return s.sum(-1) / t.sum(-1)

    return (sum(sums) / sum(tokens), *paired_bootstrap(stat, sums, tokens))


def summarize(windows: dict, token_kl) -> dict:
    """The reported figures from per-window sums (``tokens``, ``nll``, ``base_nll``, ``kl``, ``same_top``) and the
    per-token KL values: ``kl_mean`` (+ ``kl_mean_ci95``), ``kl_median``, ``kl_p99``, ``kl_p999``, ``kl_max``,
    ``same_top1`` (percent), ``perplexity_base``, ``perplexity_ratio`` (+ ``perplexity_ratio_ci95``)."""
    import math

    tokens = windows["tokens"]
    n = sum(tokens)
    ratio, r_lo, r_hi = ppl_ratio(windows["nll"], windows["base_nll"], tokens)
    kl_mean, k_lo, k_hi = mean_interval(windows["kl"], tokens)
    return {"kl_mean": kl_mean, "kl_mean_ci95": [k_lo, k_hi], "kl_median": percentile(token_kl, 0.5),
            "kl_p99": percentile(token_kl, 0.99), "kl_p999": percentile(token_kl, 0.999),
            "kl_max": percentile(token_kl, 1.0), "same_top1": 100.0 * sum(windows["same_top"]) / n,
            "perplexity_base": math.exp(sum(windows["base_nll"]) / n), "perplexity_ratio": ratio,
            "perplexity_ratio_ci95": [r_lo, r_hi], "kl_tokens": n, "kl_windows": windows}
