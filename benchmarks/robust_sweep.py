"""Does robustness-penalised training (``robust``: λ·‖∇_W L‖₁) make pruning hurt less? SmolLM2-135M, CPU.

Every arm trains the same model on the same data with the same steps and seed, then is pruned three ways, each
evaluated right after the prune and after a short masked recovery finetune::

    eval [robust --weight λ] [l1 --weight λ1 --select prunable --sparsity 0.5] finetune eval save
    then for prune in (magnitude 50%, wanda 50%, wanda 2:4):  prune eval finetune(recovery) eval

    python benchmarks/robust_sweep.py --cost                       # s/step, CPU-s/step, peak RSS: plain/fd/exact
    python benchmarks/robust_sweep.py --scan 1e-4 --scan 1e-3      # λ scan: few steps, magnitude 50% only
    python benchmarks/robust_sweep.py --arm ft --arm robust:1e-3 --arm l1:150 --arm both:1e-3:150
    python benchmarks/robust_sweep.py --report                     # docs/robust.md table + docs/robust_sweep.png

Results accumulate in docs/robust_results.json (sections cost / scan / arms), so the runs can be split.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "robust_results.json"
MODEL = "smollm2-135m"
# Sized for a shared 2-core machine (the l1 sweep's 45×4×256 tokens per arm did not fit here: measured under a
# load average of ~11, one plain step of 2×256 tokens took 156 s wall, 37.5 CPU-s).
FT = dict(lr=1e-4, batch_size=2, seq_len=128)  # + steps
STEPS, SCAN_STEPS, RECOVERY_STEPS = 8, 4, 2
EVAL = dict(max_tokens=1024, block_size=256)
CALIB = dict(calib_samples=16, calib_seq_len=128)
PRUNES = {"magnitude-50": dict(method="magnitude", sparsity=0.5), "wanda-50": dict(method="wanda", sparsity=0.5, **CALIB),
          "wanda-2:4": dict(method="wanda", pattern="2:4", **CALIB)}
L1_EXTRA = dict(select="prunable", sparsity=0.5, mode="proximal")
ROBUST_MODE = "fd"


def pipeline(model):
    from gptopt_core import Pipeline

    return Pipeline(model=model, data="builtin:pydoc", seed=0, device="cpu", quiet=True)


def regularizers(pipe, arm: str):
    kind, *lams = arm.split(":")
    if kind in ("robust", "both"):
        pipe.add("robust", weight=float(lams[0]), mode=ROBUST_MODE)
    if kind in ("l1", "both"):
        pipe.add("l1", weight=float(lams[-1]), **L1_EXTRA)
    return pipe


def train_arm(arm: str, steps: int, save_to: Path | None, dense: bool) -> dict:
    pipe = pipeline(MODEL)
    if dense:
        pipe.add("eval", **EVAL)
    regularizers(pipe, arm).add("finetune", steps=steps, **FT).add("eval", **EVAL)
    if save_to is not None:
        pipe.add("save", to=str(save_to))
    result = pipe.run()
    tr = next(r for r in result.records if r["name"] == "finetune")["metrics"]
    evals = [r["metrics"]["perplexity"] for r in result.records if r["name"] == "eval"]
    out = {"trained": evals[-1], "train_seconds": tr["train_seconds"], "train_cpu_seconds": tr["train_cpu_seconds"],
           "robust_grad_l1_first": tr.get("robust_grad_l1_first"), "robust_grad_l1_last": tr.get("robust_grad_l1_last"),
           "l1_zero_fraction": tr.get("l1_zero_fraction"), "ce_last": (tr.get("ce_history") or tr["loss_history"])[-1]}
    if dense:
        out["dense"] = evals[0]
    return out


def prune_and_recover(model_dir: Path, prune: dict) -> dict:
    pipe = pipeline(str(model_dir)).add("prune", **prune).add("eval", **EVAL)
    pipe.add("finetune", steps=RECOVERY_STEPS, **FT).add("eval", **EVAL)
    evals = [r["metrics"]["perplexity"] for r in pipe.run().records if r["name"] == "eval"]
    return {"pruned": evals[0], "recovered": evals[1]}


def run_arm(arm: str, prunes) -> dict:
    """Train, then prune each way; the arm's entry in the results is saved after every prune (partial runs count)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="robust-sweep-") as tmp:
        out = train_arm(arm, STEPS, Path(tmp) / "m", dense=arm == "ft")
        out.update(steps=STEPS, recovery_steps=RECOVERY_STEPS, ft=FT, eval=EVAL)
        for name in prunes:
            out[name] = prune_and_recover(Path(tmp) / "m", PRUNES[name])
            out.update(wall_s=round(time.perf_counter() - start, 1), load_avg=os.getloadavg()[0])
            save("arms", arm, out)
            print(f"  {arm} {name}: {out[name]}", flush=True)
    return out


