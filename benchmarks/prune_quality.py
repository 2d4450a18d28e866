"""Prune benchmark on SmolLM2-135M: held-out perplexity ratio vs dense (same process, same eval), pruning
and pruning time for each method / pattern (peak memory: benchmarks/prune_cost.py).

    HF_HUB_OFFLINE=1 python benchmarks/prune_quality.py [--only NAME,NAME] [--no-write]

The model loads once; every configuration starts from the dense weights (restored from a copy), runs the real
``prune`` step on a RunContext, and is scored with gptopt's one perplexity function (the ``eval`` step's
defaults).
Results are printed and written between markers into docs/prune.md (with this command line).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "prune.md"
START, END = "<!-- prune-bench:start -->", "<!-- prune-bench:end -->"

# name → prune params; the "raw" rows use the raw scripts' calibration (16 × 128 tokens, dense inputs)
RAW = dict(calib_samples=16, calib_seq_len=128, sequential=False)
CONFIGS = {
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "wanda-50-raw": dict(method="wanda", sparsity=0.5, **RAW),
    "wanda-50-seq": dict(method="wanda", sparsity=0.5, calib_samples=16, calib_seq_len=128, sequential=True),
    "wanda-50-seq-64": dict(method="wanda", sparsity=0.5, calib_samples=64, calib_seq_len=128, sequential=True),
    "wanda-50-dense-64": dict(method="wanda", sparsity=0.5, calib_samples=64, calib_seq_len=128, sequential=False),
    "magnitude-30": dict(method="magnitude", sparsity=0.3),
    "wanda-30-raw": dict(method="wanda", sparsity=0.3, **RAW),
    "magnitude-2:4": dict(method="magnitude", pattern="2:4"),
    "wanda-2:4-raw": dict(method="wanda", pattern="2:4", **RAW),
    "magnitude-4:8": dict(method="magnitude", pattern="4:8"),
    "wanda-4:8-raw": dict(method="wanda", pattern="4:8", **RAW),
    "taylor-50-raw": dict(method="taylor", sparsity=0.5, calib_samples=16, calib_seq_len=128),
    "wanda-2:4-seq-64": dict(method="wanda", pattern="2:4", calib_samples=64, calib_seq_len=128, sequential=True),
    "wanda-2:4-dense-64": dict(method="wanda", pattern="2:4", calib_samples=64, calib_seq_len=128, sequential=False),
    "wanda-4:8-seq-64": dict(method="wanda", pattern="4:8", calib_samples=64, calib_seq_len=128, sequential=True),
    "wanda-4:8-dense-64": dict(method="wanda", pattern="4:8", calib_samples=64, calib_seq_len=128, sequential=False),
    "taylor-50-64": dict(method="taylor", sparsity=0.5, calib_samples=64, calib_seq_len=128),
    "magnitude-50-global": dict(method="magnitude", sparsity=0.5, scope="global"),
}
#: the raw one-shot scripts' ratios quoted in the issue (16×128 calibration tokens)
RAW_TARGETS = {"magnitude-50": 25.8, "wanda-50-raw": 1.92, "magnitude-30": 1.56, "wanda-30-raw": 1.11,
               "magnitude-2:4": 90.4, "wanda-2:4-raw": 5.64, "magnitude-4:8": 38.4, "wanda-4:8-raw": 3.20}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-write", action="store_true", help="do not update docs/prune.md")
    ap.add_argument("--json", help="also append one JSON line per result to this file")
    ap.add_argument("--resume", action="store_true",
                    help="with --json: keep the results already in that file (same script, same dense model) and "
                         "measure only the missing configs")
    ap.add_argument("--table-only", action="store_true",
                    help="with --json: write docs/prune.md from the results recorded there (no model, no measuring)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.table_only:
        rows = [json.loads(line) for line in Path(args.json).read_text().splitlines()]
        order = {n: i for i, n in enumerate(CONFIGS)}
        rows.sort(key=lambda r: order.get(r["name"], len(order)))
        print(table(rows, rows[0]["dense_ppl"]))
        if not args.no_write:
            write_doc(rows, rows[0]["dense_ppl"], " ".join(["python", "benchmarks/prune_quality.py"]
                                                          + (argv or sys.argv[1:])))
        return
    import torch

    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.testing import make_context
    from gptopt_prune import PruneStep

    names = args.only.split(",") if args.only else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")
    done = {}
    if args.resume and args.json and Path(args.json).exists():
        for line in Path(args.json).read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    ctx = make_context(model=args.model, device="cpu")
    model = ctx.model
    dense = {k: v.detach().clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    dense_ppl = perplexity(model, ctx.data.valid_ids)["perplexity"]
    eval_s = time.perf_counter() - t0
    print(f"dense perplexity {dense_ppl:.3f} ({eval_s:.0f}s per eval, {torch.get_num_threads()} threads)", flush=True)
    rows = []
    for name in names:
        if name in done:
            if abs(done[name]["dense_ppl"] - dense_ppl) > 1e-6:
                sys.exit(f"{args.json} was measured against dense perplexity {done[name]['dense_ppl']}, not {dense_ppl}")
            rows.append(done[name])
            print(f"{name:22s} (kept from {args.json}) ×{done[name]['ratio']:.3f}", flush=True)
            continue
        model.load_state_dict(dense)
        ctx.state.pop("masks", None)
        step = PruneStep(**CONFIGS[name])
        step.preflight(ctx)
        t0 = time.perf_counter()
        metrics = step.apply(ctx)
        seconds = time.perf_counter() - t0
        ppl = perplexity(model, ctx.data.valid_ids)["perplexity"]
        row = {"name": name, "params": step.params_dict(), "ppl": ppl, "ratio": ppl / dense_ppl,
               "seconds": seconds,
               "pruned_sparsity": metrics["pruned_sparsity"], "calib_tokens": metrics["calib_tokens"]}
        rows.append(row)
        target = RAW_TARGETS.get(name)
        vs = f"  raw script ×{target} (ours/raw {row['ratio'] / target:.3f})" if target else ""
        print(f"{name:22s} ppl {ppl:9.3f}  ×{row['ratio']:7.3f}  {seconds:6.1f}s"
              f"  sparsity {row['pruned_sparsity']:.4f}  calib {row['calib_tokens']}{vs}", flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps({**row, "dense_ppl": dense_ppl}) + "\n")
    if not args.no_write:
        write_doc(rows, dense_ppl, " ".join(["python", "benchmarks/prune_quality.py"] + (argv or sys.argv[1:])))


def table(rows, dense_ppl) -> str:
    lines = [f"dense held-out perplexity {dense_ppl:.3f} (eval defaults: 512-token blocks, 4096 tokens max)", "",
             "| config | method | pattern | calibration | ppl | ratio vs dense | raw script | prune s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["params"]
        calib = (f"{p['calib_samples']}×{p['calib_seq_len']}" + (" seq" if p["sequential"] and p["method"] == "wanda"
                                                                  else "")) if p["method"] != "magnitude" else "-"
        raw = f"×{RAW_TARGETS[r['name']]}" if r["name"] in RAW_TARGETS else ""
        pattern = p["pattern"] if p["pattern"] != "unstructured" else f"{p['sparsity']:.0%} {p['scope']}"
        lines.append(f"| {r['name']} | {p['method']} | {pattern} | {calib} | {r['ppl']:.3f} | ×{r['ratio']:.3f} | {raw} "
                     f"| {r['seconds']:.1f} |")
    return "\n".join(lines)


def write_doc(rows, dense_ppl, command):
    text = DOC.read_text() if DOC.exists() else f"# prune\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    block = (f"{START}\nWritten by `HF_HUB_OFFLINE=1 {command}` ({time.strftime('%Y-%m-%d')}, CPU; prune times "
             f"were taken on a 2-core machine shared with up to 8 other jobs and are indicative only, see the cost "
             f"table below):\n\n{table(rows, dense_ppl)}\n{END}")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    DOC.write_text(head + block + tail)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
