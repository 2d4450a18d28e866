"""KL divergence from a base model's next-token distribution, as ``llama-perplexity --kl-divergence`` reports it:
mean / median / 99th / 99.9th percentile of the per-token KL(base || model), the share of positions where the
model's top token is the base's, perplexity with its ratio to the base's, and paired bootstrap intervals over
windows. Scored positions are exactly those of :func:`gptopt_core.perplexity_of` (same windows, same targets).

The base is stored as its **top-k log-probabilities** per scored position (float32, k = :data:`TOP_K`), the exact
log-probability of the target token, and one tail bucket. KL over the base's top-k is exact; the rest of the
vocabulary counts as one bucket, ``p_tail * log(p_tail / q_tail)``, which by the log-sum inequality is a lower bound
of the exact tail term (equal when the model keeps the base's tail proportions). llama.cpp stores every log-prob
as uint16 over ``[max - 16, max]`` and drops base log-probs below -16 (resolution ~2.4e-4 nats, the tail ignored);
docs/quantize.md gives the measured difference between the top-k figure and the exact full-vocabulary KL.
Perplexity and same-top-1 are exact (the target log-prob and the top token are stored as such).
"""
from __future__ import annotations

from dataclasses import dataclass

TOP_K = 128  #: base log-probs kept per position (float32 values + int32 ids: 1 KiB per position)


@dataclass
class BaseLogits:
    """A base model's distributions at the scored positions of a token set, in window order.

    ``top_ids`` ``[n, k]`` int32 and ``top_logp`` ``[n, k]`` float32 (descending), ``target_logp`` ``[n]``
    float32, ``window_tokens``: scored positions per window (sums to ``n``)."""

    top_ids: object
    top_logp: object
    target_logp: object
    window_tokens: list

    def slices(self):
        """``(top_ids, top_logp, target_logp)`` per window."""
        start = 0
        for n in self.window_tokens:
            yield self.top_ids[start:start + n], self.top_logp[start:start + n], self.target_logp[start:start + n]
            start += n

    def to_dict(self) -> dict:
        import torch

        return {"top_ids": self.top_ids, "top_logp": self.top_logp, "target_logp": self.target_logp,
                "window_tokens": torch.tensor(self.window_tokens, dtype=torch.int64)}

    @classmethod
    def from_dict(cls, d: dict) -> "BaseLogits":
        return cls(d["top_ids"], d["top_logp"], d["target_logp"], [int(n) for n in d["window_tokens"]])


def token_divergence(base_ids, base_logp, logp):
    """Per position: KL(base || model) in nats (top-k exact + one tail bucket) and whether the base's top token
    is a top token of the model. ``base_ids`` / ``base_logp`` ``[n, k]`` (the base's top-k, descending),
    ``logp`` ``[n, vocab]``: the model's log-softmax. Returns ``(kl [n] float64, same_top [n] bool)``."""
    import torch

    q_top = logp.gather(1, base_ids.long()).double()
    p_logp = base_logp.double()
    p_top = p_logp.exp()
    head = (p_top * (p_logp - q_top)).sum(1)
    p_tail = (1.0 - p_top.sum(1)).clamp_min(0.0)
    q_tail = (1.0 - q_top.exp().sum(1)).clamp_min(1e-30)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()),
                       torch.zeros_like(p_tail))
    same_top = logp.gather(1, base_ids[:, :1].long())[:, 0] >= logp.max(1).values
    return head + tail, same_top


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
