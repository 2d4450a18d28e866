"""Does `bench` measure what a hand-written timing loop around `model.generate` measures?

Same model, same process, same prompt (the first --prompt-tokens tokens of the held-out split of
builtin:pydoc), the two contenders interleaved round by round (alternating which goes first) so that load
from other processes hits both alike; medians over rounds.

* bench: the real ``bench`` step (``BenchStep(...).apply(ctx)``), ``--repeats`` timed runs per round, no
  warmup inside (one shared warmup at the start), its ``decode_tokens_per_s``.
* hand: ``model.generate`` with greedy decoding of exactly 1 and of N new tokens, timed around the call
  (``time.perf_counter`` on CPU; on CUDA ``torch.cuda.Event`` pairs + ``synchronize``), decode tokens/s =
  (N - 1) / (T_N - T_1): the generation time beyond the first token, per token.

Variants: fp32 (as loaded), nf4 (bitsandbytes 4-bit, fp32 compute as gptopt_quantize's default, loaded with BitsAndBytesConfig), bf16,
int8dyn (torch dynamic int8 on the Linear layers, CPU only). Writes the figures and the command into
docs/bench.md between the bench_vs_generate markers.

    python benchmarks/bench_vs_generate.py --variants fp32,nf4 --rounds 5
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from docblock import write_block

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "bench.md"
MARK = "<!-- bench_vs_generate:{}:{} -->"  # one block per --variants value, so runs with other settings coexist


def load_variant(name: str, device):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gptopt_core.kit.models import smollm2_dir

    path = smollm2_dir()
    if name == "fp32":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    elif name == "bf16":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    elif name == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=torch.float32)  # gptopt_quantize's default
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=str(device)).eval()
    elif name == "int8dyn":
        if device.type != "cpu":
            raise SystemExit("int8dyn is a CPU-only variant")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    else:
        raise SystemExit(f"unknown variant {name}")
    return model.to(device).eval()


class HandLoop:
    """The hand-written reference: generate(1) and generate(N), timed around the call."""

    def __init__(self, model, ids, new_tokens: int, pad_token_id):
        import torch

        self.torch, self.model, self.ids, self.n = torch, model, ids, new_tokens
        self.mask = torch.ones_like(ids)
        self.pad = pad_token_id
        self.cuda = ids.device.type == "cuda"

    def _generate(self, n):
        torch = self.torch
        with torch.inference_mode():
            if self.cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=self.pad)
                end.record()
                torch.cuda.synchronize()
                seconds = start.elapsed_time(end) / 1000.0
            else:
                t0 = time.perf_counter()
                out = self.model.generate(input_ids=self.ids, attention_mask=self.mask, max_new_tokens=n,
                                          min_new_tokens=n, do_sample=False, pad_token_id=self.pad)
                seconds = time.perf_counter() - t0
        assert out.shape[1] - self.ids.shape[1] == n
        return seconds

    def rate(self, repeats: int) -> tuple[float, float]:
        """(decode tokens/s, end-to-end tokens/s) from ``repeats`` interleaved (T_1, T_N) pairs, medians."""
        t1, tn = [], []
        for _ in range(repeats):
            t1.append(self._generate(1))
            tn.append(self._generate(self.n))
        a, b = statistics.median(t1), statistics.median(tn)
        return (self.n - 1) / (b - a), self.n / b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="fp32,nf4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per contender per round")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a shared machine")
    ap.add_argument("--no-doc", action="store_true", help="do not write docs/bench.md")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from gptopt_bench import BenchStep
    from gptopt_core.kit.testing import make_context

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ctx = make_context(model="smollm2-135m", device=str(device))
    pad = ctx.tokenizer.pad_token_id if ctx.tokenizer.pad_token_id is not None else ctx.tokenizer.eos_token_id
    ids = ctx.data.valid_ids[: args.prompt_tokens].unsqueeze(0).to(device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                  f"{os.cpu_count()} cores visible")
    print(f"device {device} ({where}); prompt {args.prompt_tokens} + {args.new_tokens} new tokens; "
          f"{args.rounds} rounds x {args.repeats} runs per contender", flush=True)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for variant in args.variants.split(","):
        ctx.model = load_variant(variant, device)
        ctx.records = []
        step = BenchStep(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=0,
                         repeats=args.repeats, max_repeats=args.repeats)
        hand = HandLoop(ctx.model, ids, args.new_tokens, pad)
        BenchStep(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, warmup=1, repeats=1,
                  max_repeats=1).apply(ctx)  # shared warmup
        hand.rate(1)
        bench_rates, hand_rates, hand_e2e, bench_e2e, cvs = [], [], [], [], []
        for r in range(args.rounds):
            order = ("bench", "hand") if r % 2 == 0 else ("hand", "bench")
            for who in order:
                if who == "bench":
                    m = step.apply(ctx)
                    bench_rates.append(m["decode_tokens_per_s"])
                    bench_e2e.append(m["generate_tokens_per_s"])
                    cvs.append(m["bench_cv"])
                else:
                    d, e = hand.rate(args.repeats)
                    hand_rates.append(d)
                    hand_e2e.append(e)
            print(f"  {variant} round {r + 1}: bench {bench_rates[-1]:.2f} tok/s, hand {hand_rates[-1]:.2f} tok/s",
                  flush=True)
        b, h = statistics.median(bench_rates), statistics.median(hand_rates)
        ratios = [x / y for x, y in zip(bench_rates, hand_rates)]  # same round: same background load
        row = {"variant": variant, "bench": b, "hand": h, "diff": statistics.median(ratios) - 1,
               "ratio_range": (min(ratios), max(ratios)),
               "bench_e2e": statistics.median(bench_e2e), "hand_e2e": statistics.median(hand_e2e),
               "cv": statistics.median([c for c in cvs if c is not None]) if any(c is not None for c in cvs) else None}
        rows.append(row)
        print(f"{variant}: bench decode {b:.2f} tok/s vs hand-written generate loop {h:.2f} tok/s; median per-round "
              f"ratio {row['diff']:+.1%} (range {min(ratios) - 1:+.1%} .. {max(ratios) - 1:+.1%}); end-to-end generate {row['bench_e2e']:.2f} vs {row['hand_e2e']:.2f} tok/s",
              flush=True)
        del ctx.model
    command = "python benchmarks/bench_vs_generate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = ["| variant | bench decode tok/s | hand-written generate loop tok/s | bench / hand (median of rounds) | "
             "per-round range | bench end-to-end tok/s | hand end-to-end tok/s | bench CV (median) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lo, hi = row["ratio_range"]
        table.append(f"| {row['variant']} | {row['bench']:.2f} | {row['hand']:.2f} | {row['diff']:+.1%} | "
                     f"{lo - 1:+.1%} .. {hi - 1:+.1%} | "
                     f"{row['bench_e2e']:.2f} | {row['hand_e2e']:.2f} | "
                     f"{'n/a' if row['cv'] is None else format(row['cv'], '.1%')} |")
    print("\n".join(table))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not args.no_doc:
        START, END = MARK.format(args.variants, "start"), MARK.format(args.variants, "end")
        block = "\n".join([START, "", f"Command: `{command.strip()}`", "",
                           f"Measured {time.strftime('%Y-%m-%d')} on {device} ({where}); SmolLM2-135M-Instruct, "
                           f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch 1, "
                           f"{args.rounds} interleaved rounds x {args.repeats} runs, medians. The machine was "
                           f"shared with other developers' jobs (1-minute load average {load_before:.1f} at the "
                           f"start, {load_after:.1f} at the end, on {os.cpu_count()} cores), so absolute figures "
                           "move; the two columns were "
                           "measured alternately in one process, and the difference is the median over rounds of "
                           "bench / hand within the same round (both saw the same background load).", "", *table, "", END])
        write_block(DOC, START, END, block, before="<!-- bench_vs_generate:results -->")


if __name__ == "__main__":
    main()
