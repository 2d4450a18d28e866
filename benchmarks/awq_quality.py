"""SmolLM2-135M, int4 groups of 32 symmetric (the q4_0 grid): round-to-nearest with and without ``--awq`` (and,
with ``--methods``, gptq / signround with and without it), measured in torch ``eval`` against the unquantized model
(KL divergence, same top token, perplexity ratio, paired bootstrap 95 % intervals over 512-token windows) on the
held-out split of ``builtin:stdlib-docs``; calibration text is builtin:pydoc's train split:

    python benchmarks/awq_quality.py [--variants rtn rtn+awq] [--tokens 16384] [--out DIR]

The base log-probs come from the KL cache when an earlier run (``benchmarks/kl_quality.py``) stored them for the
same tokens. Prints one JSON line per variant, then one comparing each ``+awq`` variant with its plain one on the same
windows (perplexity ratio and mean-KL difference with paired intervals); appends them to ``DIR/awq_quality.jsonl``.
"""
import argparse
import json
import time
from pathlib import Path

VARIANTS = {
    "rtn": {"method": "rtn"}, "rtn+awq": {"method": "rtn", "awq": True},
    "gptq": {"method": "gptq"}, "gptq+awq": {"method": "gptq", "awq": True},
    "gptq-noact": {"method": "gptq", "act_order": False}, "gptq-noact+awq": {"method": "gptq", "act_order": False,
                                                                            "awq": True},
}
KEYS = ("kl_mean", "kl_mean_ci95", "kl_median", "kl_p99", "kl_p999", "same_top1", "perplexity", "perplexity_base",
        "perplexity_ratio", "perplexity_ratio_ci95", "kl_tokens")


def one(variant: str, tokens: int) -> dict:
    from gptopt_core import Pipeline

    start = time.perf_counter()
    result = (Pipeline(model="smollm2-135m", data="builtin:pydoc", eval_data="builtin:stdlib-docs", quiet=True)
              .add("quantize", bits=4, group_size=32, symmetric=True, **VARIANTS[variant])
              .add("eval", split="eval-data", max_tokens=tokens)
              .run())
    q, ev = (result.records[i]["metrics"] for i in (0, 1))
    awq = q.get("awq") or {}
    return {"variant": variant, "quantize_seconds": q.get("quantize_seconds"),
            "quantize_cpu_seconds": q.get("quantize_cpu_seconds"),
            "awq": {k: awq[k] for k in ("seconds", "calib_tokens", "error_rtn", "error", "pairs_improved")
                    if k in awq},
            "awq_alpha": {k: v["alpha"] for k, v in (awq.get("pairs") or {}).items()},
            "eval": {k: ev.get(k) for k in KEYS}, "windows": ev.get("kl_windows"),
            "seconds": round(time.perf_counter() - start, 1)}


def compare(plain: dict, scaled: dict) -> dict:
    """``scaled`` over ``plain`` on the same windows: perplexity ratio and mean-KL difference, paired 95 % CIs."""
    from gptopt_core import paired_bootstrap, ppl_ratio

    a, b = scaled["windows"], plain["windows"]
    assert a["tokens"] == b["tokens"], "the two runs scored different windows"
    ratio = ppl_ratio(a["nll"], b["nll"], a["tokens"])

    def kl_diff(ka, kb, t):
        return (ka.sum(-1) - kb.sum(-1)) / t.sum(-1)

    diff = (sum(a["kl"]) - sum(b["kl"])) / sum(a["tokens"])
    lo, hi = paired_bootstrap(kl_diff, a["kl"], b["kl"], a["tokens"])
    return {"compare": f"{scaled['variant']} vs {plain['variant']}", "perplexity_ratio": ratio[0],
            "perplexity_ratio_ci95": list(ratio[1:]), "kl_mean_difference": diff, "kl_mean_difference_ci95": [lo, hi],
            "tokens": sum(a["tokens"]), "windows": len(a["tokens"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["rtn", "rtn+awq"], choices=list(VARIANTS))
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--out", default="out/awq_quality")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    rows = {}
    for variant in args.variants:
        row = one(variant, args.tokens)
        row["torch_version"] = torch.__version__
        rows[variant] = row
        emit(out, {k: v for k, v in row.items() if k != "windows"})
    for variant, row in rows.items():
        plain = rows.get(variant.replace("+awq", ""))
        if variant.endswith("+awq") and plain is not None:
            emit(out, compare(plain, row))


def emit(out: Path, row: dict) -> None:
    print(json.dumps(row), flush=True)
    with open(out / "awq_quality.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
