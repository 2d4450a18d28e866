"""Wall time of gptopt's `eval` vs a plain transformers loop scoring the same held-out tokens (the first 4096;
pydoc's validation split has 2,636).

    python benchmarks/eval_vs_plain.py [--model smollm2-135m] [--repeats 8]

Both run in this process, interleaved (who goes first alternates by round), on the same model object; medians are compared (issue target: gptopt
within 3% of the plain loop) and the perplexities must agree.
"""
import argparse
import math
import statistics
import time

import torch


def plain_loop(model, ids, block=512):
    """What a user writes by hand: disjoint 512-token blocks, labels=input_ids, mean loss per block."""
    nll, n = 0.0, 0
    with torch.inference_mode():
        for b in range(0, ids.numel() - 1, block):
            x = ids[b:b + block].unsqueeze(0)
            if x.shape[1] < 2:
                break
            loss = model(input_ids=x, labels=x).loss
            nll += float(loss) * (x.shape[1] - 1)
            n += x.shape[1] - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.testing import make_context

    ctx = make_context(model=args.model)
    ids = ctx.data.valid_ids[:4096]
    model = ctx.model
    plain_loop(model, ids)  # warm-up
    t_gptopt, t_plain = [], []
    ours = theirs = None

    def run_ours():
        nonlocal ours
        s = time.perf_counter()
        ours = perplexity(model, ctx.data.valid_ids, 512, 512, 4096)["perplexity"]
        t_gptopt.append(time.perf_counter() - s)

    def run_theirs():
        nonlocal theirs
        s = time.perf_counter()
        theirs = plain_loop(model, ids)
        t_plain.append(time.perf_counter() - s)

    for i in range(args.repeats):  # alternate who goes first, so neither always runs on a warmer cache
        for fn in ((run_ours, run_theirs) if i % 2 == 0 else (run_theirs, run_ours)):
            fn()
    g, p = statistics.median(t_gptopt), statistics.median(t_plain)
    pair = statistics.median(a / b for a, b in zip(t_gptopt, t_plain))
    print(f"model={args.model} tokens=4096 threads={torch.get_num_threads()} repeats={args.repeats}")
    print(f"gptopt eval : {g:.3f} s  ppl {ours:.4f}")
    print(f"plain loop  : {p:.3f} s  ppl {theirs:.4f}")
    print(f"ratio gptopt/plain = {g / p:.3f} (median of per-round ratios {pair:.3f}; target <= 1.03)")


if __name__ == "__main__":
    main()
