"""One AutoRound GGUF file for benchmarks/gguf_peers.py, run in AutoRound's own environment (never a gptopt
dependency): ``/path/to/autoround-venv/bin/python benchmarks/gguf_peers_autoround.py --model-dir DIR --texts
train.json --out-dir OUT --format gguf:q4_0 --iters 0``. Prints one JSON line: the GGUF path and the wall time.

Calibration: the texts in ``--texts`` (a JSON list: gptopt's train split of the same data), given to AutoRound as
local samples (``dataset=[...]``), so nothing is downloaded."""
import argparse
import json
import os
import time
from pathlib import Path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--texts", required=True, help="JSON list of calibration texts")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--format", default="gguf:q4_0")
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    texts = json.loads(Path(args.texts).read_text())
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    ar = AutoRound(model, tok, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
                   batch_size=args.batch_size, dataset=texts, device_map="cpu", seed=0)
    out = Path(args.out_dir)
    ar.quantize_and_save(str(out), format=args.format)
    files = sorted(out.rglob("*.gguf"))
    print(json.dumps({"autoround_gguf": [str(f) for f in files], "seconds": round(time.perf_counter() - started, 1),
                      "iters": args.iters, "nsamples": args.nsamples, "seqlen": args.seqlen,
                      "format": args.format}), flush=True)


if __name__ == "__main__":
    main()
