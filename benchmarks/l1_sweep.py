"""Does L1 regularization before a magnitude prune pay off? λ sweep on SmolLM2-135M, ratios vs dense.

Every point is one gptopt run (Python API, the same steps as the CLI)::

    eval  [l1 --weight λ ...]  finetune|lora --merge  eval  prune --method magnitude --sparsity 0.5  eval

plus the direct prune (``eval prune eval``). The ratio is held-out ppl after the prune / dense ppl of the same
run. Results accumulate in docs/l1_results.json (one key per configuration, so the sweep can be run in parts);
``--report`` rewrites the tables in docs/l1.md and the plot docs/l1_sweep.png from that file.

    python benchmarks/l1_sweep.py --point direct --point ft --point ft-l1:20      # runs these points
    python benchmarks/l1_sweep.py --report                                          # tables + plot only

Point names: ``direct``; ``ft`` (finetune, no l1); ``ft-l1:λ`` (prunable proximal); ``ft-all:λ`` (plain
uniform proximal L1); ``lora`` (lora --merge, no l1); ``lora-l1:λ`` (prunable penalty on W + scale·BA).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "l1_results.json"
DOC = ROOT / "docs" / "l1.md"
PLOT = ROOT / "docs" / "l1_sweep.png"

MODEL = "smollm2-135m"
SPARSITY = 0.5
# The anchors used 60 steps of 4×256 tokens; here plain finetune at that size took 15.1 CPU-minutes
# (process CPU time), the whole budget, so the sweep trains 45 steps of 4×256 (46,080 tokens) by default.
FT = dict(steps=45, lr=1e-4, batch_size=4, seq_len=256)
LORA = dict(steps=45, lr=5e-4, batch_size=4, seq_len=256, merge=True)
CONFIG = {"finetune": FT, "lora": LORA}


def set_steps(steps: int) -> None:
    FT["steps"] = LORA["steps"] = steps
L1_EXTRA = dict(mode="proximal", schedule="constant", reselect_every=10)


def run_point(point: str) -> dict:
    from gptopt_core import Pipeline

    kind, _, lam = point.partition(":")
    pipe = Pipeline(model=MODEL, data="builtin:pydoc", seed=0, device="cpu", quiet=True).add("eval")
    train = None
    if kind != "direct":
        if kind in ("ft-l1", "ft-all"):
            pipe.add("l1", weight=float(lam), select="prunable" if kind == "ft-l1" else "all", **L1_EXTRA)
        elif kind == "lora-l1":
            pipe.add("l1", weight=float(lam), select="prunable", mode="penalty")
        train = "lora" if kind.startswith("lora") else "finetune"
        pipe.add(train, **(LORA if train == "lora" else FT)).add("eval")
    pipe.add("prune", method="magnitude", sparsity=SPARSITY).add("eval")
    start = time.perf_counter()
    result = pipe.run()
    recs = {i: r for i, r in enumerate(result.records)}
    evals = [r["metrics"]["perplexity"] for r in result.records if r["name"] == "eval"]
    out = {"point": point, "dense": evals[0], "pruned": evals[-1], "ratio": evals[-1] / evals[0],
           "wall_s": round(time.perf_counter() - start, 1), "config": CONFIG, "load_avg": os.getloadavg()[0],
           "cpus": os.cpu_count()}
    if train:
        tr = next(r for r in recs.values() if r["name"] == train)["metrics"]
        out.update(trained=evals[1], train_seconds=tr["train_seconds"], train_tokens=tr["train_tokens"],
                   train_cpu_seconds=tr.get("train_cpu_seconds"),
                   train_tokens_per_s=tr["train_tokens_per_s"],
                   zeros_before_prune=tr.get("l1_zero_fraction"), small_before_prune=tr.get("l1_small_fraction"),
                   selected_zero=tr.get("l1_selected_zero_fraction"), l1_mode_used=tr.get("l1_mode_used"),
                   l1_history=tr.get("l1_history"))
    return out


def load() -> dict:
    """The saved points measured with this script's current training configuration (others are dropped)."""
    saved = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    current = json.loads(json.dumps(CONFIG))
    return {k: v for k, v in saved.items() if k == "direct" or v.get("config") == current}  # direct: no training


