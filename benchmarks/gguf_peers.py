"""gptopt's GGUF files against llama.cpp's own quantizer (with and without an importance matrix) and AutoRound,
SmolLM2-135M, every file measured the same way in llama.cpp, in one run:

    HF_HUB_OFFLINE=1 python benchmarks/gguf_peers.py [--autoround-python /path/venv/bin/python]
                     [--json docs/gguf_peers.json] [--doc docs/export.md] [--parts dense,llamacpp,autoround,gptq]

Rows (each: file bytes, bits per weight over the 2-D tensors, llama.cpp perplexity on the ``llamacpp`` step's
held-out windows, decode tokens/s on bench's workload, the tensor types the file really holds):

* f16: gptopt's export of the dense model (the reference; also the input of llama.cpp's quantizer);
* llama.cpp: ``llama_model_quantize`` from that f16 file, q8_0 / q4_0 / q4_1 / q5_0 / iq4_nl / q4_k_m, each without
  and with the importance matrix ``export --imatrix`` wrote from gptopt's calibration on the train split;
* AutoRound (its own environment, ``--autoround-python``): GGUF q4_0, ``iters=0`` and tuned (``--ar-iters``), and
  q4_1 tuned;
* gptopt: the dense model exported as q8_0 / q4_0 / q4_1 / iq4_nl / q4_k / q5_k / q6_k, mixed by ``--plan auto``
  (imatrix-weighted q4_0, the most sensitive tensors q8_0, within q4_k_m's size), and quantize chains
  (RTN, GPTQ with and without act-order, mse and hmse observers; GPTQ int8) written from their codes.

4-bit rows carry q8_0 token embeddings (llama.cpp's quantizer gives SmolLM2's tied 576-wide embedding q8_0: its
q6_K choice falls back because 576 is not a multiple of 256). Writes the JSON and the peer block of docs/export.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docblock import write_block  # noqa: E402

LLAMACPP_TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "iq4_nl", "q4_k_m"]
#: (type, embeddings, weight the re-rounding by the imatrix, --plan auto budget in bits per weight or None)
PLAN_BPW = 6.15  # --plan auto rows: at most llama.cpp q4_k_m's size (6.159 bits per weight on SmolLM2-135M)
DENSE = [("q8_0", None, False, None), ("q4_0", "q8_0", False, None), ("q4_0", "q8_0", True, None),
         ("q4_1", "q8_0", False, None), ("q4_1", "q5_0", False, None), ("iq4_nl", "q8_0", False, None),
         ("iq4_nl", "q8_0", True, None),
         ("q4_k", "q8_0", False, None), ("q5_k", "q8_0", False, None), ("q6_k", "q8_0", False, None),
         ("q4_0", "q8_0", True, PLAN_BPW)]
G32 = {"bits": 4, "group_size": 32}
CHAINS = [
    ("rtn g32 sym, mse observer -> q4_0 codes", {"method": "rtn", **G32, "symmetric": True, "observer": "mse"}),
    ("gptq g32 sym, act-order -> q4_0 codes", {"method": "gptq", **G32, "symmetric": True}),
    ("gptq g32 sym, no act-order -> q4_0 codes", {"method": "gptq", **G32, "symmetric": True, "act_order": False}),
    ("gptq g32 sym, mse observer -> q4_0 codes", {"method": "gptq", **G32, "symmetric": True, "observer": "mse"}),
    ("gptq g32 sym, hmse observer -> q4_0 codes", {"method": "gptq", **G32, "symmetric": True, "observer": "hmse"}),
    ("gptq int8 g32 sym -> q8_0 codes", {"method": "gptq", "bits": 8, "group_size": 32, "symmetric": True}),
]
START, END = "<!-- gguf-peers:start -->", "<!-- gguf-peers:end -->"
BENCH = {"warmup": 1, "repeats": 3}  # llamacpp step's decode timing (its defaults: 2 and 5); the machine is shared


def file_row(label, source, path, llama_m, **extra):
    from gptopt_export.quantize_llamacpp import tensor_types, weight_bits

    row = {"label": label, "source": source, "bytes": Path(path).stat().st_size, "bits_per_weight": weight_bits(path),
           "tensor_types": tensor_types(path), "ppl": llama_m.get("llamacpp_perplexity"),
           "eval_tokens": llama_m.get("llamacpp_eval_tokens"),
           "decode_tokens_per_s": llama_m.get("llamacpp_decode_tokens_per_s"),
           "prefill_ms": llama_m.get("llamacpp_prefill_ms"), "decode_cv": llama_m.get("llamacpp_decode_cv"), **extra}
    print(json.dumps(row), flush=True)
    return row


def run_dense(work: Path, args):
    """torch eval, f16 export + imatrix, gptopt's dense exports; every file measured by ``llamacpp``."""
    from gptopt_core import Pipeline

    pipe = Pipeline(model=args.model, device="cpu", quiet=True).add("eval")
    pipe.add("export", to=str(work / "f16.gguf"), type="f16", imatrix=str(work / "imatrix.gguf"),
             imatrix_blocks=args.imatrix_blocks, imatrix_seq_len=args.imatrix_seq_len).add("llamacpp", **BENCH)
    for t, emb, weighted, bpw in DENSE:
        plan = {"plan": "auto", "max_bpw": bpw} if bpw else {}
        pipe.add("export", to=str(work / dense_name(t, emb, weighted, bpw)), type=t, embeddings=emb,
                 imatrix_in=str(work / "imatrix.gguf") if weighted else None, **plan).add("llamacpp", **BENCH)
    recs = [r["metrics"] for r in pipe.run().records]
    torch_m, f16_export = recs[0], recs[1]
    rows = [file_row("f16 (gptopt export of the dense model)", "reference", work / "f16.gguf", recs[2])]
    for i, (t, emb, weighted, bpw) in enumerate(DENSE):
        ex, lm = recs[3 + 2 * i], recs[4 + 2 * i]
        label = f"gptopt dense -> {t}" + (" imatrix-weighted" if weighted else "") + (
            f" (embeddings {emb})" if emb else "") + (
            f", --plan auto: {ex['gguf_plan_upgraded']} tensors q8_0, <= {bpw} bits/weight" if bpw else "")
        rows.append(file_row(label, "gptopt", work / dense_name(t, emb, weighted, bpw), lm,
                             fallback_tensors=ex.get("gguf_fallback_tensors"),
                             imatrix_weighted_tensors=ex.get("gguf_imatrix_weighted_tensors"),
                             produce_seconds=ex["export_seconds"],
                             plan={k: v for k, v in ex.items() if k.startswith("gguf_plan") and k not in (
                                 "gguf_plan_sensitivity",)} or None,
                             command=f"gptopt run --model smollm2-135m export --to m.gguf --type {t}"
                                     + (f" --embeddings {emb}" if emb else "")
                                     + (" --imatrix-in imatrix.gguf" if weighted else "")
                                     + (f" --plan auto --max-bpw {bpw}" if bpw else "") + " llamacpp"))
    info = {"torch_ppl": torch_m["perplexity"], "eval_tokens": torch_m.get("eval_tokens"),
            "imatrix": {k: v for k, v in f16_export.items() if k.startswith("imatrix_")}}
    return rows, info


