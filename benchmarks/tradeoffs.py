"""Take SmolLM2-135M through the standard chains (recipes/*.yaml) and write docs/results.md + docs/tradeoffs.png.

    python benchmarks/tradeoffs.py            # full: the recipes as committed
    python benchmarks/tradeoffs.py --quick    # shorter eval/bench/training (same chains): docs/results-quick.md
    python benchmarks/tradeoffs.py --only 03-nf4 --only 08-wanda-50   # re-measure rows; the others are read
                                                                      # back from runs/tradeoffs/<row>.row.json,
                                                                      # else carried over from docs/results.md
    python benchmarks/tradeoffs.py --table-only   # rebuild the table and plot from those, measuring nothing

Each row is one `gptopt run --recipe recipes/<row>.yaml` in its own process (exactly the command shown in the
table); figures are read back from that run's run.json. The ppl ratio is against the dense fp32 row, measured
by the same `eval` on the same held-out tokens. Each row says when and at which commit it was measured ("alone":
re-measured by itself with ``--only``), and keeps saying so when it is carried over into a later table.
"""
import argparse
import json
import platform
import re
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICK = {"eval": {"max_tokens": 2048}, "bench": {"repeats": 3, "max_repeats": 5, "new_tokens": 32},
         "lora": {"steps": 10}, "finetune": {"steps": 10}, "quantize": {"calib_blocks": 2}}
PRODUCE_SKIP = {"eval", "bench", "save", "llamacpp"}


def quick_recipe(recipe: dict) -> dict:
    steps = []
    for item in recipe["steps"]:
        (name, params), = item.items()
        params = dict(params or {})
        for key, value in QUICK.get(name, {}).items():
            if key == "steps" and "steps" in params:
                params[key] = min(params[key], value)
            elif key == "calib_blocks" and params.get("plan") != "auto":
                continue
            else:
                params[key] = value
        steps.append({name: params})
    return {**recipe, "steps": steps}


