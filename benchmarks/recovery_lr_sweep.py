"""Pick the LoRA learning rate for the recovery benchmark with short runs, dense and Wanda-50% alike.

The Wanda-50% model is pruned once and saved; every sparse run loads it and re-derives the masks with
``prune --method magnitude --sparsity 0.5`` (on an exactly 50%-sparse layer the zeros are the lowest |w|, so
the masks are the Wanda masks), then ``lora --merge`` (masked update) and a held-out eval. Dense runs start from
the model as loaded. One line per run; pick the lr that is best for the *dense* model too, so the ratio in
train_recovery.py is not bought with a weak baseline.

    HF_HUB_OFFLINE=1 python benchmarks/recovery_lr_sweep.py --steps 30 --lr 0.001 --lr 0.003 --lr 0.006
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def prune_once(model: str, out: Path) -> float:
    from gptopt_core import Pipeline

    pipe = Pipeline(model=model, seed=0, device="cpu", quiet=True)
    pipe.add("prune", method="wanda", sparsity=0.5).add("eval", max_tokens=4096).add("save", to=str(out))
    return next(r["metrics"]["perplexity"] for r in pipe.run().records if r["name"] == "eval")


def one_run(model: str, sparse: bool, steps: int, lr: float, r: int) -> dict:
    from gptopt_core import Pipeline

    pipe = Pipeline(model=model, seed=0, device="cpu", quiet=True)
    if sparse:
        pipe.add("prune", method="magnitude", sparsity=0.5)
    pipe.add("eval", max_tokens=4096)
    pipe.add("lora", r=r, alpha=2 * r, steps=steps, batch_size=4, seq_len=256, lr=lr, merge=True, dropout=0.0)
    pipe.add("eval", max_tokens=4096)
    start = time.time()
    result = pipe.run()
    lora = next(x for x in result.records if x["name"] == "lora")["metrics"]
    evals = [x["metrics"]["perplexity"] for x in result.records if x["name"] == "eval"]
    return dict(kind="sparse" if sparse else "dense", steps=steps, lr=lr, r=r, ppl_before=evals[0],
                ppl_after=evals[-1], train_cpu_seconds=lora.get("train_cpu_seconds"),
                wall_seconds=round(time.time() - start), loss_last=lora["loss_last"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--r", type=int, default=64)
    ap.add_argument("--lr", type=float, action="append", help="repeatable [default: 0.001 0.003 0.006]")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        pruned = Path(d) / "wanda50"
        print("wanda 50% ppl:", prune_once(args.model, pruned), flush=True)
        for lr in args.lr or [0.001, 0.003, 0.006]:
            rows = [one_run(str(pruned) if sparse else args.model, sparse, args.steps, lr, args.r)
                    for sparse in (True, False)]
            for row in rows:
                print(json.dumps(row), flush=True)
            print(f"lr {lr}: sparse / dense = {rows[0]['ppl_after'] / rows[1]['ppl_after']:.3f}", flush=True)


if __name__ == "__main__":
    main()
