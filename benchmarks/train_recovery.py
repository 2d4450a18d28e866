"""Sparsity-preserving recovery: Wanda 50% -> lora --merge -> save -> plain from_pretrained, vs the dense model
given the same LoRA budget. Ppl on the training corpus' held-out split and on a second real text (--eval-data).

    HF_HUB_OFFLINE=1 python benchmarks/train_recovery.py --steps 70 --lr 0.003 --r 64 --dropout 0.0

(the defaults; the lr comes from benchmarks/recovery_lr_sweep.py).

Prints the figures and writes them into docs/transfer.md (between the RECOVERY markers).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LICENSES = ["Apache-2.0", "Artistic", "CC0-1.0", "GFDL-1.3", "GPL-2", "GPL-3", "LGPL-2.1", "MPL-2.0"]


def second_text(path: Path) -> str:
    """A different real text: 8 free-software licences (legal English prose), one document each."""
    import re

    docs = [re.sub(r"\n{3,}", "\n\n", (Path("/usr/share/common-licenses") / n).read_text()) for n in LICENSES]
    path.write_text("\n\n\n".join(d.strip() for d in docs))
    return str(path)


def run(prune: bool, args, eval_data: str, tmp: Path) -> dict:
    from gptopt_core import Pipeline

    pipe = Pipeline(model=args.model, eval_data=eval_data, seed=0, device="cpu", quiet=True)
    ev = dict(max_tokens=args.eval_tokens)
    pipe.add("eval", **ev).add("eval", split="eval-data", **ev)
    if prune:
        pipe.add("prune", method="wanda", sparsity=0.5).add("eval", **ev).add("eval", split="eval-data", **ev)
    out = tmp / ("sparse" if prune else "dense")
    pipe.add("lora", r=args.r, alpha=2 * args.r, steps=args.steps, batch_size=4, seq_len=256, lr=args.lr, merge=True,
             dropout=args.dropout, masked_update=not args.dense_update)
    pipe.add("eval", **ev).add("eval", split="eval-data", **ev).add("save", to=str(out))
    start = time.perf_counter()
    result = pipe.run()
    seconds = time.perf_counter() - start
    recs = {i: r for i, r in enumerate(result.records)}
    lora = next(r for r in result.records if r["name"] == "lora")
    evals = [r["metrics"]["perplexity"] for r in result.records if r["name"] == "eval"]
    # reload as a user would: plain transformers, no gptopt in the loop
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.evaluate import perplexity
    from gptopt_core.kit.metrics import sparsity

    plain = AutoModelForCausalLM.from_pretrained(str(out))
    data, other = result.ctx.data, result.ctx.eval_data
    return {
        "pruned": prune, "seconds": round(seconds, 1), "lora_train_seconds": lora["metrics"]["train_seconds"],
        "lora_tokens_per_s": lora["metrics"]["train_tokens_per_s"],
        "lora_cpu_seconds": lora["metrics"].get("train_cpu_seconds"), "loss_first": lora["metrics"]["loss_first"],
        "loss_last": lora["metrics"]["loss_last"],
        "ppl_loaded": evals[0], "ppl_loaded_eval_data": evals[1],
        "ppl_pruned": evals[2] if prune else None, "ppl_pruned_eval_data": evals[3] if prune else None,
        "ppl_after_lora": evals[-2], "ppl_after_lora_eval_data": evals[-1],
        "reloaded_ppl": perplexity(plain, data.valid_ids, 512, 512, args.eval_tokens)["perplexity"],
        "reloaded_ppl_eval_data": perplexity(plain, other.valid_ids, 512, 512, args.eval_tokens)["perplexity"],
        "reloaded_sparsity": sparsity(plain),
        "lora_masked_layers": lora["metrics"].get("lora_masked_layers"),
        "n_records": len(recs), "load_avg": os.getloadavg()[0],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--steps", type=int, default=70)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--r", type=int, default=64, help="LoRA rank (alpha = 2r, both runs)")
    ap.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (both runs)")
    ap.add_argument("--dense-update", action="store_true",
                    help="train PEFT's dense update on the pruned model (lora --no-masked-update), for comparison")
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--from-log", help="render the doc table from the 'dense:'/'sparse:' lines of an earlier run's "
                    "output (same --steps/--lr) instead of measuring again")
    args = ap.parse_args()
    if args.from_log:
        lines = Path(args.from_log).read_text().replace("\r", "\n").splitlines()
        dense = json.loads(next(l for l in lines if l.startswith("dense: "))[len("dense: "):])
        sparse = json.loads(next(l for l in lines if l.startswith("sparse: "))[len("sparse: "):])
    else:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            eval_data = second_text(tmp / "licenses.txt")
            dense = run(False, args, eval_data, tmp)
            print("dense:", json.dumps(dense), flush=True)
            sparse = run(True, args, eval_data, tmp)
            print("sparse:", json.dumps(sparse), flush=True)
    ratio = sparse["reloaded_ppl"] / dense["reloaded_ppl"]
    ratio_other = sparse["reloaded_ppl_eval_data"] / dense["reloaded_ppl_eval_data"]
    print(f"ratio (held-out pydoc) {ratio:.3f} (target <= 1.33); ratio on licences {ratio_other:.3f}; "
          f"sparsity reloaded {sparse['reloaded_sparsity']:.6f}; LoRA training wall "
          f"{sparse['lora_train_seconds']:.0f} s on 2 shared cores")
    if args.no_doc:
        return
    cmd = (f"HF_HUB_OFFLINE=1 python benchmarks/train_recovery.py --steps {args.steps} --lr {args.lr} "
           f"--r {args.r} --dropout {args.dropout}" + (" --dense-update" if args.dense_update else ""))
    update = ("PEFT's dense update (--no-masked-update), masked only at the merge" if args.dense_update else
              f"masked update M*s*BA on the pruned model ({sparse['lora_masked_layers']} layers)")
    table = [
        f"Command: `{cmd}` (model {args.model}, LoRA r{args.r} alpha{2 * args.r} auto targets, {args.steps} steps x 4 x 256 "
        f"tokens, lr {args.lr}, dropout {args.dropout}, merge; {update}; second text: 8 licences from /usr/share/common-licenses).", "",
        "| | dense | Wanda 50% |", "|---|---|---|",
        f"| held-out ppl as loaded | {dense['ppl_loaded']:.3f} | {sparse['ppl_loaded']:.3f} |",
        f"| held-out ppl after prune | | {sparse['ppl_pruned']:.3f} |",
        f"| held-out ppl after lora+merge, reloaded with from_pretrained | {dense['reloaded_ppl']:.3f} | "
        f"{sparse['reloaded_ppl']:.3f} |",
        f"| second text (licences) ppl as loaded | {dense['ppl_loaded_eval_data']:.3f} | "
        f"{sparse['ppl_loaded_eval_data']:.3f} |",
        f"| second text ppl after prune | | {sparse['ppl_pruned_eval_data']:.3f} |",
        f"| second text ppl after lora+merge, reloaded | {dense['reloaded_ppl_eval_data']:.3f} | "
        f"{sparse['reloaded_ppl_eval_data']:.3f} |",
        f"| sparsity of the reloaded model | {dense['reloaded_sparsity']:.6f} | {sparse['reloaded_sparsity']:.6f} |",
        f"| LoRA training seconds (tokens/s) | {dense['lora_train_seconds']:.0f} ({dense['lora_tokens_per_s']:.0f}) | "
        f"{sparse['lora_train_seconds']:.0f} ({sparse['lora_tokens_per_s']:.0f}) |", "",
        f"Training seconds are wall time on this 2-core machine (1-minute load average at the end of the dense "
        f"/ sparse run: {dense['load_avg']:.1f} / {sparse['load_avg']:.1f}); the sparse run's LoRA training took "
        + (f"{sparse['lora_cpu_seconds'] / 60:.1f} CPU-minutes (process CPU time; budget: 20)."
           if sparse.get("lora_cpu_seconds") else
           f"{sparse['lora_train_seconds'] * os.cpu_count() / 60:.1f} CPU-minutes ({os.cpu_count()} cores x "
           f"{sparse['lora_train_seconds']:.0f} s; budget: 20)."), "",
        f"Sparse / dense held-out ppl at the same LoRA budget: **{ratio:.3f}** (target <= 1.33); on the second "
        f"text: {ratio_other:.3f}.",
    ]
    write_section("RECOVERY", "\n".join(table))


def write_section(marker: str, body: str) -> None:
    doc = ROOT / "docs" / "transfer.md"
    text = doc.read_text() if doc.exists() else "# transfer\n"
    start, end = f"<!-- {marker}:START -->", f"<!-- {marker}:END -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    main()
