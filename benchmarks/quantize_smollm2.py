"""Quantize SmolLM2-135M with the `quantize` step: ppl and bytes ratios vs the dense fp32 model, plan auto,
save/reload, and the step's wall time vs transformers' load-time bitsandbytes quantization (interleaved).

    HF_HUB_OFFLINE=1 python benchmarks/quantize_smollm2.py [--skip-auto] [--json docs/quantize_results.json]

Prints every figure and writes them as JSON (docs/quantize.md quotes them)."""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

CONFIGS = [
    ("int8", {"bits": 8}),
    ("nf4", {"bits": 4}),
    ("fp4", {"bits": 4, "quant_type": "fp4"}),
    ("nf4 + int8 embeddings/head (full)", {"bits": 4, "embeddings": "8"}),
    ("nf4 + nf4 embeddings/head (full)", {"bits": 4, "embeddings": "4"}),
]


def run_chain(params, save_to=None):
    from gptopt_core import Pipeline

    pipe = Pipeline(model="smollm2-135m", device="cpu", quiet=True).add("eval").add("quantize", **params).add("eval")
    if save_to:
        pipe.add("save", to=save_to)
    res = pipe.run()
    dense, q, after = (r["metrics"] for r in res.records[:3])
    return {"params": res.records[1]["params"], "dense_ppl": dense["perplexity"], "ppl": after["perplexity"],
            "ppl_ratio": after["perplexity"] / dense["perplexity"], "dense_bytes": dense["model_bytes"],
            "bytes": after["model_bytes"], "bytes_ratio": after["model_bytes"] / dense["model_bytes"],
            "step_seconds": res.records[1]["seconds"], "plan": q.get("plan")}


def reload_ppl(path):
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.data import TextData
    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.metrics import model_bytes
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    data = TextData.load("builtin:pydoc", AutoTokenizer.from_pretrained(path))
    return perplexity(model, data.valid_ids)["perplexity"], model_bytes(model)


def timing(repeats=3):
    """Median wall seconds: transformers from_pretrained(quantization_config) vs fp32 load + quantize step."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gptopt_core.kit.models import smollm2_dir
    from gptopt_core.kit.testing import make_context
    from gptopt_quantize import QuantizeStep

    path = str(smollm2_dir())
    out = {}
    for label, cfg, params in (("int8", BitsAndBytesConfig(load_in_8bit=True), {"bits": 8}),
                               ("nf4", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_use_double_quant=True,
                                                          bnb_4bit_compute_dtype=torch.float32), {"bits": 4})):
        hf, step_s, load_s = [], [], []
        for _ in range(repeats):
            t = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32)
            hf.append(time.perf_counter() - t)
            del m
            t = time.perf_counter()
            ctx = make_context(model="smollm2-135m")
            load_s.append(time.perf_counter() - t)
            step = QuantizeStep(**params)
            ctx.records.append({"name": "quantize"})
            t = time.perf_counter()
            step.apply(ctx)
            step_s.append(time.perf_counter() - t)
            del ctx
        out[label] = {"transformers_load_quantized_s": statistics.median(hf),
                      "quantize_step_s": statistics.median(step_s),
                      "fp32_load_s": statistics.median(load_s),
                      "step_over_transformers": statistics.median(step_s) / statistics.median(hf),
                      "load_plus_step_over_transformers":
                          (statistics.median(step_s) + statistics.median(load_s)) / statistics.median(hf),
                      "repeats": repeats}
        print(label, json.dumps(out[label]), flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-auto", action="store_true")
    ap.add_argument("--only-auto", action="store_true")
    ap.add_argument("--calib-blocks", type=int, default=4)
    ap.add_argument("--calib-seq-len", type=int, default=256)
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--configs", nargs="*", help="only these row labels (default: all)")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--json", default="docs/quantize_results.json")
    args = ap.parse_args()
    try:
        results = json.load(open(args.json))
    except (OSError, ValueError):
        results = {}
    results.setdefault("rows", {})
    if not args.only_auto:
        if not args.skip_timing:
            results["timing"] = timing()
        for label, params in CONFIGS:
            if args.configs and label not in args.configs:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                row = run_chain(params, save_to=f"{tmp}/m")
                row["reload_ppl"], row["reload_bytes"] = reload_ppl(f"{tmp}/m")
                row["reload_ppl_ratio_vs_chain"] = row["reload_ppl"] / row["ppl"]
            row.pop("plan")
            results["rows"][label] = row
            print(label, json.dumps(row), flush=True)
            json.dump(results, open(args.json, "w"), indent=1)
    if not args.skip_auto:
        params = {"plan": "auto", "max_ppl_increase": args.budget, "embeddings": "4",
                  "calib_blocks": args.calib_blocks, "calib_seq_len": args.calib_seq_len}
        label = f"plan auto +{args.budget} (embeddings >= 4-bit)"
        with tempfile.TemporaryDirectory() as tmp:
            row = run_chain(params, save_to=f"{tmp}/m")
            row["reload_ppl"], row["reload_bytes"] = reload_ppl(f"{tmp}/m")
            row["reload_ppl_ratio_vs_chain"] = row["reload_ppl"] / row["ppl"]
        plan = row.pop("plan")
        row["params"] = {k: v for k, v in row["params"].items() if k != "plan"}
        row["plan_summary"] = {k: v for k, v in plan.items() if k != "modules"}
        counts = {}
        for info in plan["modules"].values():
            counts[info["precision"]] = counts.get(info["precision"], 0) + 1
        row["plan_counts"] = counts
        results["rows"][label] = row
        print(label, json.dumps(row), flush=True)
        json.dump(results, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
