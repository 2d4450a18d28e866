"""One-shot compression on SmolLM2-135M, side by side in one run: round-to-nearest (RTN) vs GPTQ on the same integer
grids, bitsandbytes nf4, SparseGPT vs Wanda (50 % and 2:4); GPTQ's cost and its memory with and without
``--offload disk``.

    HF_HUB_OFFLINE=1 python benchmarks/oneshot_quality.py [--quick] [--only NAME,NAME] [--json FILE --resume]
                                                          [--memory] [--no-write]

The model loads once; every configuration starts from the dense weights, runs the real ``quantize`` / ``prune``
step on a RunContext, and is scored with gptopt's one perplexity function on the held-out pydoc tokens (the
``eval`` step's defaults: 512-token blocks, 4,096 tokens). Step times are wall seconds and the process's CPU
seconds (all threads; the machine is shared, so CPU seconds are the comparable cost).

``--memory`` runs GPTQ (int4 g64 symmetric, ``--memory-calib-blocks`` x 128 calibration tokens) in two fresh child
processes, without and with ``--offload disk``, sampling the resident set size (RSS) every 20 ms: the peak growth
over the process's RSS right before the step (model loaded, its weights made ordinary resident memory) is compared
with the dense model's parameter bytes, next to the engine's own count of parameter bytes resident. Both runs must
give the same perplexity (scored on 1,024 held-out tokens, enough to compare the two).

Results are printed, appended to ``--json`` (one line per row) and written between markers into docs/quantize.md
(quantization rows, cost, memory) and docs/prune.md (SparseGPT / Wanda rows).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QDOC, PDOC = ROOT / "docs" / "quantize.md", ROOT / "docs" / "prune.md"
QSTART, QEND = "<!-- oneshot-quantize:start -->", "<!-- oneshot-quantize:end -->"
PSTART, PEND = "<!-- oneshot-prune:start -->", "<!-- oneshot-prune:end -->"


def q(method, bits, group, symmetric=True, **kw):
    return ("quantize", dict(method=method, bits=bits, group_size=group, symmetric=symmetric, **kw))


CALIB = dict(calib_samples=64, calib_seq_len=128)
CONFIGS = {
    # 4-bit, group 64 (the issue's yardstick: 576 is not a multiple of 128)
    "rtn-int4-g64-sym": q("rtn", 4, 64),
    "gptq-int4-g64-sym": q("gptq", 4, 64, act_order=False),
    "gptq-int4-g64-sym-act": q("gptq", 4, 64, act_order=True),
    "rtn-int4-g64-asym": q("rtn", 4, 64, False),
    "gptq-int4-g64-asym": q("gptq", 4, 64, False, act_order=False),
    "gptq-int4-g64-asym-act": q("gptq", 4, 64, False, act_order=True),
    "bnb-nf4-b64": ("quantize", dict(bits=4, quant_type="nf4", block_size=64)),
    # sparsity: SparseGPT vs Wanda, same calibration (64 x 128 train tokens)
    "wanda-50": ("prune", dict(method="wanda", sparsity=0.5, **CALIB)),
    "sparsegpt-50": ("prune", dict(method="sparsegpt", sparsity=0.5, **CALIB)),
    "wanda-2:4": ("prune", dict(method="wanda", pattern="2:4", **CALIB)),
    "sparsegpt-2:4": ("prune", dict(method="sparsegpt", pattern="2:4", **CALIB)),
    # the other grids
    "rtn-int8-channel-sym": q("rtn", 8, "channel"),
    "gptq-int8-channel-sym": q("gptq", 8, "channel", act_order=False),
    "rtn-int4-g32-sym": q("rtn", 4, 32),
    "gptq-int4-g32-sym": q("gptq", 4, 32, act_order=False),
    "rtn-int4-g32-asym": q("rtn", 4, 32, False),
    "gptq-int4-g32-asym": q("gptq", 4, 32, False, act_order=False),
    "rtn-int4-channel-sym": q("rtn", 4, "channel"),
    "gptq-int4-channel-sym": q("gptq", 4, "channel", act_order=False),
    "gptq-int4-channel-sym-act": q("gptq", 4, "channel", act_order=True),
    # the mse observer: each group's range shrunk to where rounding error is lowest
    "rtn-int4-g64-sym-mse": q("rtn", 4, 64, observer="mse"),
    "gptq-int4-g64-sym-mse": q("gptq", 4, 64, observer="mse", act_order=False),
    "gptq-int4-g64-sym-act-mse": q("gptq", 4, 64, act_order=True, observer="mse"),
    "gptq-int4-g64-asym-act-mse": q("gptq", 4, 64, False, act_order=True, observer="mse"),
    # calibration shape: the same 8,192 tokens as 16 blocks of 512 (the eval's window length)
    "gptq-int4-g64-sym-16x512": q("gptq", 4, 64, calib_blocks=16, calib_seq_len=512, act_order=False),
    "gptq-int4-g64-sym-mse-16x512": q("gptq", 4, 64, observer="mse", calib_blocks=16, calib_seq_len=512, act_order=False),
    "sparsegpt-50-16x512": ("prune", dict(method="sparsegpt", sparsity=0.5, calib_samples=16, calib_seq_len=512)),
    "sparsegpt-2:4-16x512": ("prune", dict(method="sparsegpt", pattern="2:4", calib_samples=16, calib_seq_len=512)),
    "sparsegpt-50-256x128": ("prune", dict(method="sparsegpt", sparsity=0.5, calib_samples=256, calib_seq_len=128)),
    "sparsegpt-50-64x512": ("prune", dict(method="sparsegpt", sparsity=0.5, calib_samples=64, calib_seq_len=512)),
    "wanda-50-16x512": ("prune", dict(method="wanda", sparsity=0.5, calib_samples=16, calib_seq_len=512)),
    # extras
    "gptq-int4-g64-asym-act-128x128": q("gptq", 4, 64, False, act_order=True, calib_blocks=128),
    "sparsegpt-50-int4-g64": ("prune", dict(method="sparsegpt", sparsity=0.5, quantize_bits=4, group_size=64,
                                            **CALIB)),
    "sparsegpt-4:8": ("prune", dict(method="sparsegpt", pattern="4:8", **CALIB)),
}
#: the plain RTN script's ratios quoted in the issue (same grids)
ISSUE_RTN = {"rtn-int4-g64-sym": 1.46, "rtn-int4-g64-asym": 1.29, "rtn-int4-g32-sym": 1.29,
             "rtn-int4-g32-asym": 1.225, "rtn-int4-channel-sym": 1.99, "rtn-int8-channel-sym": 1.001}
TARGETS = {"gptq-int4-g64-sym": "<= 1.16", "gptq-int8-channel-sym": "<= 1.005", "sparsegpt-50": "<= 1.40",
           "sparsegpt-2:4": "<= 2.25"}


def quick(name, spec):
    step, params = spec
    params = dict(params)
    if params.get("method") == "gptq":
        params["calib_blocks"] = 8
    if "calib_samples" in params:
        params["calib_samples"] = 8
    return step, params


class RssSampler:
    """Peak resident set size of this process (``/proc/self/statm``), sampled every 20 ms in a thread."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.now())


