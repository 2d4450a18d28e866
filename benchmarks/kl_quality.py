"""SmolLM2-135M on q4_0 grids (int4, groups of 32, symmetric: written to GGUF q4_0 without re-rounding), measured
as quantizer authors measure: KL divergence from the unquantized model, same top token, perplexity ratio with paired
bootstrap 95 % intervals over 512-token windows, on >= 16k held-out tokens (builtin:stdlib-docs' held-out split),
in torch (``eval``) and in llama.cpp (``llamacpp``), one chain per method:

    python benchmarks/kl_quality.py [--methods rtn gptq signround] [--tokens 16384] [--out DIR]

Calibration (gptq, signround) uses builtin:pydoc's train split; the base logits are computed once (first chain) and
found in the cache by the others. Prints one JSON line per method and writes them to ``DIR/kl_quality.jsonl``.
"""
import argparse
import json
import time
from pathlib import Path

METHODS = {
    "rtn": {"method": "rtn"},
    "gptq": {"method": "gptq"},
    "signround": {"method": "signround", "iters": 20, "calib_blocks": 16, "calib_seq_len": 128},
}
KEYS = ("kl_mean", "kl_mean_ci95", "kl_median", "kl_p99", "kl_p999", "same_top1", "perplexity_base",
        "perplexity_ratio", "perplexity_ratio_ci95", "kl_tokens")


def one(method: str, tokens: int, out: Path, threads: int) -> dict:
    from gptopt_core import Pipeline

    gguf = out / f"smollm2-{method}-q4_0.gguf"
    start = time.perf_counter()
    result = (Pipeline(model="smollm2-135m", data="builtin:pydoc", eval_data="builtin:stdlib-docs", quiet=True)
              .add("quantize", bits=4, group_size=32, symmetric=True, **METHODS[method])
              .add("eval", split="eval-data", max_tokens=tokens)
              .add("export", to=str(gguf), type="q4_0", overwrite=True)
              .add("llamacpp", split="eval-data", max_tokens=tokens, bench=False, threads=threads)
              .run())
    q, torch_m, llama_m = (result.records[i]["metrics"] for i in (0, 1, 3))
    row = {"method": method, "quantize_seconds": q.get("quantize_seconds"), "gguf_bytes": llama_m["gguf_bytes"],
           "torch": {k: torch_m.get(k) for k in KEYS + ("perplexity",)},
           "llamacpp": {k: llama_m.get(k) for k in KEYS + ("llamacpp_perplexity",)},
           "quantize": {k: q.get(k) for k in ("iters", "lr", "calib_tokens", "block_loss_rtn", "block_loss")
                        if k in q},
           "seconds": round(time.perf_counter() - start, 1)}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="out/kl_quality")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import llama_cpp
    import torch

    for method in args.methods:
        row = one(method, args.tokens, out, args.threads)
        row.update(torch_version=torch.__version__, llama_cpp=llama_cpp.__version__)
        print(json.dumps(row), flush=True)
        with open(out / "kl_quality.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