def dense_name(t, emb, weighted, bpw) -> str:
    return f"gptopt-{t}-emb{emb}{'-w' if weighted else ''}{f'-plan{bpw}' if bpw else ''}.gguf"


def run_llamacpp(work: Path, args):
    """llama.cpp's quantizer on the f16 file, without and with gptopt's imatrix; then all measured at once."""
    from gptopt_core import Pipeline
    from gptopt_export.quantize_llamacpp import quantize

    made = []
    for t in LLAMACPP_TYPES:
        for im in (None, work / "imatrix.gguf"):
            out = work / f"llamacpp-{t}{'-imatrix' if im else ''}.gguf"
            q = quantize(work / "f16.gguf", out, t, imatrix=im, nthread=args.threads)
            made.append((f"llama.cpp {t}" + (" + imatrix (gptopt calibration)" if im else ""), out, q))
    return measure_files(made, "llama.cpp", args,
                         lambda label, q: {"produce_seconds": q["seconds"], "imatrix_entries": q["imatrix_entries"]})


def measure_files(made, source, args, extra):
    from gptopt_core import Pipeline

    pipe = Pipeline(model=args.model, device="cpu", quiet=True)
    for _, path, _ in made:
        pipe.add("llamacpp", file=str(path), **BENCH)
    recs = [r["metrics"] for r in pipe.run().records]
    return [file_row(label, source, path, m, **extra(label, q)) for (label, path, q), m in zip(made, recs)]