def fresh(ctx, base):
    """Reset ``ctx`` to a deep copy of the dense model."""
    import copy

    ctx.model = copy.deepcopy(base)
    ctx.state.pop("masks", None)
    ctx.state.pop("quantized", None)


def run_config(ctx, base, name, spec, dense_ppl, max_tokens):
    from gptopt_quantize.step import QuantizeStep
    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.metrics import model_bytes
    from gptopt_prune import PruneStep

    step_name, params = spec
    fresh(ctx, base)
    step = (QuantizeStep if step_name == "quantize" else PruneStep)(**params)
    step.preflight(ctx)
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = step.apply(ctx)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ppl = perplexity(ctx.model, ctx.data.valid_ids, max_tokens=max_tokens)["perplexity"]
    engine = metrics.get("engine") or {}
    return {"name": name, "step": step_name, "params": step.params_dict(), "ppl": ppl, "ratio": ppl / dense_ppl,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "bytes": model_bytes(ctx.model),
            "grid": metrics.get("grid"), "calib_tokens": metrics.get("calib_tokens", engine.get("calib_tokens")),
            "layers": metrics.get("quantized_modules", metrics.get("pruned_layers")),
            "sparsity": metrics.get("pruned_sparsity")}


def memory_child(offload: str, max_tokens: int, calib_blocks: int) -> dict:
    """One GPTQ run in this (fresh) process: RSS before / peak during the step, engine counts, perplexity."""
    import gc

    from gptopt_quantize.step import QuantizeStep
    from gptopt_core.kit.calibration import resident_param_bytes
    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.testing import make_context

    ctx = make_context(model="smollm2-135m", device="cpu")
    # the loader may leave weights in a lazily paged file mapping; make them ordinary resident memory (as after
    # any in-place change), so the baseline counts the whole model and freeing a block shows in the RSS
    import torch

    with torch.no_grad():
        for p in ctx.model.parameters():
            p.data = p.data.clone()
    dense_bytes = resident_param_bytes(ctx.model)
    step = QuantizeStep(method="gptq", bits=4, group_size=64, offload=offload, calib_blocks=calib_blocks)
    step.preflight(ctx)
    ctx.calibration_blocks(1, 16)  # warm the tokenized data outside the measured span
    gc.collect()
    with RssSampler() as rss:
        baseline = rss.now()
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = step.apply(ctx)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    ppl = perplexity(ctx.model, ctx.data.valid_ids, max_tokens=max_tokens)["perplexity"]
    engine = metrics["engine"]
    return {"offload": offload, "baseline_rss": baseline, "peak_rss": rss.peak, "growth": rss.peak - baseline,
            "dense_param_bytes": dense_bytes, "growth_vs_dense": (rss.peak - baseline) / dense_bytes,
            "peak_resident_param_bytes": engine["peak_resident_param_bytes"], "ppl": ppl, "eval_tokens": max_tokens,
            "seconds": round(seconds, 2), "cpu_seconds": round(cpu, 2), "calib_tokens": engine["calib_tokens"]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated config names (default: all)")
    ap.add_argument("--quick", action="store_true", help="development: 8-block calibration, 1,024 eval tokens")
    ap.add_argument("--json", help="append one JSON line per result here")
    ap.add_argument("--resume", action="store_true", help="with --json: keep the rows already there")
    ap.add_argument("--memory", action="store_true", help="also run the two memory child processes")
    ap.add_argument("--memory-calib-blocks", type=int, default=64,
                    help="calibration blocks (x 128 tokens) of the memory runs (default: gptq's default, 64)")
    ap.add_argument("--memory-child", choices=["none", "disk"], help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="do not update the docs")
    ap.add_argument("--table-only", action="store_true", help="with --json: write the docs from the rows there")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    max_tokens = 1024 if args.quick else 4096
    if args.memory_child:
        print("RESULT " + json.dumps(memory_child(args.memory_child, 1024,
                                                  8 if args.quick else args.memory_calib_blocks)))
        return
    command = " ".join(["python", "benchmarks/oneshot_quality.py"] + (argv if argv is not None else sys.argv[1:]))
    done = {}
    if args.json and (args.resume or args.table_only) and Path(args.json).exists():
        for line in Path(args.json).read_text().splitlines():
            row = json.loads(line)
            done[row["name"]] = row
    if args.table_only:
        if not args.no_write:
            write_docs(done, command)
        print(quant_table(done) + "\n\n" + prune_table(done))
        return
    names = [n for n in args.only.split(",") if n] if args.only is not None else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown config(s) {unknown}; known: {', '.join(CONFIGS)}")

    def record(row):
        done[row["name"]] = row
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")

    todo = [n for n in names if n not in done]
    if todo:
        import torch

        from gptopt_core.kit.evaluate import perplexity
        from gptopt_core.kit.metrics import model_bytes
        from gptopt_core.kit.testing import make_context

        ctx = make_context(model="smollm2-135m", device="cpu")
        base = ctx.model
        dense_ppl = perplexity(base, ctx.data.valid_ids, max_tokens=max_tokens)["perplexity"]
        if "dense" in done and abs(done["dense"]["ppl"] - dense_ppl) > 1e-6:
            sys.exit(f"{args.json} was measured against dense perplexity {done['dense']['ppl']}, not {dense_ppl}")
        if "dense" not in done:
            record({"name": "dense", "ppl": dense_ppl, "ratio": 1.0, "bytes": model_bytes(base),
                    "threads": torch.get_num_threads(), "eval_tokens": max_tokens})
        print(f"dense perplexity {dense_ppl:.3f} ({torch.get_num_threads()} threads)", flush=True)
        for name in todo:
            spec = quick(name, CONFIGS[name]) if args.quick else CONFIGS[name]
            row = run_config(ctx, base, name, spec, dense_ppl, max_tokens)
            record(row)
            print(f"{name:32s} ppl {row['ppl']:8.3f}  x{row['ratio']:.4f}  {row['seconds']:7.1f}s "
                  f"{row['cpu_seconds']:7.1f} CPU-s", flush=True)
        del ctx, base
    if args.memory:
        for offload in ("none", "disk"):
            key = f"memory-{offload}"
            if key in done:
                continue
            cmd = [sys.executable, __file__, "--memory-child", offload, "--memory-calib-blocks",
                   str(args.memory_calib_blocks)] + (["--quick"] if args.quick else [])
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            row = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
            record({"name": key, **row})
            print(f"{key}: RSS growth {row['growth'] / 2**20:.1f} MiB = {row['growth_vs_dense']:.1%} of the dense "
                  f"model's {row['dense_param_bytes'] / 2**20:.1f} MiB; parameters resident at most "
                  f"{row['peak_resident_param_bytes'] / 2**20:.1f} MiB; ppl {row['ppl']:.4f}; "
                  f"{row['cpu_seconds']:.0f} CPU-s", flush=True)
    print(quant_table(done) + "\n\n" + prune_table(done))
    if not args.no_write and not args.quick:
        write_docs(done, command)


def _ratio(rows, name):
    r = rows.get(name)
    return f"x{r['ratio']:.3f}" if r else "-"


def quant_table(rows) -> str:
    dense = rows.get("dense")
    if not dense:
        return ""
    lines = [f"dense held-out perplexity {dense['ppl']:.3f} (the `eval` step's defaults: held-out pydoc, 512-token "
             f"blocks, at most {dense['eval_tokens']} tokens: the split holds 2,630 scored tokens); ratios vs dense; "
             "GPTQ: 64 x 128 calibration tokens (train split), dampening 0.01, sequential groups; act-order is "
             "gptq's default; textbook: `benchmarks/textbook_oneshot.py` (reference-style script, same calibration "
             "blocks, same scorer)", "",
             "| grid | RTN | RTN mse | GPTQ no act-order | GPTQ act-order (default) | GPTQ act-order mse | "
             "textbook GPTQ | RTN in the issue | target | GPTQ s (CPU-s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for grid in ("int4-g64-sym", "int4-g64-asym", "int4-g32-sym", "int4-g32-asym", "int4-channel-sym",
                 "int8-channel-sym"):
        g = rows.get(f"gptq-{grid}-act") or rows.get(f"gptq-{grid}")
        cost = f"{g['seconds']:.0f} ({g['cpu_seconds']:.0f})" if g else "-"
        issue = ISSUE_RTN.get(f"rtn-{grid}")
        lines.append(f"| {grid} | {_ratio(rows, 'rtn-' + grid)} | {_ratio(rows, 'rtn-' + grid + '-mse')} | "
                     f"{_ratio(rows, 'gptq-' + grid)} | {_ratio(rows, 'gptq-' + grid + '-act')} | "
                     f"{_ratio(rows, 'gptq-' + grid + '-act-mse')} | {_ratio(rows, 'textbook-gptq-' + grid)} | "
                     f"{f'x{issue}' if issue else '-'} | {TARGETS.get('gptq-' + grid, '')} | {cost} |")
    for name, label in (("bnb-nf4-b64", "bitsandbytes nf4, 64-weight blocks"),
                        ("gptq-int4-g64-sym-mse", "GPTQ int4-g64-sym no act-order, mse observer"),
                        ("gptq-int4-g64-sym-16x512", "GPTQ int4-g64-sym no act-order, 16 x 512 calibration"),
                        ("gptq-int4-g64-sym-mse-16x512", "GPTQ int4-g64-sym no act-order mse, 16 x 512 calibration"),
                        ("gptq-int4-g64-asym-act-mse", "GPTQ int4-g64-asym act-order, mse observer"),
                        ("gptq-int4-g64-asym-act-128x128", "GPTQ int4-g64-asym act-order, 128 x 128 calibration")):
        if name in rows:
            r = rows[name]
            if not any(line.startswith("| other configuration") for line in lines):
                lines += ["", "| other configuration | ratio | s (CPU-s) |", "|---|---|---|"]
            lines.append(f"| {label} | x{r['ratio']:.3f} | {r['seconds']:.0f} ({r['cpu_seconds']:.0f}) |")
    mem = [rows.get("memory-none"), rows.get("memory-disk")]
    if all(mem):
        lines += ["", f"GPTQ int4-g64-sym ({mem[0]['calib_tokens']} calibration tokens) in a fresh process, peak RSS "
                  "growth over the RSS right before the step (model loaded), vs the dense model's parameter bytes:",
                  "",
                  "| offload | RSS growth | of dense bytes | parameter bytes resident (peak) | ppl | s (CPU-s) |",
                  "|---|---|---|---|---|---|"]
        for m in mem:
            lines.append(f"| {m['offload']} | {m['growth'] / 2**20:.1f} MiB | {m['growth_vs_dense']:.1%} | "
                         f"{m['peak_resident_param_bytes'] / 2**20:.1f} of {m['dense_param_bytes'] / 2**20:.1f} MiB "
                         f"| {m['ppl']:.4f} ({m.get('eval_tokens', 4096)} tokens) | {m['seconds']:.0f} "
                         f"({m['cpu_seconds']:.0f}) |")
    return "\n".join(lines)


def prune_table(rows) -> str:
    if "dense" not in rows:
        return ""
    lines = ["| sparsity | Wanda | SparseGPT | textbook SparseGPT | Wanda 16 x 512 | SparseGPT 16 x 512 | "
             "target (SparseGPT) | SparseGPT s (CPU-s) |", "|---|---|---|---|---|---|---|---|"]
    for pat in ("50", "2:4", "4:8"):
        s = rows.get(f"sparsegpt-{pat}")
        cost = f"{s['seconds']:.0f} ({s['cpu_seconds']:.0f})" if s else "-"
        lines.append(f"| {pat + ' %' if pat == '50' else pat} | {_ratio(rows, 'wanda-' + pat)} | "
                     f"{_ratio(rows, 'sparsegpt-' + pat)} | {_ratio(rows, 'textbook-sparsegpt-' + pat)} | "
                     f"{_ratio(rows, 'wanda-' + pat + '-16x512')} | {_ratio(rows, 'sparsegpt-' + pat + '-16x512')} | "
                     f"{TARGETS.get('sparsegpt-' + pat, '')} | {cost} |")
    extra = [(n, label) for n, label in (("sparsegpt-50-int4-g64", "SparseGPT 50 % + int4-g64-sym (joint)"),
                                         ("sparsegpt-50-256x128", "SparseGPT 50 %, 256 x 128 calibration"),
                                         ("sparsegpt-50-64x512", "SparseGPT 50 %, 64 x 512 calibration")) if n in rows]
    if extra:
        lines += ["", "| other configuration | ratio | s (CPU-s) |", "|---|---|---|"]
    for name, label in extra:
        r = rows[name]
        lines.append(f"| {label} | x{r['ratio']:.3f} | {r['seconds']:.0f} ({r['cpu_seconds']:.0f}) |")
    return "\n".join(lines)


def write_docs(rows, command):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from docblock import write_block

    stamp = time.strftime("%Y-%m-%d")
    note = (f"Written by `HF_HUB_OFFLINE=1 {command}` ({stamp}, SmolLM2-135M on CPU, a 2-core machine shared with "
            "other jobs: wall seconds are indicative, CPU seconds are the process's own):")
    if "--table-only" in command:
        note += (" the rows were measured by `python benchmarks/oneshot_quality.py --only NAME,... --json PART "
                 "[--memory --memory-calib-blocks 16]` in parallel processes, one line per row, merged into that file;"
                 " rows that are missing did not finish before the deadline on the loaded machine.")
    quiet = [r["name"] for r in rows.values() if r.get("quiet")]
    if quiet:
        note += (f" Rows {', '.join(quiet)} were re-measured alone on the quiet machine (same figures, wall seconds "
                 "comparable: the cost figures).")
    write_block(QDOC, QSTART, QEND, f"{QSTART}\n{note}\n\n{quant_table(rows)}\n{QEND}")
    write_block(PDOC, PSTART, PEND, f"{PSTART}\n{note}\n\n{prune_table(rows)}\n{PEND}")


if __name__ == "__main__":
    main()
