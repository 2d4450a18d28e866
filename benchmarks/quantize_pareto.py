"""Planned partial quantization on SmolLM2-135M: the plan auto picks, and the Pareto curve it picks from.

    HF_HUB_OFFLINE=1 python benchmarks/quantize_pareto.py [--budget 5%] [--points 0,30,60,90,106,130,170,211]

1. One `eval -> quantize --plan auto --embeddings 8 -> eval` run: the planner measures every layer's 4-bit
   sensitivity, orders the layers (most sensitive per byte first) and picks k, the number of layers in int8.
2. For each k in --points, plan(k) (the first k layers of that order in int8, the rest nf4, embeddings and the
   tied head int8) replays through `quantize --plan MAPPING` (no measuring) and `eval` scores it on held-out text.
Held-out ppl and bytes are ratios against the dense model of the same run. The plain int8 / nf4 / fp4 / full
nf4 points come from docs/quantize_results.json (benchmarks/quantize_smollm2.py, same `eval`).
Writes docs/quantize_pareto.json, docs/quantize_pareto.png and the table in docs/quantize.md (PARETO markers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from docblock import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quantize.md"


def chain(model: str, plan_params: dict):
    from gptopt_core import Pipeline

    res = (Pipeline(model=model, data="builtin:pydoc", device="cpu", quiet=True)
           .add("eval").add("quantize", **plan_params).add("eval").run())
    dense, q, after = (r["metrics"] for r in res.records)
    return res, {"ppl": after["perplexity"], "ppl_ratio": after["perplexity"] / dense["perplexity"],
                 "bytes": after["model_bytes"], "bytes_ratio": after["model_bytes"] / dense["model_bytes"],
                 "dense_ppl": dense["perplexity"], "quantize_s": res.records[1]["seconds"]}


def plot(points, auto, plain, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    xs = [p["bytes_ratio"] for p in points]
    ys = [p["ppl_ratio"] for p in points]
    ax.plot(xs, ys, "o-", label="plan(k): k most sensitive layers int8, rest nf4")
    for p in points:
        ax.annotate(f"k={p['k']}", (p["bytes_ratio"], p["ppl_ratio"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.scatter([auto["bytes_ratio"]], [auto["ppl_ratio"]], marker="*", s=160, color="C3", zorder=3,
               label=f"plan auto (k={auto['k']})")
    for label, row in plain.items():
        ax.scatter([row["bytes_ratio"]], [row["ppl_ratio"]], marker="s", color="grey")
        ax.annotate(label, (row["bytes_ratio"], row["ppl_ratio"]), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    ax.axvline(0.20, color="C2", lw=0.8, ls="--")
    ax.axhline(1.05, color="C2", lw=0.8, ls="--", label="target: ppl x1.05 at 0.20x bytes")
    ax.set_xlabel("bytes / dense fp32")
    ax.set_ylabel("held-out perplexity / dense (log)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("SmolLM2-135M: planned partial quantization vs plain bitsandbytes")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plain_points() -> dict:
    rows = json.loads((ROOT / "docs" / "quantize_results.json").read_text())["rows"]
    names = {"int8": "int8", "nf4": "nf4 (emb fp32)", "fp4": "fp4 (emb fp32)",
             "nf4 + int8 embeddings/head (full)": "nf4 + int8 emb (full)"}
    return {short: rows[k] for k, short in names.items() if k in rows}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--budget", default="5%")
    ap.add_argument("--points", default="0,30,60,90,106,130,170,211")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--no-doc", action="store_true", help="print only; write nothing under docs/")
    ap.add_argument("--plot-only", action="store_true", help="redraw docs/quantize_pareto.png from its JSON")
    args = ap.parse_args()
    started = time.time()
    if args.plot_only:
        saved = json.loads((ROOT / "docs" / "quantize_pareto.json").read_text())
        plot(saved["points"], saved["auto"], plain_points(), ROOT / "docs" / "quantize_pareto.png")
        return

    res, auto = chain(args.model, {"plan": "auto", "max_ppl_increase": args.budget, "embeddings": "8"})
    report = res.records[1]["metrics"]["plan"]
    chosen = res.records[1]["params"]["plan"]
    order = report["order"]
    auto.update(k=sum(chosen[u] == "int8" for u in order), calib_ppl_ratio=report["calib_ppl_ratio"],
                check_tokens=report["check_tokens"], budget=report["budget"])
    print("auto", json.dumps(auto), flush=True)

    points = []
    for k in sorted({min(int(x), len(order)) for x in args.points.split(",")}):
        mapping = {m: ("nf4" if m in order[k:] else p) for m, p in chosen.items()}
        mapping.update({u: "int8" for u in order[:k]})
        _, row = chain(args.model, {"plan": mapping})
        row["k"] = k
        points.append(row)
        print("point", json.dumps(row), flush=True)

    plain = plain_points()
    minutes = (time.time() - started) / 60
    out = {"command": "HF_HUB_OFFLINE=1 python benchmarks/quantize_pareto.py " + " ".join(sys.argv[1:]),
           "minutes": round(minutes, 1), "auto": auto, "points": points, "order": order, "auto_plan": chosen}
    if args.no_doc:
        return
    (ROOT / "docs" / "quantize_pareto.json").write_text(json.dumps(out, indent=1))
    plot(points, auto, plain, ROOT / "docs" / "quantize_pareto.png")
    lines = ["<!-- PARETO -->",
             f"Measured with `{out['command'].strip()}` ({minutes:.0f} min, 2-core CPU; figures in "
             "`docs/quantize_pareto.json`). Dense held-out ppl "
             f"{auto['dense_ppl']:.3f}; embeddings and tied head int8 in every row.", "",
             "| plan | layers int8 / nf4 | held-out ppl | ppl ratio | bytes ratio | within x1.05 at <= 0.20x |",
             "|---|---|---|---|---|---|"]
    rows = [(f"**auto, budget +{auto['budget']:.0%}** (check ratio x{auto['calib_ppl_ratio']:.4f} on "
             f"{auto['check_tokens']} train tokens)", auto)] + [(f"plan(k={p['k']})", p) for p in points]
    for label, r in rows:
        ok = r["ppl_ratio"] <= 1.05 and r["bytes_ratio"] <= 0.20
        lines.append(f"| {label} | {r['k']} / {len(order) - r['k']} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{r['bytes_ratio']:.4f} | {'yes' if ok else 'no'} |")
    lines += ["", "![pareto](quantize_pareto.png)", "<!-- /PARETO -->"]
    block = "\n".join(lines)
    write_block(DOC, "<!-- PARETO -->", "<!-- /PARETO -->", block)


if __name__ == "__main__":
    main()
