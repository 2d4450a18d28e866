"""Prune cost on SmolLM2-135M: wall time and peak extra memory of the ``prune`` step, per method.

    HF_HUB_OFFLINE=1 python benchmarks/prune_cost.py [--repeats 2] [--no-write]

Each measurement runs in a fresh child process (so one method's freed memory cannot hide another's peak): the
child loads the model, then runs the real ``prune`` step while a thread samples the process RSS every 5 ms;
"peak extra" is the highest RSS during the step minus the RSS just before it. The methods are interleaved
(round r runs every method once) so load from other processes on the machine hits them alike; the table gives
medians over the rounds. Results are printed and written between markers into docs/prune.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "prune.md"
START, END = "<!-- prune-cost:start -->", "<!-- prune-cost:end -->"

C16 = dict(calib_samples=16, calib_seq_len=128)  # cost grows linearly with calibration tokens
CONFIGS = {
    "magnitude 50%": dict(method="magnitude", sparsity=0.5),
    "magnitude 50% global": dict(method="magnitude", sparsity=0.5, scope="global"),
    "wanda 50% (16×128)": dict(method="wanda", sparsity=0.5, **C16),
    "wanda 50% (16×128, sequential)": dict(method="wanda", sparsity=0.5, sequential=True, **C16),
    "wanda 2:4 (16×128)": dict(method="wanda", pattern="2:4", **C16),
    "taylor 50% (16×128)": dict(method="taylor", sparsity=0.5, **C16),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model_name: str, params: dict) -> None:
    from gptopt_core.kit.testing import make_context
    from gptopt_prune import PruneStep

    ctx = make_context(model=model_name, device="cpu")
    step = PruneStep(**params)
    step.preflight(ctx)
    base = peak = rss_bytes()
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    metrics = step.apply(ctx)
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    peak = max(peak, rss_bytes())
    print("RESULT " + json.dumps({"seconds": seconds, "peak_extra_bytes": peak - base, "rss_before": base,
                                  "calib_tokens": metrics["calib_tokens"],
                                  "calib_activation_bytes": metrics.get("calib_activation_bytes")}))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", help="comma-separated config names")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return child(args.model, json.loads(args.child))
    names = args.only.split(",") if args.only else list(CONFIGS)
    results = {n: [] for n in names}
    for r in range(args.repeats):
        for name in names:
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--child",
                                   json.dumps(CONFIGS[name])], capture_output=True, text=True)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                sys.exit(f"{name} failed: {proc.stderr[-2000:]}")
            res = json.loads(line[7:])
            results[name].append(res)
            print(f"round {r + 1} {name:34s} {res['seconds']:7.1f}s  peak +{res['peak_extra_bytes'] / 1e6:7.1f} MB "
                  f"(RSS before {res['rss_before'] / 1e6:.0f} MB)", flush=True)
    lines = [f"| method | prune s (median of {args.repeats}) | peak extra MB (median) | calibration tokens |",
             "|---|---|---|---|"]
    for name in names:
        rs = results[name]
        lines.append(f"| {name} | {statistics.median(r['seconds'] for r in rs):.1f} | "
                     f"{statistics.median(r['peak_extra_bytes'] for r in rs) / 1e6:.0f} | {rs[0]['calib_tokens']} |")
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        command = shlex.join(["python", "benchmarks/prune_cost.py"] + (argv or sys.argv[1:]))
        doc = DOC.read_text()
        if START not in doc:
            doc += f"\n{START}\n{END}\n"
        head, rest = doc.split(START, 1)
        block = (f"{START}\nMeasured with `HF_HUB_OFFLINE=1 {command}` ({time.strftime('%Y-%m-%d')}, CPU, shared "
                 f"2-core machine: absolute times are indicative, compare rows):\n\n{text}\n{END}")
        DOC.write_text(head + block + rest.split(END, 1)[1])
        print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
