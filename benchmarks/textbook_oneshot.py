"""A plain, textbook GPTQ / SparseGPT script on SmolLM2-135M, scored by the same harness as gptopt's own
implementation (``benchmarks/oneshot_quality.py``): same calibration blocks (64 x 128 train tokens, the run seed),
same held-out tokens, same perplexity function.

    HF_HUB_OFFLINE=1 python benchmarks/textbook_oneshot.py [--only gptq-int4-g64-sym,sparsegpt-50,...]
                                                           [--json FILE]

The algorithms are written out here the way the reference repositories do it (IST-DASLab ``gptq.py`` /
``sparsegpt.py`` and their ``llama.py`` drivers), independent of gptopt's code: every transformer block is
calibrated once (all its linear layers hooked together, no "true sequential" groups), quantized / pruned with the
blocked Cholesky algorithm (128-column lazy batches, dampening 1 %, group parameters fitted on ``W`` as the
reference does, which lacks the updates from earlier columns of the same lazy batch), and the compressed block's
outputs feed the next block. It is the yardstick the issue quotes ("a plain, textbook script"), measured on this
project's held-out split so that the comparison with gptopt is one harness, one run.
"""
from __future__ import annotations

import argparse
import json
import os
import time

CONFIGS = {
    "gptq-int4-g64-sym": dict(kind="gptq", bits=4, group=64, sym=True),
    "gptq-int4-g64-asym": dict(kind="gptq", bits=4, group=64, sym=False),
    "gptq-int8-channel-sym": dict(kind="gptq", bits=8, group=None, sym=True),
    "sparsegpt-50": dict(kind="sparsegpt", sparsity=0.5, n=0, m=0),
    "sparsegpt-2:4": dict(kind="sparsegpt", sparsity=0.5, n=2, m=4),
}


# -- the reference quantizer (min-max, per row) --------------------------------------------------------------------
def find_params(x, bits, sym):
    import torch

    maxq = 2 ** bits - 1
    xmin = torch.minimum(x.min(1).values, torch.zeros(x.shape[0]))
    xmax = torch.maximum(x.max(1).values, torch.zeros(x.shape[0]))
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, 1
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale[:, None], zero[:, None], maxq


def quantize(x, scale, zero, maxq):
    import torch

    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def damped_inverse_cholesky(H, W, percdamp=0.01):
    import torch

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H[range(len(H)), range(len(H))] += percdamp * torch.mean(torch.diag(H))
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    return torch.linalg.cholesky(H, upper=True)


def gptq(W, H, bits, group, sym, blocksize=128):
    import torch

    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    scale, zero, maxq = find_params(W, bits, sym)
    Hinv = damped_inverse_cholesky(H, W)
    Q = torch.zeros_like(W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if group is not None and (i1 + i) % group == 0:
                scale, zero, maxq = find_params(W[:, i1 + i:i1 + i + group], bits, sym)
            q = quantize(w[:, None], scale, zero, maxq).flatten()
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None].matmul(Hinv1[i, i:][None, :])
            Err1[:, i] = err1
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return Q


def sparsegpt(W, H, sparsity, prunen, prunem, blocksize=128):
    import torch

    W, H = W.clone().float(), H.clone()
    columns = W.shape[1]
    Hinv = damped_inverse_cholesky(H, W)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1, Q1, Err1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), torch.zeros_like(W[:, i1:i2])
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1 ** 2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w, d = W1[:, i], Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i:i + prunem] ** 2 / (torch.diag(Hinv1)[i:i + prunem].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1[:, None].matmul(Hinv1[i, i:][None, :])
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


# -- the reference driver: block by block, every linear layer of a block calibrated at once --------------------------
def run(model, calib, cfg):
    import torch
    import torch.nn as nn

    layers = model.model.layers
    threads = torch.get_num_threads()
    cache = []

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            cache.append((args, kwargs))
            raise ValueError

    layers[0] = Catcher(layers[0])
    for b in calib:
        try:
            model(input_ids=b, use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    for layer in layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        H = {n: torch.zeros(m.in_features, m.in_features) for n, m in linears.items()}
        count = {n: 0 for n in linears}

        def hook(name):
            def add(module, inp, out):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
                t = x.shape[0]
                H[name] *= count[name] / (count[name] + t)
                count[name] += t
                x = (2 / count[name]) ** 0.5 * x
                H[name] += x.t() @ x
            return add

        handles = [m.register_forward_hook(hook(n)) for n, m in linears.items()]
        for args, kwargs in cache:
            layer(*args, **kwargs)
        for h in handles:
            h.remove()
        torch.set_num_threads(1)  # thousands of tiny column ops: one thread avoids a barrier per op
        for n, m in linears.items():
            if cfg["kind"] == "gptq":
                m.weight.data = gptq(m.weight.data, H[n], cfg["bits"], cfg["group"], cfg["sym"])
            else:
                m.weight.data = sparsegpt(m.weight.data, H[n], cfg["sparsity"], cfg["n"], cfg["m"])
        torch.set_num_threads(threads)
        outs = []
        for args, kwargs in cache:
            out = layer(*args, **kwargs)
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(((out,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": out}))
        cache[:] = outs


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated configs (default: all)")
    ap.add_argument("--json", help="append one JSON line per result here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import copy

    import torch

    from gptopt_core import make_context, perplexity

    ctx = make_context(model="smollm2-135m", device="cpu")
    base = ctx.model
    dense = perplexity(base, ctx.data.valid_ids, max_tokens=4096)["perplexity"]
    print(f"dense perplexity {dense:.3f}", flush=True)
    calib = [torch.cat(ctx.calibration_blocks(64, 128)[i:i + 8]) for i in range(0, 64, 8)]
    names = args.only.split(",") if args.only else list(CONFIGS)
    for name in names:
        model = copy.deepcopy(base)
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            run(model, calib, CONFIGS[name])
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        ppl = perplexity(model, ctx.data.valid_ids, max_tokens=4096)["perplexity"]
        row = {"name": "textbook-" + name, "ppl": ppl, "ratio": ppl / dense, "seconds": round(seconds, 1),
               "cpu_seconds": round(cpu, 1)}
        print(f"{row['name']:32s} ppl {ppl:8.3f}  x{ppl / dense:.4f}  {seconds:6.0f}s", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
        del model


if __name__ == "__main__":
    main()