def run_autoround(work: Path, args):
    """AutoRound GGUF q4_0 (iters=0, then tuned) and q4_1 (tuned) in its own environment; calibration = gptopt's
    train split."""
    from gptopt_core import TextData, smollm2_dir

    texts = work / "train.json"
    texts.write_text(json.dumps(TextData.load(args.data).train_docs))
    made = []
    configs = [(0, args.ar_nsamples, 512, "q4_0")] + ([(args.ar_iters, args.ar_nsamples, args.ar_seqlen, fmt)
                                                      for fmt in ("q4_0", "q4_1")] if args.ar_iters > 0 else [])
    for iters, nsamples, seqlen, fmt in configs:
        out = work / f"autoround-{fmt}-{iters}"
        cmd = [args.autoround_python, str(Path(__file__).with_name("gguf_peers_autoround.py")), "--model-dir",
               str(smollm2_dir()), "--texts", str(texts), "--out-dir", str(out), "--format", f"gguf:{fmt}",
               "--iters", str(iters), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--batch-size",
               str(min(8, nsamples))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith('{"autoround_gguf"')]
        if proc.returncode or not lines or not lines[0]["autoround_gguf"]:
            print(json.dumps({"autoround_failed": iters, "stderr_tail": proc.stderr[-1500:]}), flush=True)
            continue
        made.append((f"AutoRound 0.16 {fmt}, iters={iters}" + (f", nsamples={nsamples}, seqlen={seqlen}"),
                     Path(lines[0]["autoround_gguf"][0]), lines[0]))
    return measure_files(made, "AutoRound", args, lambda label, q: {"produce_seconds": q["seconds"], "autoround": q})


def run_chains(work: Path, args):
    from gptopt_core import Pipeline

    rows = []
    for i, (label, params) in enumerate(CHAINS):
        if args.chains and not any(c in label for c in args.chains.split("|")):
            continue
        if params["method"] == "gptq":
            params = {**params, "calib_blocks": args.calib_blocks}
        path = work / f"chain-{i}.gguf"
        res = (Pipeline(model=args.model, device="cpu", quiet=True).add("quantize", **params).add("eval")
               .add("export", to=str(path), type="auto", embeddings="q8_0").add("llamacpp", **BENCH).run())
        q, ev, ex, lm = (r["metrics"] for r in res.records)
        flags = " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                         f"--{'' if v else 'no-'}{k.replace('_', '-')}" for k, v in params.items())
        rows.append(file_row("gptopt " + label, "gptopt", path, lm, torch_ppl_before_export=ev["perplexity"],
                             exact_grid_tensors=ex["gguf_exact_grid_tensors"],
                             min_rounded_tensors=ex["gguf_grid_min_rounded_tensors"],
                             produce_seconds=round(res.records[0].get("seconds", 0) or 0, 1),
                             quantize_metrics={k: v for k, v in q.items() if isinstance(v, (int, float, str))},
                             command=f"gptopt run --model smollm2-135m quantize {flags} export --to m.gguf "
                                     f"--embeddings q8_0 llamacpp"))
    return rows


Q4_1_ORIGIN = ("rests on q4_1 blocks: SmolLM2's weights were de-quantized from a Q4_1 file, so a q4_1 "
               "re-quantization recovers them almost exactly; on another model this margin is not expected")


def origin_caveat(row) -> str | None:
    """The Q4_1-origin caveat for a claim that a file using q4_1 blocks beats another file, else None."""
    return Q4_1_ORIGIN if row and row.get("tensor_types", {}).get("q4_1") else None


