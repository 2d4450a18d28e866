"""cpu-fast on SmolLM2-135M: auto's table (fp32, bf16, the seed's plain dynamic int8, guarded dynamic int8,
torchao int8 weight-only where torchao runs; with --compile the compiled candidates), all measured in one
process, speed interleaved.

    HF_HUB_OFFLINE=1 python benchmarks/cpu_fast.py [--compile] [--threads 2] [--eval-tokens 2048] [--rounds 3]

Prints the table and writes it with the command into docs/cpu.md (between the BENCH markers).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from docblock import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cpu.md"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-tokens", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--calib-blocks", type=int, default=2)
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--compile", action="store_true", help="cpu-fast --compile (auto's compiled candidates)")
    ap.add_argument("--json", default=None, help="also write the records here")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--from-json", default=None,
                    help="write docs/cpu.md from the records of an earlier run (its --json) instead of measuring")
    ap.add_argument("--command", default=None, help="with --from-json: the command that measured them")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from gptopt_core import Pipeline
    from gptopt_cpu.run import table_lines, table_markdown

    started = time.time()
    if args.from_json:
        records = json.loads(Path(args.from_json).read_text())
        minutes = float("nan")
    else:
        pipe = (Pipeline(model="smollm2-135m", data="builtin:pydoc", quiet=False)
                .add("cpu-fast", max_ppl_increase=args.budget, eval_tokens=args.eval_tokens, rounds=args.rounds,
                     new_tokens=args.new_tokens, calib_blocks=args.calib_blocks, compile=args.compile)
                .add("eval", max_tokens=args.eval_tokens))
        records = pipe.run().records
        minutes = (time.time() - started) / 60
    step = records[0]["metrics"]
    held_out = records[1]["metrics"]["perplexity"]
    table = step["auto_table"]
    fp32 = next(r for r in table if r["format"] == "fp32")
    chosen = next(r for r in table if r["chosen"])
    print("\n".join(table_lines(table)))
    verdict = (f"auto chose **{chosen['format']}**: decode x{chosen['decode_speedup']:.2f} vs fp32 "
               f"(target >= 2), held-out ppl {held_out:.3f} = x{held_out / fp32['perplexity']:.3f} of fp32 "
               f"(target <= 1.10; eval after the step, same {args.eval_tokens} tokens)")
    print(verdict)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2, default=str))
    if args.no_doc:
        return
    command = args.command or "HF_HUB_OFFLINE=1 python benchmarks/cpu_fast.py " + " ".join(sys.argv[1:])
    begin, end = ("<!-- BENCH:cpu_fast_compiled -->", "<!-- /BENCH:cpu_fast_compiled -->") if args.compile else \
        ("<!-- BENCH:cpu_fast -->", "<!-- /BENCH:cpu_fast -->")
    block = "\n".join([
        begin,
        f"Measured with `{command.strip()}` ({args.threads} threads, torch {torch.__version__}, " +
        (f"{minutes:.0f} min " if minutes == minutes else "") +
        "on a 2-core machine shared with other jobs; speed interleaved per round, medians).",
        "",
        table_markdown(table, float(records[0]["params"]["max_ppl_increase"]), "valid"),
        "",
        f"kept layers (guarded int8-dynamic): {', '.join(step.get('kept_layers', [])) or 'none'}" if
        chosen["format"] == "int8-dynamic" else "",
        "",
        verdict,
        end,
    ])
    write_block(DOC, begin, end, block)


if __name__ == "__main__":
    main()
