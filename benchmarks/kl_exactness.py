"""How exact is the KL gptopt reports? Its base is stored as the top-k log-probs per position plus one tail bucket
(gptopt_core/divergence.py); this compares that figure, for several k, with the exact KL over the whole vocabulary
(float64 from full float32 logits), and with llama.cpp's storage (uint16 log-probs over [max - 16, max], base
log-probs below -16 dropped), on SmolLM2 against a round-to-nearest int4 (group 32, symmetric) copy of it.

    python benchmarks/kl_exactness.py [--tokens 4096] [--data builtin:stdlib-docs]

Prints one JSON line per storage: mean / p99 / p99.9 KL and the largest per-token difference from the exact value.
"""
import argparse
import copy
import json
import time

import torch


def quantized_copy(model):
    from gptopt_core import fit_grid, round_to_grid, weight_matrix, weight_modules

    other = copy.deepcopy(model)
    for _, module in weight_modules(other):
        round_to_grid(module, fit_grid(weight_matrix(module), 4, 32, True))
    return other


def llamacpp_storage_kl(p_logits, q_logp):
    """llama.cpp's perplexity.cpp: uint16 log-probs over [max - 16, max], p_base below e^-16 ignored."""
    mx = p_logits.max(-1, keepdim=True).values
    mn = torch.maximum(p_logits.min(-1, keepdim=True).values, mx - 16)
    lse = torch.logsumexp(p_logits - mx, -1, keepdim=True)
    scale = (mx - mn) / 65535
    codes = torch.where(p_logits > mn, torch.round((p_logits - mn) / scale), torch.zeros_like(p_logits))
    p_logp = scale * codes + (mn - mx - lse)
    keep = p_logp > -16
    return torch.where(keep, p_logp.exp() * (p_logp - q_logp), torch.zeros_like(p_logp)).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--data", default="builtin:stdlib-docs")
    args = ap.parse_args()
    from gptopt_core import make_context, percentile, token_divergence

    ctx = make_context(model="smollm2-135m", data=args.data)
    ids = ctx.data.valid_ids[:args.tokens]
    base_model, model = ctx.model, quantized_copy(ctx.model)
    exact, approx, lcpp = [], {k: [] for k in (16, 64, 128, 256, 1024)}, []
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, ids.numel() - 1, 512):
            x = ids[b:b + 512].unsqueeze(0)
            p_logits = base_model(input_ids=x).logits[0, :-1].float()
            p = torch.log_softmax(p_logits, -1)
            q = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            exact.append((p.double().exp() * (p.double() - q.double())).sum(-1))
            for k in approx:
                top = p.topk(k, -1)
                approx[k].append(token_divergence(top.indices.int(), top.values, q)[0])
            lcpp.append(llamacpp_storage_kl(p_logits, q).double())
    exact = torch.cat(exact)
    rows = [("exact (full vocabulary, float64)", exact)] + [(f"top-{k} + tail bucket", torch.cat(v))
                                                            for k, v in approx.items()]
    rows.append(("llama.cpp uint16 storage", torch.cat(lcpp)))
    for name, kl in rows:
        print(json.dumps({"storage": name, "tokens": int(kl.numel()), "kl_mean": float(kl.mean()),
                          "kl_p99": percentile(kl, 0.99), "kl_p999": percentile(kl, 0.999),
                          "mean_rel_diff": float((kl.mean() - exact.mean()) / exact.mean()),
                          "max_abs_diff": float((kl - exact).abs().max())}))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                      "bytes_per_token_top128": 128 * 8 + 4}))


if __name__ == "__main__":
    main()
