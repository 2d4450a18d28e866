"""run.json manifest, report.md and the end-of-run summary table (writing a model out is
:mod:`gptopt_core.saveformats`' job: it asks this module for the run.json it puts beside the model)."""
from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from .kit.outfiles import write_file

#: metric key → (column title, formatter); the summary shows the ones any record has
COLUMNS = {
    "perplexity": ("ppl", lambda v: f"{v:.3f}"),
    "kl_mean": ("KL", lambda v: f"{v:.5f}"),
    "same_top1": ("same top %", lambda v: f"{v:.2f}"),
    "model_bytes": ("MB", lambda v: f"{v / 1e6:.1f}"),
    "sparsity": ("sparsity", lambda v: f"{v:.1%}"),
    "decode_tokens_per_s": ("decode tok/s", lambda v: f"{v:.1f}"),
    "prefill_ms": ("prefill ms", lambda v: f"{v:.1f}"),
    "peak_memory_bytes": ("peak MB", lambda v: f"{v / 1e6:.1f}"),
}


#: the distributions whose versions move results (constraints.txt pins them); run.json records each one
RECORDED_VERSIONS = ("gptopt", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "torchao",
                     "llama-cpp-python", "compressed-tensors", "safetensors", "gguf", "numpy", "tokenizers")


def versions() -> dict:
    """``{distribution: installed version or None}`` for :data:`RECORDED_VERSIONS`, and Python's."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in RECORDED_VERSIONS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def cpu_kernels() -> dict:
    """The CPU kernels torch runs here: ``{"machine", "torch_capability", "threads"}``. torch picks its vectorized
    CPU kernels by the CPU at run time, and they round differently: the same install gave SmolLM2's int8 (LLM.int8)
    x1.0197 with its AVX2 kernels and x1.0254 with its AVX512 ones (issue 38), so a figure names the set it ran."""
    import sys

    torch = sys.modules.get("torch")  # a run that never imported torch (--help, a refusal) does not import it here
    if torch is None:
        return {"machine": platform.machine(), "torch_capability": None, "threads": None}
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    return {"machine": platform.machine(), "torch_capability": capability, "threads": torch.get_num_threads()}


def build_manifest(ctx, error=None) -> dict:
    manifest = {"gptopt": versions()["gptopt"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": versions(), "cpu": cpu_kernels(), "seed": ctx.seed}
    manifest.update(ctx.manifest)
    manifest["recipe"] = ctx.recipe
    manifest["steps"] = ctx.records
    manifest["status"] = "ok" if error is None else ("interrupted" if isinstance(error, KeyboardInterrupt) else "failed")
    if error is not None:
        manifest["error"] = str(error) or type(error).__name__
    return manifest


def columns(ctx=None) -> dict:
    """Metric key → (title, formatter): the core's columns, then the ones plugins register
    (``gptopt_register_columns``), then every column a step of this run declares (``Step.columns``: metric key →
    (title, format spec), e.g. ``{"l1_sparsity_target": ("l1 target", ".0%")}``)."""
    out = dict(COLUMNS)
    plugins = getattr(ctx, "plugins", None)
    for key, (_, title, spec) in (getattr(plugins, "columns", None) or {}).items():
        out.setdefault(key, (title, _formatter(spec)))
    for record in getattr(ctx, "records", None) or []:
        cls = plugins.steps.get(record.get("name")) if plugins is not None else None
        for key, (title, spec) in (getattr(cls, "columns", None) or {}).items():
            out.setdefault(key, (title, _formatter(spec)))
    return out


def _formatter(spec: str):
    return lambda v: format(v, spec)


def _shown(value) -> bool:
    """Values a column shows: numbers (not booleans) and text."""
    return isinstance(value, (int, float, str)) and not isinstance(value, bool)


def _cell(column, value) -> str:
    if isinstance(value, str):
        return value if len(value) <= 40 else value[:39] + "…"
    return column[1](value)


def step_line(i: int, n: int, record: dict, ctx=None) -> str:
    m = record.get("metrics", {})
    cols = columns(ctx)
    parts = [f"{cols[k][0]} {_cell(cols[k], m[k])}" for k in cols if _shown(m.get(k))]
    return f"[green]✓[/] [{i + 1}/{n}] [bold]{record['name']}[/] {record['seconds']:.1f}s  " + "  ".join(parts)


def summary_rows(ctx):
    records = [r for r in ctx.records if r.get("status") == "ok"]
    cols = columns(ctx)
    keys = [k for k in cols if any(_shown(r.get("metrics", {}).get(k)) for r in records)]
    header = ["#", "step", "seconds"] + [cols[k][0] for k in keys]
    rows = []
    for i, r in enumerate(ctx.records, 1):
        m = r.get("metrics", {})
        cells = [str(i), r["name"] + ("" if r.get("status") == "ok" else f" ({r.get('status')})"),
                 f"{r.get('seconds', 0):.1f}"]
        cells += [_cell(cols[k], m[k]) if _shown(m.get(k)) else "" for k in keys]
        rows.append(cells)
    return header, rows


def print_summary(ctx) -> None:
    """The end-of-run table, on stderr (the run's console; stdout stays free for a command's own output). Without a
    terminal (a log, a pipe) and without ``COLUMNS`` it is as wide as its columns need, never wrapped at 80."""
    if ctx.quiet or not ctx.is_main_process or ctx.console is None:
        return
    import os

    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    header, rows = summary_rows(ctx)
    table = Table(title=f"gptopt: {ctx.model_spec}", title_justify="left")
    for h in header:
        table.add_column(h, justify="left" if h == "step" else "right")
    for row in rows:
        table.add_row(*row)
    console = ctx.console
    if not console.is_terminal and not os.environ.get("COLUMNS", "").isdigit():  # rich's own default: 80
        wide = Measurement.get(console, console.options.update_width(10_000), table).maximum
        console = Console(file=console.file, width=max(console.width, wide))
    console.print(table)


def report_markdown(ctx, manifest, sections) -> str:
    header, rows = summary_rows(ctx)
    lines = [f"# gptopt run: {ctx.model_spec}", "",
             f"- status: {manifest['status']}" + (f" ({manifest.get('error')})" if manifest.get("error") else ""),
             f"- model: `{ctx.model_spec}` (hash {manifest.get('model', {}).get('hash', '?')[:12]})",
             f"- data: `{ctx.data_spec}`, seed {ctx.seed}, device {manifest.get('device')}",
             f"- created: {manifest['created']}, gptopt {manifest['gptopt']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Replay: `gptopt run --recipe run.json`", ""]
    for s in sections:
        lines += [s, ""]
    return "\n".join(lines)


def finish_run(ctx, error=None) -> dict:
    sections = []
    writes = ctx.out_dir is not None and ctx.is_main_process and bool(ctx.records)  # nothing ran: write nothing
    if writes:
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
    try:
        out_dir = ctx.out_dir if writes else None
        for part in ctx.hook.gptopt_run_finished(ctx=ctx, records=ctx.records, out_dir=out_dir):
            sections.extend(part or [])
    except Exception as exc:  # a reporting fault must not hide the run's own outcome
        sections.append(f"(a run_finished hook failed: {type(exc).__name__}: {exc})")
    manifest = build_manifest(ctx, error)
    if writes:
        write_json_atomic(ctx.out_dir / "run.json", manifest)
        write_file(ctx.out_dir / "report.md", report_markdown(ctx, manifest, sections))
    if error is None:
        print_summary(ctx)
    return manifest


def write_json_atomic(path: Path, data) -> None:
    """Through an exclusive temporary name, renamed into place: never through a link planted in ``--out``."""
    write_file(path, json.dumps(data, indent=2, default=str) + "\n")