def report(results: dict) -> None:
    direct = results.get("direct")
    rows = ["| point | λ | dense ppl | after training | after prune 50% | ratio vs dense | zeros before prune "
            "| train wall s (tok/s) | train CPU-min |", "|---|---|---|---|---|---|---|---|---|"]

    def key(item):
        k = item[0]
        kind, _, lam = k.partition(":")
        return (kind, float(lam or 0))

    for point, r in sorted(results.items(), key=key):
        kind, _, lam = point.partition(":")
        z = r.get("zeros_before_prune")
        trained = f"{r['trained']:.2f}" if "trained" in r else "-"
        zs = "-" if z is None else f"{100 * z:.1f}%"
        ts = f"{r['train_seconds']:.0f} ({r['train_tokens_per_s']:.0f})" if "train_seconds" in r else "-"
        cpu = f"{r['train_cpu_seconds'] / 60:.1f}" if r.get("train_cpu_seconds") else "-"
        rows.append(f"| {kind} | {lam or '-'} | {r['dense']:.2f} | {trained} | {r['pruned']:.2f} | "
                    f"×{r['ratio']:.2f} | {zs} | {ts} | {cpu} |")
    lines = ["<!-- l1-sweep:start (generated by benchmarks/l1_sweep.py --report) -->", *rows, ""]
    if direct:
        for base in ("ft", "lora"):
            b = results.get(base)
            pts = {k: v for k, v in results.items() if k.startswith(base + "-l1:")}
            if not (b and pts):
                continue
            best_k, best = min(pts.items(), key=lambda kv: kv[1]["ratio"])
            lines.append(f"- **{base} + l1 (best: {best_k})**: ratio ×{best['ratio']:.2f} vs ×{direct['ratio']:.2f} "
                         f"for magnitude directly ({direct['ratio'] / best['ratio']:.1f}× lower; target ≥ 10×) and "
                         f"×{b['ratio']:.2f} for the same {'finetune' if base == 'ft' else 'lora'} without l1 "
                         f"({'lower' if best['ratio'] < b['ratio'] else 'NOT lower'}).")
    lines.append("<!-- l1-sweep:end -->")
    block = "\n".join(lines)
    text = DOC.read_text() if DOC.exists() else ""
    a, b_ = "<!-- l1-sweep:start", "<!-- l1-sweep:end -->"
    if a in text and b_ in text:
        text = text[:text.index(a)] + block + text[text.index(b_) + len(b_):]
    else:
        text += "\n" + block + "\n"
    DOC.write_text(text)
    print(block)
    plot(results)


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for kind, label, style in (("ft-l1", "finetune + l1 (prunable)", "o-"), ("ft-all", "finetune + l1 (all)", "s--"),
                               ("lora-l1", "lora + l1 (penalty, prunable)", "^-")):
        pts = sorted((float(k.split(":")[1]), v["ratio"]) for k, v in results.items() if k.startswith(kind + ":"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    for key_, label, color in (("direct", "magnitude directly", "red"), ("ft", "finetune, no l1", "gray"),
                               ("lora", "lora, no l1", "purple")):
        if key_ in results:
            ax.axhline(results[key_]["ratio"], color=color, ls=":", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("λ (l1 --weight)")
    ax.set_ylabel("ppl after magnitude 50% / dense ppl")
    ax.set_title("SmolLM2-135M: L1 before magnitude pruning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=110)
    print(f"wrote {PLOT}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--point", action="append", default=[], help="point to run (repeatable), see the docstring")
    ap.add_argument("--report", action="store_true", help="only rewrite docs/l1.md tables and the plot")
    ap.add_argument("--steps", type=int, default=45,
                    help="training steps of 4x256 tokens (points saved with another value are not reported)")
    args = ap.parse_args(argv)
    set_steps(args.steps)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = load()
    for point in args.point:
        print(f"running {point} ...", flush=True)
        r = run_point(point)
        results = load()  # another invocation may have added points meanwhile
        results[point] = r
        RESULTS.write_text(json.dumps(results, indent=1))
        print(json.dumps({k: v for k, v in r.items() if k != "l1_history"}), flush=True)
    if results:
        report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