def figures(rows) -> dict:
    """The issue's figures: gptopt's best file at <= a peer's bytes against that peer, by perplexity."""
    by = {r["label"]: r for r in rows}
    mine = [r for r in rows if r["source"] == "gptopt" and r.get("ppl")]
    out = {}

    def best_within(budget):
        fit = [r for r in mine if r["bytes"] <= budget]
        return min(fit, key=lambda r: r["ppl"]) if fit else None

    for peer in [r for r in rows if r["source"] in ("llama.cpp", "AutoRound") and r.get("ppl")]:
        b = best_within(peer["bytes"])
        out[peer["label"]] = {"peer_ppl": peer["ppl"], "peer_bytes": peer["bytes"],
                              "gptopt_best": b and b["label"], "gptopt_ppl": b and b["ppl"],
                              "gptopt_bytes": b and b["bytes"],
                              "ppl_ratio": b and b["ppl"] / peer["ppl"], "beats": bool(b and b["ppl"] < peer["ppl"])}
        if origin_caveat(b):
            out[peer["label"]]["caveat"] = origin_caveat(b)
    ar0 = next((r for r in rows if r["source"] == "AutoRound" and "iters=0" in r["label"]), None)
    if ar0:  # cost: each gptopt quantize chain's quantize step against AutoRound iters=0's whole run
        out["cost vs AutoRound iters=0"] = {r["label"]: round(r["produce_seconds"] / ar0["produce_seconds"], 2)
                                            for r in mine if "quantize_metrics" in r}
    f16 = next((r for r in rows if r["source"] == "reference"), None)
    q8 = [r for r in mine if set(r["tensor_types"]) <= {"q8_0", "f32"}]  # every weight q8_0
    if f16 and q8:
        best = min(q8, key=lambda r: r["ppl"])
        out["gptopt q8_0 vs f16"] = {"file": best["label"], "ratio": best["ppl"] / f16["ppl"], "target": 1.002,
                                     "beats": best["ppl"] / f16["ppl"] <= 1.002,
                                     "dense_ratio": next((r["ppl"] / f16["ppl"] for r in q8
                                                          if r["label"].startswith("gptopt dense")), None)}
    return out


