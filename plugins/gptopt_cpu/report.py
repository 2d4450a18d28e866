"""cpu-fast ``auto``'s table: as Markdown for report.md (the plugin's ``gptopt_run_finished``) and as text lines
for the console."""
from __future__ import annotations


def table_markdown(table: list[dict], budget: float, split: str) -> str:
    lines = [f"cpu-fast auto (ppl on the {split} split; budget ppl x{1 + budget:.3f}; decode speed interleaved, "
             "medians)", "",
             "| format | kept float layers | ppl | ppl ratio | decode tok/s | speedup | prefill ms | MB | within | chosen |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in table:
        name = r["format"] + (" (compiled)" if r.get("compiled") else "")
        lines.append(f"| {name} | {r['kept_layers']} | {r['perplexity']:.3f} | x{r['ppl_ratio']:.3f} | "
                     f"{r['decode_tokens_per_s']:.1f} | x{r['decode_speedup']:.2f} | {r['prefill_ms']:.0f} | "
                     f"{r['model_bytes'] / 1e6:.1f} | {'yes' if r['within_budget'] else 'no'} | "
                     f"{'**yes**' if r['chosen'] else ''} |")
    return "\n".join(lines)


def table_lines(table: list[dict]) -> list[str]:
    """The auto table as fixed-width text lines (fits 100 columns; no markup)."""
    head = f"{'format (+c: compiled)':<21} {'kept':>4} {'ppl':>9} {'ratio':>7} {'tok/s':>7} {'speedup':>7} " \
           f"{'prefill':>8} {'MB':>7}  within"
    lines = [head]
    for r in table:
        name = r["format"] + ("+c" if r.get("compiled") else "")
        lines.append(f"{name:<21} {r['kept_layers']:>4} {r['perplexity']:>9.3f} {r['ppl_ratio']:>6.3f}x "
                     f"{r['decode_tokens_per_s']:>7.1f} {r['decode_speedup']:>6.2f}x {r['prefill_ms']:>6.0f}ms "
                     f"{r['model_bytes'] / 1e6:>7.1f}  {'yes' if r['within_budget'] else 'no '}"
                     + ("  <- chosen" if r["chosen"] else ""))
    return lines


def report_sections(records: list) -> list[str] | None:
    """One report.md section per ``cpu-fast auto`` record that measured a table."""
    sections = []
    for index, record in enumerate(records, 1):
        table = record.get("metrics", {}).get("auto_table") if record.get("name") == "cpu-fast" else None
        if table:
            params = record.get("params", {})
            sections.append(f"## step {index}: " + table_markdown(table, params.get("max_ppl_increase", 0.1),
                                                                   params.get("select_on", "valid")))
    return sections or None
