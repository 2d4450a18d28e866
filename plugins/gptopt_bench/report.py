"""End of run: every model state ("point") side by side, the report.md section and ``tradeoff.png``."""
from __future__ import annotations

import math

#: steps that look at the model without changing it; any other step starts a new point
READ_ONLY_STEPS = frozenset({"eval", "bench", "save"})
BENCH_KEYS = ("decode_tokens_per_s", "decode_speedup", "prefill_ms", "prefill_ms_p90", "prefill_speedup", "ttft_ms",
              "peak_memory_bytes", "bench_cv", "bench_repeats", "dtypes", "device", "timer", "memory_method",
              "prompt_tokens", "new_tokens", "batch_size", "torch_threads", "device_name")


def _num(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def points(records: list) -> list[dict]:
    """Group the records into model states: a new point starts after every step that may change the model
    (anything but eval / bench / save). A point holds the last eval's perplexity, the last bench's figures
    and the model bytes / sparsity measured after its last step. Points with neither eval nor bench are
    left out; a failed step ends the list."""
    out, changes = [], []
    current = {"label": "loaded", "steps": []}
    for index, record in enumerate(records, 1):
        if record.get("status") != "ok":
            break
        metrics = record.get("metrics", {})
        if record.get("name") not in READ_ONLY_STEPS:
            changes.append(record.get("name", "?"))
            current = {"label": "+".join(changes), "steps": []}
            continue
        if not current["steps"]:
            out.append(current)
        current["steps"].append(index)
        for key in ("model_bytes", "sparsity"):
            if key in metrics:
                current[key] = metrics[key]
        if record["name"] == "eval" and _num(metrics.get("perplexity")):
            current["perplexity"] = metrics["perplexity"]
        if record["name"] == "bench":
            current.update({k: metrics[k] for k in BENCH_KEYS if k in metrics})
            current.setdefault("decode_speedup", None)
            current["bench_step"] = index
    return [p for p in out if "perplexity" in p or "bench_step" in p]


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return format(value / scale, spec) if _num(value) else ""


def table(pts: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["point", "steps", "ppl", "MB", "sparsity", "decode tok/s", "× decode", "prefill ms", "prefill p90",
              "TTFT ms", "peak MB", "CV"]
    rows = []
    for p in pts:
        speedup = p.get("decode_speedup")
        if "bench_step" in p and speedup is None and p is _baseline(pts, p):
            speedup = 1.0
        rows.append([p["label"], ",".join(map(str, p["steps"])), _fmt(p.get("perplexity"), ".3f"),
                     _fmt(p.get("model_bytes"), ".1f", 1e6), _fmt(p.get("sparsity"), ".1%"),
                     _fmt(p.get("decode_tokens_per_s"), ".1f"), _fmt(speedup, ".2f") + ("×" if _num(speedup) else ""),
                     _fmt(p.get("prefill_ms"), ".1f"), _fmt(p.get("prefill_ms_p90"), ".1f"),
                     _fmt(p.get("ttft_ms"), ".1f"), _fmt(p.get("peak_memory_bytes"), ".1f", 1e6),
                     _fmt(p.get("bench_cv"), ".1%")])
    return header, rows


def _baseline(pts, point):
    """The first benched point with the same workload as ``point`` (the one its speed-up is against)."""
    keys = ("prompt_tokens", "new_tokens", "batch_size", "device")
    for p in pts:
        if "bench_step" in p and all(p.get(k) == point.get(k) for k in keys):
            return p
    return None


def markdown(pts: list[dict], plot_name: str | None, note: str | None) -> str:
    header, rows = table(pts)
    benched = [p for p in pts if "bench_step" in p]
    first = benched[0] if benched else {}
    where = first.get("device", "?")
    if first.get("device_name"):
        where += f" ({first['device_name']})"
    if _num(first.get("torch_threads")):
        where += f", {first['torch_threads']} torch threads"
    lines = ["## Benchmark: each model state side by side", "",
             f"Device {where}; timer `{first.get('timer', '?')}`, memory `{first.get('memory_method', '?')}`; "
             f"workload {first.get('prompt_tokens')} prompt tokens + {first.get('new_tokens')} new tokens, "
             f"batch {first.get('batch_size')}. Medians over the timed runs; CV is the coefficient of variation "
             "of decode tokens/s; × decode is the speed-up over the first bench of the same workload. On CPU "
             "peak MB is the growth of the process's peak RSS while benchmarking (model bytes are the MB column); "
             "on CUDA it is `max_memory_allocated`.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    dtype_lines = [f"- {p['label']}: " + ", ".join(f"{k} {v:,}" for k, v in p["dtypes"].items())
                   for p in benched if isinstance(p.get("dtypes"), dict)]
    if dtype_lines:
        lines += ["", "Parameter elements by storage dtype:", *dtype_lines]
    if plot_name:
        lines += ["", f"![trade-off: model size and decode speed against perplexity]({plot_name})"]
    if note:
        lines += ["", note]
    return "\n".join(lines)


def plot(pts: list[dict], path) -> bool:
    """Write the trade-off plot (model MB vs perplexity, decode tokens/s vs perplexity); False when no point
    has a perplexity."""
    with_ppl = [p for p in pts if _num(p.get("perplexity"))]
    if not with_ppl:
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    speed = [p for p in with_ppl if _num(p.get("decode_tokens_per_s"))]
    panels = [("model_bytes", "model size (MB)", 1e6, [p for p in with_ppl if _num(p.get("model_bytes"))])]
    if speed:
        panels.append(("decode_tokens_per_s", "decode tokens/s", 1.0, speed))
    fig = Figure(figsize=(5.2 * len(panels), 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    for i, (key, label, scale, pts_k) in enumerate(panels, 1):
        ax = fig.add_subplot(1, len(panels), i)
        xs = [p["perplexity"] for p in pts_k]
        ys = [p[key] / scale for p in pts_k]
        ax.plot(xs, ys, color="0.7", linewidth=1, zorder=1)
        ax.scatter(xs, ys, zorder=2)
        for p, x, y in zip(pts_k, xs, ys):
            ax.annotate(p["label"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("perplexity (lower is better)")
        ax.set_ylabel(label + (" (higher is better)" if key == "decode_tokens_per_s" else " (lower is better)"))
        ax.grid(True, alpha=0.3)
    fig.suptitle("gptopt trade-off")
    fig.savefig(str(path), dpi=110)
    return True


#: columns left out of the console table so it fits 80 columns
CONSOLE_SKIP = ("steps", "prefill p90", "CV")


def print_table(ctx, pts) -> None:
    if ctx.quiet or ctx.console is None or not ctx.is_main_process:
        return
    from rich.table import Table

    header, rows = table(pts)
    keep = [i for i, h in enumerate(header) if h not in CONSOLE_SKIP]  # the full table is in report.md
    t = Table(title="gptopt bench: model states side by side", title_justify="left")
    for i in keep:
        t.add_column(header[i], justify="left" if header[i] == "point" else "right")
    for row in rows:
        t.add_row(*(row[i] for i in keep))
    ctx.console.print(t)


def finish(ctx, records, out_dir) -> list[str]:
    pts = points(records)
    if not pts:
        return []
    plot_name, note = None, None
    if out_dir is not None and getattr(ctx, "is_main_process", True):
        from pathlib import Path

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if plot(pts, out_dir / "tradeoff.png"):
            plot_name = "tradeoff.png"
        else:
            note = "No trade-off plot: no point has a perplexity (put `eval` next to each `bench`)."
    if all(r.get("status") == "ok" for r in records):
        print_table(ctx, pts)
    return [markdown(pts, plot_name, note)]