def fmt_types(types):
    return ", ".join(f"{k} x{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))


def num(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(result) -> str:
    rows = sorted(result["rows"], key=lambda r: (r["bytes"], r["ppl"] or 0))
    head = [START, f"Measured {result['date']} by `{result['command']}` (commit {result['commit']}, llama-cpp-python "
            f"{result['llamacpp_version']}, {result['machine']}, {result['threads']} llama.cpp threads; "
            f"{result['load']}; {result['seconds']} s). SmolLM2-135M, llama.cpp perplexity on the `llamacpp` step's "
            f"held-out windows ({result['eval_tokens']} tokens, the tokens `eval` scores; torch fp32 "
            f"{result['torch_ppl']:.3f}). imatrix: `export --imatrix` from {result['imatrix'].get('imatrix_tokens')} "
            f"train-split tokens. Sorted by size; bits/weight over the 2-D tensors.", "",
            "| file | source | MB | bits/weight | ppl (llama.cpp) | x f16 | decode tok/s | tensor types |",
            "|---|---|---|---|---|---|---|---|"]
    f16 = next(r for r in rows if r["source"] == "reference")["ppl"]
    lines = [f"| {r['label']} | {r['source']} | {r['bytes'] / 1e6:.2f} | {r['bits_per_weight']:.3f} | "
             f"{num(r['ppl'], '.3f')} | {num(r['ppl'] and r['ppl'] / f16, '.4f')} | "
             f"{num(r['decode_tokens_per_s'], '.1f')} | {fmt_types(r['tensor_types'])} |" for r in rows]
    fig = ["", "| peer | its bytes | its ppl | gptopt's best file at <= those bytes | its ppl | x peer ppl |",
           "|---|---|---|---|---|---|"]
    for peer, f in result["figures"].items():
        if "peer_ppl" in f:
            note = " (beats; q4_1 blocks: near-exact on this Q4_1-origin model)" if f["beats"] and f.get("caveat") \
                else " (beats)" if f["beats"] else ""
            fig.append(f"| {peer} | {f['peer_bytes']:,} | {f['peer_ppl']:.3f} | {f['gptopt_best'] or '-'} | "
                       f"{num(f['gptopt_ppl'], '.3f')} | {num(f['ppl_ratio'], '.4f')}{note} |")
    cost = result["figures"].get("cost vs AutoRound iters=0")
    if cost:
        fig.append("\nquantize wall time over AutoRound iters=0's: " + "; ".join(f"{k}: x{v}" for k, v in cost.items()))
    q8 = result["figures"].get("gptopt q8_0 vs f16")
    if q8:
        fig.append(f"\ngptopt q8_0 vs f16 in llama.cpp: x{q8['ratio']:.4f} ({q8.get('file', 'dense')}; target <= "
                   f"x1.002)" + (f"; the dense model re-rounded to q8_0: x{q8['dense_ratio']:.4f}"
                                 if q8.get("dense_ratio") else ""))
    return "\n".join(head + lines + fig + [END])


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="builtin:pydoc")
    ap.add_argument("--json", default="docs/gguf_peers.json")
    ap.add_argument("--doc", default="docs/export.md")
    ap.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    ap.add_argument("--parts", default="dense,llamacpp,autoround,gptq",
                    help="comma-separated parts to run (llamacpp needs dense's f16 file and imatrix in --workdir)")
    ap.add_argument("--redoc", action="store_true", help="recompute the figures from --json's stored rows and rewrite "
                                                        "the JSON and the doc block (nothing is measured again)")
    ap.add_argument("--assemble", nargs="+", metavar="LOG", help="build the JSON and doc block from the rows earlier "
                                                                 "runs printed (one JSON object per line)")
    ap.add_argument("--imatrix-blocks", type=int, default=16)
    ap.add_argument("--imatrix-seq-len", type=int, default=512)
    ap.add_argument("--chains", default="", help="gptq part: only the chains whose label holds one of these "
                                                 "|-separated strings")
    ap.add_argument("--calib-blocks", type=int, default=64, help="gptq calibration blocks (of 128 tokens)")
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp quantizer threads (0: all)")
    ap.add_argument("--autoround-python", default=None, help="python of AutoRound's environment (no: skip)")
    ap.add_argument("--ar-iters", type=int, default=50, help="AutoRound's tuned row (0: only the iters=0 row)")
    ap.add_argument("--ar-nsamples", type=int, default=32)
    ap.add_argument("--ar-seqlen", type=int, default=256)
    return ap.parse_args()


def main():
    args = parse_args()
    parts = set(filter(None, args.parts.split(",")))
    import llama_cpp

    from gptopt_export.llamacpp import available_cores

    if args.redoc:
        result = json.loads(Path(args.json).read_text())
        result["figures"] = figures(result["rows"])
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        write_block(Path(args.doc), START, END, markdown(result))
        return
    started = time.perf_counter()
    rows, info = [], {}
    if args.assemble:
        for log in args.assemble:
            for line in Path(log).read_text().splitlines():
                if line.startswith('{"label"'):
                    rows.append(json.loads(line))
                elif line.startswith('{"info"'):
                    info.update(json.loads(line)["info"])
    else:
        with tempfile.TemporaryDirectory(prefix="gptopt-peers-") as tmp:
            work = Path(args.workdir or tmp)
            work.mkdir(parents=True, exist_ok=True)
            if "dense" in parts:
                rows, info = run_dense(work, args)
                print(json.dumps({"info": info}), flush=True)
            if "llamacpp" in parts:
                rows += run_llamacpp(work, args)
            if "autoround" in parts and args.autoround_python:
                rows += run_autoround(work, args)
            if "gptq" in parts:
                rows += run_chains(work, args)
    one, five, _ = os.getloadavg()
    result = {**info, "rows": rows, "figures": figures(rows), "command": "python " + " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "llamacpp_version": llama_cpp.__version__, "threads": available_cores(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "load": f"load average {one:.1f} / {five:.1f} (1 / 5 min) at the end, machine shared",
              "seconds": round(time.perf_counter() - started), "assembled_from": args.assemble}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} ({result['seconds']} s)")
    write_block(Path(args.doc), START, END, markdown(result))


if __name__ == "__main__":
    main()