def run_row(recipe_path: Path, out: Path, quick: bool) -> dict:
    recipe = yaml.safe_load(recipe_path.read_text())
    if quick:
        recipe = quick_recipe(recipe)
    tmp = out / f"{recipe_path.stem}.yaml"
    tmp.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = out / recipe_path.stem
    exe = Path(sys.executable).with_name("gptopt")
    start = time.perf_counter()
    proc = subprocess.run([str(exe), "run", "--recipe", str(tmp), "--out", str(run_dir), "--quiet"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"row": recipe_path.stem, "error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall": wall}
    manifest = json.loads((run_dir / "run.json").read_text())
    steps = manifest["steps"]
    last = {s["name"]: s["metrics"] for s in steps}
    return {
        "row": recipe_path.stem,
        "ppl": last["eval"]["perplexity"],
        "bytes": last["eval"]["model_bytes"],
        "sparsity": last["eval"]["sparsity"],
        "decode": last.get("bench", {}).get("decode_tokens_per_s"),
        "prefill": last.get("bench", {}).get("prefill_ms"),
        "peak": last.get("bench", {}).get("peak_memory_bytes"),
        "produce_s": sum(s["seconds"] for s in steps if s["name"] not in PRODUCE_SKIP),
        "wall": wall,
        "chain": " → ".join(list(s)[0] for s in recipe["steps"]),
        # rows that export a GGUF and measure it in llama.cpp (docs/export.md)
        "gguf_bytes": last.get("llamacpp", {}).get("gguf_bytes"),
        "llamacpp_ppl": last.get("llamacpp", {}).get("llamacpp_perplexity"),
        "llamacpp_decode": last.get("llamacpp", {}).get("llamacpp_decode_tokens_per_s"),
    }


def table_rows(path: Path) -> dict:
    """``{row: row dict}`` read back from an earlier docs/results.md table (its figures as rounded there, and when
    each was measured), so that ``--only`` on a fresh checkout (no runs/tradeoffs/*.row.json) keeps the rows it
    does not re-measure."""
    if not path.exists():
        return {}
    text = path.read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not re.match(r"\d\d-", cells[0]) or len(cells) < 11 or cells[1].startswith("failed"):
            continue
        num = lambda v, scale=1.0: None if v in ("–", "-", "") else float(v.rstrip("%")) * scale  # noqa: E731
        extra = cells[10:13] if len(cells) >= 14 else ["–"] * 3
        measured = cells[13] if len(cells) >= 15 else "?"  # tables before the column did not say
        rows[cells[0]] = {
            "row": cells[0], "chain": cells[1], "ppl": float(cells[2]), "bytes": num(cells[4], 1e6),
            "sparsity": num(cells[5], 0.01), "decode": num(cells[6]), "prefill": num(cells[7]),
            "peak": num(cells[8], 1e6), "produce_s": num(cells[9]), "gguf_bytes": num(extra[0], 1e6),
            "llamacpp_ppl": num(extra[1]), "llamacpp_decode": num(extra[2]), "wall": None,
            "measured": measured, "carried": True}
    return rows


def fmt(v, spec, scale=1.0):
    return "–" if v is None else format(v / scale, spec)


def write_results(rows, quick: bool, commit: str, seconds: float):
    dense = next((r for r in rows if r["row"].endswith("dense-fp32") and "ppl" in r), None)
    fresh = [r for r in rows if r.get("fresh")]
    carried = [r["row"] for r in rows if r.get("carried")]
    note = (" Rows not measured by this invocation are read back from their earlier runs (runs/tradeoffs/*.row.json)"
            + (f" or carried over, as rounded there, from the committed table ({', '.join(carried)})" if carried
               else "") + "; the minutes are those of the rows measured now." if len(fresh) < len(rows) else "")
    seconds = sum(r["wall"] or 0 for r in fresh) if fresh else seconds
    sparsity = lambda v: "–" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [f"# Trade-offs on SmolLM2-135M ({'quick' if quick else 'full'} run)", "",
             f"Table written {date.today().isoformat()} on {platform.machine()} Linux, "
             f"{__import__('os').cpu_count()} CPU cores, no GPU, commit `{commit}`, by "
             f"`python benchmarks/tradeoffs.py{' --quick' if quick else ''}` "
             f"({f'{seconds / 60:.1f} min' if fresh else '--table-only: nothing measured'}); each row's "
             "`measured` column says when and at which commit it ran (\"alone\": re-measured by itself with "
             f"`--only`).{note} "
             "Held-out ppl on pydoc validation documents; ratio vs the dense fp32 row; bytes = parameters + "
             "buffers in memory; decode/prefill/peak from `bench` (CPU: perf_counter, peak RSS growth).", "",
             "llama.cpp columns: the GGUF file the row exports (MB on disk), its held-out ppl and decode tokens/s "
             "in llama.cpp (`llamacpp` step, same tokens and workload).", "",
             "| row | chain | ppl | ratio | MB | sparsity | decode tok/s | prefill ms | peak MB | produce s | "
             "GGUF MB | llama.cpp ppl | llama.cpp decode tok/s | measured | command |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cmd = f"`gptopt run --recipe recipes/{r['row']}.yaml`"
        if "error" in r:
            lines.append(f"| {r['row']} | failed: {r['error']} | | | | | | | | | | | | {r.get('measured', '')} "
                         f"| {cmd} |")
            continue
        ratio = r["ppl"] / dense["ppl"] if dense else None
        lines.append(f"| {r['row']} | {r['chain']} | {r['ppl']:.2f} | {fmt(ratio, '.3f')} | "
                     f"{fmt(r['bytes'], '.1f', 1e6)} | {sparsity(r['sparsity'])} | {fmt(r['decode'], '.1f')} | "
                     f"{fmt(r['prefill'], '.0f')} | {fmt(r['peak'], '.0f', 1e6)} | {fmt(r['produce_s'], '.0f')} | "
                     f"{fmt(r.get('gguf_bytes'), '.1f', 1e6)} | {fmt(r.get('llamacpp_ppl'), '.2f')} | "
                     f"{fmt(r.get('llamacpp_decode'), '.1f')} | {r.get('measured', '?')} | {cmd} |")
    suffix = "-quick" if quick else ""  # the quick run never overwrites the full run's figures
    (ROOT / "docs" / f"results{suffix}.md").write_text("\n".join(lines) + f"\n\n![trade-offs](tradeoffs{suffix}.png)\n")
    plot(rows, dense, ROOT / "docs" / f"tradeoffs{suffix}.png")


def plot(rows, dense, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "ppl" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "bytes", "model MB"), (axes[1], "decode", "decode tokens/s")):
        for r in ok:
            if r[key] is None:
                continue
            x = r[key] / 1e6 if key == "bytes" else r[key]
            ax.scatter(x, r["ppl"])
            ax.annotate(r["row"], (x, r["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("held-out perplexity (log)")
        ax.set_yscale("log")
        if dense:
            ax.axhline(dense["ppl"], color="grey", lw=0.8, ls="--")
    fig.suptitle("SmolLM2-135M: size and speed vs perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", action="append", default=[])
    ap.add_argument("--out", default="runs/tradeoffs")
    ap.add_argument("--table-only", action="store_true", help="measure nothing: rebuild the table and plot")
    args = ap.parse_args()
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    if args.only or args.table_only:
        recipes = [r for r in recipes if r.stem in args.only or (r.stem.endswith("dense-fp32") and not args.table_only)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    start = time.perf_counter()
    rows = []
    earlier = table_rows(ROOT / "docs" / f"results{'-quick' if args.quick else ''}.md") if (
        args.only or args.table_only) else {}
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        saved = out / f"{recipe.stem}.row.json"
        if recipe not in recipes:
            if saved.exists():  # a row of an earlier invocation, kept in the table
                row = json.loads(saved.read_text())
                if "measured" not in row:  # written before rows said so: the committed table knows, for its commit
                    known = earlier.get(recipe.stem, {}).get("measured", "")
                    row["measured"] = known if f"`{row.get('commit')}`" in known else f"? `{row.get('commit', '?')}`"
                rows.append(row)
            elif recipe.stem in earlier:  # only in the committed table (fresh checkout)
                rows.append(earlier[recipe.stem])
            continue
        for old in (out / recipe.stem).glob("*"):
            old.unlink()
        if (out / recipe.stem).exists():
            (out / recipe.stem).rmdir()
        row = run_row(recipe, out, args.quick)
        row.update(commit=commit, measured=f"{date.today().isoformat()} `{commit}`" + (", alone" if args.only else ""))
        saved.write_text(json.dumps(row))
        rows.append({**row, "fresh": True})
        print(json.dumps(row), flush=True)
    write_results(rows, args.quick, commit, time.perf_counter() - start)
    print(f"wrote docs/results{'-quick' if args.quick else ''}.md and the plot in {(time.perf_counter() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
