"""Training throughput: the same PEFT LoRA config through gptopt's loop and through a plain PEFT loop.

    HF_HUB_OFFLINE=1 python benchmarks/train_vs_peft.py --steps 4 --repeats 3

The two contenders run interleaved in one process (A B A B ...), each on a fresh LoRA model, so load from
other processes on the machine hits both alike; the medians are compared. Timed for each: everything from
"PEFT model ready" to "training done" (optimizer and schedule creation, all steps); gptopt's own
``train_tokens_per_s`` (step time only) is printed too. Writes docs/transfer.md (THROUGHPUT markers).
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time


def lora_model(base, r):
    import peft

    from gptopt_transfer import resolve_targets

    targets, conv = resolve_targets(base, ["auto"])
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=targets, fan_in_fan_out=conv,
                          task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def plain_loop(model, blocks, steps, batch, lr):
    """The reference: what a user writes with PEFT + torch alone."""
    import torch

    start = time.perf_counter()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    warm = int(0.1 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / (warm + 1) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids = blocks[torch.randint(0, blocks.shape[0], (batch,), generator=gen)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    from gptopt_core.kit.testing import make_context
    from gptopt_core.kit.training import TrainParams, Trainer, train_blocks

    ctx = make_context(model=args.model)
    base = ctx.model
    blocks = train_blocks(ctx.data, args.seq_len)
    params = TrainParams(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=5e-4)
    tokens = args.steps * args.batch_size * args.seq_len
    plain_tps, ours_tps, ours_inner = [], [], []
    # warm-up both once (allocator, kernels) without timing
    plain_loop(lora_model(base, args.r), blocks, 1, args.batch_size, 5e-4)
    for rep in range(args.repeats):
        for who in (("plain", "gptopt") if rep % 2 == 0 else ("gptopt", "plain")):
            model = lora_model(base, args.r)
            if who == "plain":
                plain_tps.append(tokens / plain_loop(model, blocks, args.steps, args.batch_size, 5e-4))
            else:
                start = time.perf_counter()
                trainer = Trainer(ctx, model, params, name="lora")
                metrics = trainer.run()
                ours_tps.append(tokens / (time.perf_counter() - start))
                ours_inner.append(metrics["train_tokens_per_s"])
            print(f"repeat {rep} {who}: {(plain_tps if who == 'plain' else ours_tps)[-1]:.1f} tokens/s", flush=True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    p_med, o_med, i_med = statistics.median(plain_tps), statistics.median(ours_tps), statistics.median(ours_inner)
    ratio = o_med / p_med
    print(f"plain PEFT loop {p_med:.1f} tokens/s, gptopt {o_med:.1f} tokens/s end-to-end "
          f"({i_med:.1f} step-only): ratio {ratio:.3f} (target >= 0.97); trainable {100 * trainable / total:.2f}%")
    if args.no_doc:
        return
    from train_recovery import write_section

    cmd = (f"HF_HUB_OFFLINE=1 python benchmarks/train_vs_peft.py --steps {args.steps} --repeats {args.repeats} "
           f"--r {args.r}")
    body = "\n".join([
        f"Command: `{cmd}` (model {args.model}, LoRA r{args.r} on all auto targets ({100 * trainable / total:.2f}% "
        f"trainable), {args.steps} steps x {args.batch_size} x {args.seq_len} tokens per run, fp32 on CPU, "
        f"contenders interleaved, medians of {args.repeats}).", "",
        "| loop | tokens/s (median) | all runs |", "|---|---|---|",
        f"| plain PEFT + torch AdamW loop | {p_med:.1f} | {', '.join(f'{x:.1f}' for x in plain_tps)} |",
        f"| gptopt Trainer (end-to-end incl. accelerate setup) | {o_med:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in ours_tps)} |",
        f"| gptopt Trainer, its reported train_tokens_per_s (steps only) | {i_med:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in ours_inner)} |", "",
        f"gptopt / plain (end-to-end): **{ratio:.3f}** (target >= 0.97).",
    ])
    write_section("THROUGHPUT", body)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