def run_scan(lam: str) -> dict:
    arm = "ft" if lam == "0" else f"robust:{lam}"
    with tempfile.TemporaryDirectory(prefix="robust-scan-") as tmp:
        out = train_arm(arm, SCAN_STEPS, Path(tmp) / "m", dense=False)
        pipe = pipeline(str(Path(tmp) / "m")).add("prune", **PRUNES["magnitude-50"]).add("eval", **EVAL)
        out["magnitude-50"] = pipe.run().records[-1]["metrics"]["perplexity"]
    out.update(steps=SCAN_STEPS, ft=dict(FT), eval=dict(EVAL))
    return out


COST_CHILD = """
import json, resource, sys
from gptopt_core import Pipeline
mode, steps, ft = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
pipe = Pipeline(model="smollm2-135m", data="builtin:pydoc", seed=0, device="cpu", quiet=True)
if mode != "plain":
    pipe.add("robust", weight=1e-3, mode=mode)
m = [r for r in pipe.add("finetune", steps=steps, **ft).run().records if r["name"] == "finetune"][0]["metrics"]
print(json.dumps({"s_per_step": m["train_seconds"] / steps, "cpu_s_per_step": m["train_cpu_seconds"] / steps,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "grad_l1": m.get("robust_grad_l1_first")}))
"""


def run_cost(mode: str, steps: int = 2) -> dict:
    """One subprocess per mode, so that peak RSS is that mode's own (model load included)."""
    proc = subprocess.run([sys.executable, "-c", COST_CHILD, mode, str(steps), json.dumps(FT)], capture_output=True,
                          text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}, "steps": steps,
            "ft": FT, "load_avg": os.getloadavg()[0]}


def save(section: str, key: str, value: dict) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results.setdefault(section, {})[key] = value
    RESULTS.write_text(json.dumps(results, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cost", action="store_true", help="time and peak memory per step: plain, fd, exact")
    ap.add_argument("--cost-modes", default="plain,fd,exact", help="--cost: which modes (comma-separated)")
    ap.add_argument("--cost-steps", type=int, default=2, help="--cost: optimizer steps per mode")
    ap.add_argument("--scan", action="append", default=[], help="robust λ for the short scan (0: plain finetune)")
    ap.add_argument("--quick", action="store_true",
                    help="--scan at the smallest size that ran on the loaded shared box: 3 steps of 1×128, 512 eval "
                         "tokens")
    ap.add_argument("--arm", action="append", default=[], help="ft | robust:λ | l1:λ1 | both:λ:λ1")
    ap.add_argument("--prunes", default=",".join(PRUNES), help="comma-separated subset of " + ", ".join(PRUNES))
    ap.add_argument("--report", action="store_true", help="write the table into docs/robust.md and the plot")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    global SCAN_STEPS
    if args.quick:
        FT.update(batch_size=1, seq_len=128)
        EVAL.update(max_tokens=512, block_size=256)
        SCAN_STEPS = 3
    if args.cost:
        for mode in args.cost_modes.split(","):
            save("cost", mode, run_cost(mode, args.cost_steps))
            print(mode, json.loads(RESULTS.read_text())["cost"][mode], flush=True)
    for lam in args.scan:
        save("scan", lam, run_scan(lam))
        print("scan", lam, json.loads(RESULTS.read_text())["scan"][lam], flush=True)
    for arm in args.arm:
        print(f"running {arm} ...", flush=True)
        run_arm(arm, args.prunes.split(","))
        print(arm, json.dumps(json.loads(RESULTS.read_text())["arms"][arm]), flush=True)
    if args.report:
        from robust_report import report  # benchmarks/robust_report.py

        report(json.loads(RESULTS.read_text()))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
