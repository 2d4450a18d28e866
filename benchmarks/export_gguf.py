"""SmolLM2-135M exported to GGUF and measured in llama.cpp, side by side with torch, in one process.

    HF_HUB_OFFLINE=1 python benchmarks/export_gguf.py [--json docs/export_results.json] [--doc docs/export.md]
                                                      [--skip-chains] [--calib-blocks 64]

Run A (the dense model): torch ``eval`` and ``bench`` (fp32 eager), then ``export`` at f32, f16, q8_0, q4_0 and
q4_1 (4-bit ones with q8_0 embeddings, as llama.cpp's own q4_1 file has) each measured by ``llamacpp``
(perplexity on eval's windows, prefill/decode at bench's workload). Chains B-D: ``quantize`` (gptq g32
symmetric -> q4_0 grid; rtn g32 asymmetric -> q4_1 grid; bitsandbytes nf4) -> ``eval`` -> ``export --type auto
--embeddings q8_0`` -> ``llamacpp``. Ratios are against run A's torch figures; bytes against the f32 GGUF's size
on disk (the dense model). Writes the JSON and the measured block of docs/export.md."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docblock import write_block  # noqa: E402

DENSE_TYPES = [("f32", None), ("f16", None), ("q8_0", None), ("q4_0", "q8_0"), ("q4_1", "q8_0")]


def load_conditions() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def gguf_row(label, export_m, llama_m, dense_ppl, torch_decode, dense_bytes, torch_ppl=None):
    return {"label": label, "file_type": export_m["gguf_file_type"], "tensor_types": export_m["gguf_tensor_types"],
            "exact_grid_tensors": export_m["gguf_exact_grid_tensors"],
            "grid_min_rounded_tensors": export_m["gguf_grid_min_rounded_tensors"],
            "grid_min_rounded_examples": export_m["gguf_grid_min_rounded_examples"][:2],
            "rerounded_grid_tensors": export_m["gguf_rerounded_grid_tensors"],
            "rerounded_examples": export_m["gguf_rerounded_examples"][:2],
            "bytes": export_m["gguf_bytes"], "bytes_ratio": export_m["gguf_bytes"] / dense_bytes,
            "torch_ppl_before_export": torch_ppl,
            "ppl": llama_m["llamacpp_perplexity"], "ppl_ratio": llama_m["llamacpp_perplexity"] / dense_ppl,
            "prefill_ms": llama_m.get("llamacpp_prefill_ms"),
            "decode_tokens_per_s": llama_m.get("llamacpp_decode_tokens_per_s"),
            "decode_speedup": llama_m.get("llamacpp_decode_tokens_per_s", float("nan")) / torch_decode,
            "decode_cv": llama_m.get("llamacpp_decode_cv"), "threads": llama_m["llamacpp_threads"],
            "load": load_conditions()}


def run_dense(workdir, types=DENSE_TYPES, torch=True, bench_float=True):
    """Torch eval + bench and an f32 export (the dense bytes) when ``torch``; then each (type, embeddings)
    exported and measured by ``llamacpp``. Prints one JSON line per figure set as it is known."""
    from gptopt_core import Pipeline

    pipe = Pipeline(model="smollm2-135m", device="cpu", quiet=True)
    if torch:
        pipe.add("eval").add("bench").add("export", to=str(workdir / "dense-f32-size.gguf"), type="f32")
    for type_name, emb in types:
        pipe.add("export", to=str(workdir / f"dense-{type_name}.gguf"), type=type_name, embeddings=emb)
        pipe.add("llamacpp", bench=bench_float or type_name not in ("f32", "f16", "bf16"))
    recs = pipe.run().records
    out = {"rows": []}
    if torch:
        ev, bench = recs[0]["metrics"], recs[1]["metrics"]
        out["torch"] = {"ppl": ev["perplexity"], "eval_tokens": ev["eval_tokens"], "bytes": ev["model_bytes"],
                        "decode_tokens_per_s": bench["decode_tokens_per_s"], "prefill_ms": bench["prefill_ms"],
                        "bench_cv": bench["bench_cv"], "torch_threads": bench.get("torch_threads"),
                        "load": load_conditions()}
        out["dense_gguf_bytes"] = recs[2]["metrics"]["gguf_bytes"]
        print(json.dumps({"label": "torch", "f32_gguf_bytes": out["dense_gguf_bytes"], **out["torch"]}), flush=True)
        recs = recs[3:]
    for i, (type_name, emb) in enumerate(types):
        export_m, llama_m = recs[2 * i]["metrics"], recs[2 * i + 1]["metrics"]
        label = f"dense -> {type_name}" + (f" (embeddings {emb})" if emb else "")
        # ratios against this process's torch figures when it has them; --assemble recomputes them otherwise
        t = out.get("torch", {"ppl": 1.0, "decode_tokens_per_s": 1.0})
        row = gguf_row(label, export_m, llama_m, t["ppl"], t["decode_tokens_per_s"],
                       out.get("dense_gguf_bytes", 1), t["ppl"] if torch else None)
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
    return out


CHAINS = [
    ("gptq int4 g32 sym -> auto (q4_0 grid)",
     {"method": "gptq", "bits": 4, "group_size": 32, "symmetric": True}),
    ("rtn int4 g32 asym -> auto (q4_1 grid)",
     {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": False}),
    ("bnb nf4 -> auto (q4_1 re-rounded)", {"bits": 4}),
]


def run_chain(label, params, workdir, dense, calib_blocks):
    from gptopt_core import Pipeline

    if params.get("method") == "gptq":
        params = {**params, "calib_blocks": calib_blocks}
    target = workdir / f"chain-{len(os.listdir(workdir))}.gguf"
    started = time.perf_counter()
    res = (Pipeline(model="smollm2-135m", device="cpu", quiet=True).add("quantize", **params).add("eval")
           .add("export", to=str(target), type="auto", embeddings="q8_0").add("llamacpp").run())
    q, ev, export_m, llama_m = (r["metrics"] for r in res.records)
    row = gguf_row(label, export_m, llama_m, dense["torch"]["ppl"], dense["torch"]["decode_tokens_per_s"],
                   dense["dense_gguf_bytes"], ev["perplexity"])
    row["quantize_params"] = res.records[0]["params"]
    row["torch_ppl_ratio_before_export"] = ev["perplexity"] / dense["torch"]["ppl"]
    row["ppl_vs_torch_same_model"] = llama_m["llamacpp_perplexity"] / ev["perplexity"]
    row["chain_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(row), flush=True)
    return row


def same_model_ratio(row):
    """llama.cpp ppl over the torch ppl of the model that was exported (dense rows: the dense torch model)."""
    if row.get("ppl_vs_torch_same_model") is not None:
        return row["ppl_vs_torch_same_model"]
    before = row.get("torch_ppl_before_export")
    return row["ppl"] / before if before else None


def num(value, spec):
    return "-" if value is None or value != value else format(value, spec)


def fmt_types(types):
    return ", ".join(f"{k} x{v}" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))


def markdown(result) -> str:
    t = result["torch"]
    how = ("`HF_HUB_OFFLINE=1 python benchmarks/export_gguf.py`" if not result.get("assembled_from") else
           "`python benchmarks/export_gguf.py --part dense > dense.log` and `--part chains > chains.log` run at the "
           "same time, then `--assemble dense.log chains.log`")
    lines = ["<!-- export-gguf:start -->",
             f"Measured {result['date']} by {how} (commit "
             f"{result['commit']}, llama-cpp-python {result['llamacpp_version']}, {result['machine']}; "
             f"{result['threads']} llama.cpp threads; the machine was shared: {t['load']} at the torch bench). "
             f"Torch fp32 eager: held-out ppl **{t['ppl']:.3f}** (eval's windows"
             + (f", {t['eval_tokens']} tokens" if t.get("eval_tokens") else "") + "), "
             f"decode **{t['decode_tokens_per_s']:.1f}** tokens/s"
             + (f", prefill {t['prefill_ms']:.0f} ms" if t.get("prefill_ms") else "") + " (bench: "
             f"128-token prompt, 64 new tokens). Bytes are the file's size on disk against the f32 GGUF "
             f"({result['dense_gguf_bytes'] / 1e6:.1f} MB).", "",
             "| model -> GGUF | tensor types | grids exact / codes kept, min rounded | MB on disk | x bytes | ppl (llama.cpp) | "
             "x ppl vs dense torch | x ppl vs the torch model exported | prefill ms | decode tok/s | x decode vs "
             "torch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['label']} | {fmt_types(r['tensor_types'])} | {r['exact_grid_tensors']} / "
                     f"{r['grid_min_rounded_tensors']} | "
                     f"{r['bytes'] / 1e6:.1f} | {r['bytes_ratio']:.3f} | {r['ppl']:.3f} | {r['ppl_ratio']:.4f} | "
                     f"{num(same_model_ratio(r), '.4f')} | {num(r['prefill_ms'], '.0f')} | "
                     f"{num(r['decode_tokens_per_s'], '.1f')} | {num(r['decode_speedup'], '.2f')} |")
    lines.append("<!-- export-gguf:end -->")
    return "\n".join(lines)


def assemble(args):
    """Rows printed by ``--part dense`` and ``--part chains`` runs (one JSON object per line) into one result."""
    import subprocess

    import llama_cpp

    from gptopt_export.llamacpp import available_cores

    rows = []
    for log in args.assemble:
        rows += [json.loads(line) for line in Path(log).read_text().splitlines() if line.startswith('{"label"')]
    torch_row = next(r for r in rows if r["label"] == "torch")
    rows = [r for r in rows if r["label"] != "torch"]
    torch_ppl, torch_decode = torch_row["ppl"], torch_row["decode_tokens_per_s"]
    for r in rows:  # ratios against the torch row (parts ran as separate processes at the same time)
        r["ppl_ratio"] = r["ppl"] / torch_ppl
        r["bytes_ratio"] = r["bytes"] / torch_row["f32_gguf_bytes"]
        r["decode_speedup"] = (r["decode_tokens_per_s"] or float("nan")) / torch_decode
        if r["label"].startswith("dense"):
            r["torch_ppl_before_export"] = torch_ppl
            r["ppl_vs_torch_same_model"] = r["ppl"] / torch_ppl
        else:
            r["torch_ppl_ratio_before_export"] = r["torch_ppl_before_export"] / torch_ppl
    result = {"torch": {k: v for k, v in torch_row.items() if k not in ("label", "f32_gguf_bytes")},
              "dense_gguf_bytes": torch_row["f32_gguf_bytes"], "rows": rows, "assembled_from": [Path(p).name for p in args.assemble],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "llamacpp_version": llama_cpp.__version__, "threads": available_cores(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    write_block(Path(args.doc), "<!-- export-gguf:start -->", "<!-- export-gguf:end -->", markdown(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="docs/export_results.json")
    ap.add_argument("--doc", default="docs/export.md")
    ap.add_argument("--skip-chains", action="store_true")
    ap.add_argument("--calib-blocks", type=int, default=64, help="gptq calibration blocks (quantize's default 128)")
    ap.add_argument("--part", choices=("all", "dense", "torch", "chains"), default="all",
                    help="dense: run A only; torch: torch figures and the f32 size only; chains: B-D only "
                         "(parts run as separate processes are put together by --assemble)")
    ap.add_argument("--types", default=None,
                    help="dense part: comma-separated TYPE[:EMBEDDINGS] (default: f32,f16,q8_0,q4_0:q8_0,q4_1:q8_0)")
    ap.add_argument("--no-bench-float", action="store_true",
                    help="f32/f16 rows: perplexity only (their speed is not a figure asked for)")
    ap.add_argument("--assemble", nargs="+", metavar="LOG",
                    help="build the JSON and the doc block from the rows these runs' logs printed (parts run as "
                         "separate processes); the torch figures come back from run A's rows' ratios")
    args = ap.parse_args()
    if args.assemble:
        return assemble(args)
    import subprocess

    import llama_cpp

    from gptopt_export.llamacpp import available_cores

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gptopt-export-bench-") as tmp:
        workdir = Path(tmp)
        types = DENSE_TYPES if not args.types else [
            (t.split(":")[0], t.split(":")[1] if ":" in t else None) for t in args.types.split(",")]
        if args.part == "torch":
            result = run_dense(workdir, types=[], torch=True)
        elif args.part in ("all", "dense"):
            result = run_dense(workdir, types=types, torch=args.part == "all" or not args.types,
                               bench_float=not args.no_bench_float)
        else:  # chains alone: ratios against placeholders, recomputed by --assemble from the torch row
            result = {"torch": {"ppl": 1.0, "decode_tokens_per_s": 1.0}, "dense_gguf_bytes": 1, "rows": []}
        if not args.skip_chains and args.part in ("all", "chains"):
            for label, params in CHAINS:
                result["rows"].append(run_chain(label, params, workdir, result, args.calib_blocks))
    result.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                        text=True).stdout.strip(),
                  llamacpp_version=llama_cpp.__version__, threads=available_cores(),
                  machine=f"{platform.machine()}, {os.cpu_count()} cores", seconds=round(time.perf_counter() - started))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json} ({result['seconds']} s)")
    write_block(Path(args.doc), "<!-- export-gguf:start -->", "<!-- export-gguf:end -->", markdown(result))


if __name__ == "__main__":
    main()
