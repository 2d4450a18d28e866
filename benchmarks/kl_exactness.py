"""How exact is the KL gptopt reports? Its base is stored as llama.cpp stores it (uint16 log-probs over
[max - 16, max], base log-probs below -16 dropped; gptopt_core/kit/divergence.py); this compares that figure with the
exact KL over the whole vocabulary (float64 from full float32 logits) and with a smaller store that was considered
(the top-k log-probs per position plus one tail bucket, several k), on SmolLM2 against a round-to-nearest int4
(group 32, symmetric) copy of it.

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


def topk_kl(p, q, k):
    """The top-k store: KL exact over the base's top-k, the rest as one bucket (a lower bound of the tail term)."""
    top = p.topk(k, -1)
    q_top = q.gather(1, top.indices).double()
    p_logp = top.values.double()
    head = (p_logp.exp() * (p_logp - q_top)).sum(1)
    p_tail = (1.0 - p_logp.exp().sum(1)).clamp_min(0.0)
    q_tail = (1.0 - q_top.exp().sum(1)).clamp_min(1e-30)
    return head + torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-300).log() - q_tail.log()),
                              torch.zeros_like(p_tail))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--data", default="builtin:stdlib-docs")
    args = ap.parse_args()
    from gptopt_core import encode_logits, make_context, percentile, token_divergence

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
                approx[k].append(topk_kl(p, q, k))
            codes, scale, min_logp = encode_logits(p_logits)
            lcpp.append(token_divergence(torch.from_numpy(codes.astype("int32")), scale, min_logp,
                                         p.argmax(-1), q)[0])
    exact = torch.cat(exact)
    rows = [("exact (full vocabulary, float64)", exact)] + [(f"top-{k} + tail bucket", torch.cat(v))
                                                            for k, v in approx.items()]
    rows.append(("gptopt = llama.cpp uint16 storage", torch.cat(lcpp)))
    for name, kl in rows:
        print(json.dumps({"storage": name, "tokens": int(kl.numel()), "kl_mean": float(kl.mean()),
                          "kl_p99": percentile(kl, 0.99), "kl_p999": percentile(kl, 0.999),
                          "mean_rel_diff": float((kl.mean() - exact.mean()) / exact.mean()),
                          "max_abs_diff": float((kl - exact).abs().max())}))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__,
                      "bytes_per_token_uint16": 2 * int(p_logits.shape[-1]) + 16}))


if __name__ == "__main__":
    main()
