"""Save formats on SmolLM2-135M: bytes on disk against model_bytes before save, perplexity after reload.

For each recipe in recipes/ whose grid or sparsity compressed-tensors holds and that runs without training (its own
steps minus ``bench``), and RTN int4 g64 symmetric models (with and without ``--embeddings 8``), this runs the
chain, then ``save`` (``--format auto``, and ``--format compressed-tensors`` for pruned models) and measures:

* ``model_bytes`` the chain reported before ``save`` and the bytes of the ``*.safetensors`` files written;
* held-out perplexity of the saved model (``eval``), of ``gptopt run --model DIR`` and of plain
  ``AutoModelForCausalLM.from_pretrained(DIR)`` (same windows: block 512, 4096 tokens; the route transformers took:
  its default one, or ``dequantize`` where the config says so - see docs/save-formats.md);
* for pruned models, whether the reloaded zeros are exactly the pruning masks;
* refusals (format, one line) where a format cannot hold the model.

    python benchmarks/save_formats.py                 # all rows (~40 CPU-minutes on 2 shared cores)
    python benchmarks/save_formats.py --only 09 rtn   # some rows; the others are kept from the JSON

Writes docs/save_formats.json and the measured block of docs/save-formats.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "docs" / "save_formats.json"
DOC = ROOT / "docs" / "save-formats.md"
START, END = "<!-- save-formats:measured:start -->", "<!-- save-formats:measured:end -->"
RECIPES = ["07-magnitude-50", "08-wanda-50", "09-wanda-2of4", "13-gptq-int4-g64", "14-sparsegpt-2of4"]
BNB = ("bitsandbytes {}: a codebook / absmax format compressed-tensors does not hold (refused before the model "
       "loads: tests/test_bad_input.py 'save: nf4 as compressed-tensors'); save --format auto writes it with "
       "transformers' BitsAndBytesConfig")
SKIPPED = {"02-int8": BNB.format("int8"), "03-nf4": BNB.format("nf4"),
           "04-nf4-emb8": "bitsandbytes nf4 with int8 embeddings: not held by compressed-tensors (refused before the "
                          "model loads), and one BitsAndBytesConfig cannot describe it, so safetensors refuses it "
                          "unless --allow-dequantized (tested on the tiny models)",
           "05-fp4": BNB.format("fp4"),
           "06-planned-partial": "bitsandbytes plan with int8 embeddings: not held by compressed-tensors, refused "
                                 "by safetensors unless --allow-dequantized (tested on the tiny models)",
           "10-wanda-50-lora": "trains (LoRA); its merged pruned model is written like 08",
           "11-nf4-qlora": "trains (QLoRA) on an nf4 base: not held by compressed-tensors",
           "12-l1-ft-magnitude-50": "trains 45 steps (~13 CPU-min); its pruned model is written like 08"}
RTN_G64 = {"method": "rtn", "bits": 4, "group_size": "64", "symmetric": True}
SPARSEGPT_24 = {"method": "sparsegpt", "pattern": "2:4"}
EXTRA = {"rtn-int4-g64-sym": [("quantize", RTN_G64)],
         "rtn-int4-g64-sym+emb-int8": [("quantize", {**RTN_G64, "embeddings": "8"})],
         # 2:4 sparse on int4 grids: the zeros live in the packed codes, which every compressed-tensors reader reads
         "sparsegpt-2of4+rtn-int4-g64": [("prune", SPARSEGPT_24), ("quantize", RTN_G64)],
         "sparsegpt-2of4+gptq-int4-g64": [("prune", SPARSEGPT_24), ("quantize", {**RTN_G64, "method": "gptq"})],
         "sparsegpt-2of4-joint-int4-g64": [("prune", {**SPARSEGPT_24, "quantize_bits": 4, "group_size": 64})]}


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*.safetensors"))


def one_line(exc) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def steps_of(name: str):
    import yaml

    if name in EXTRA:
        return EXTRA[name]
    recipe = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())
    steps = []
    for entry in recipe["steps"]:
        (step, params), = entry.items()
        if step not in ("bench", "eval"):
            steps.append((step, params or {}))
    return steps


def zeros_exact(before, after) -> bool:
    import torch

    from gptopt_core import weight_modules

    b = dict(weight_modules(before))
    return all(torch.equal(m.weight == 0, b[n].weight == 0) for n, m in weight_modules(after))


def reload_ppl(path: Path, data, saved_model, pruned: bool) -> dict:
    from transformers import AutoModelForCausalLM

    from gptopt_core import Pipeline, perplexity

    out = {}
    again = Pipeline(model=str(path), device="cpu", quiet=True).add("eval").run()
    out["gptopt_ppl"] = again.records[0]["metrics"]["perplexity"]
    out["gptopt_model_bytes"] = again.records[0]["metrics"]["model_bytes"]
    out["gptopt_sparsity"] = again.records[0]["metrics"]["sparsity"]
    if pruned:
        out["zeros_exact"] = zeros_exact(saved_model, again.model)
    del again
    try:
        plain, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
        left = sorted(info.get("missing_keys") or []) + sorted(info.get("mismatched_keys") or [])
        if left:  # transformers initialised these at random: its perplexity would measure nothing
            out["plain_error"] = f"transformers left {len(left)} tensors uninitialised (e.g. {left[0]})"
            return out
        qc = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        out["plain_route"] = "dequantize" if qc.get("dequantize") else "default"
        out["plain_ppl"] = perplexity(plain, data.valid_ids, 512, 512, 4096)["perplexity"]
        if pruned:
            out["plain_zeros_exact"] = zeros_exact(saved_model, plain)
    except Exception as exc:  # transformers cannot read every layout; record what it said
        out["plain_error"] = one_line(exc)
    return out


def measure(name: str, workdir: Path) -> dict:
    from gptopt_core import GptoptError, Pipeline

    steps = steps_of(name)
    pipe = Pipeline(model="smollm2-135m", data="builtin:pydoc", seed=0, device="cpu", quiet=True)
    for step, params in steps:
        pipe.add(step, **params)
    pipe.add("eval")
    t0 = time.perf_counter()
    res = pipe.run()
    row = {"recipe": name, "steps": [{s: p} for s, p in steps], "chain_seconds": round(time.perf_counter() - t0, 1),
           "model_bytes": res.records[-1]["metrics"]["model_bytes"], "ppl": res.records[-1]["metrics"]["perplexity"],
           "sparsity": res.records[-1]["metrics"]["sparsity"], "facts": sorted(res.ctx.facts), "saves": {}}
    pruned = "masks" in res.ctx.facts
    formats = ["auto", "compressed-tensors"] if pruned and "quantized:grid" not in res.ctx.facts else ["auto"]
    if any(f in res.ctx.facts for f in ("quantized:4bit", "quantized:8bit")):
        formats.append("compressed-tensors")  # expect a refusal: bitsandbytes codebooks
    from gptopt_core import check_save_format, choose_save_format, get_plugins

    for fmt in formats:
        target = workdir / f"{name}-{fmt}"
        entry: dict = {}
        try:
            options = {"to": str(target), "format": fmt, "overwrite": False, "allow_dequantized": False}
            check_save_format(get_plugins(), options, res.ctx.facts)
            chosen = choose_save_format(res.ctx, res.model, options)
            step = pipe.plugins.step_class("save")(to=str(target), format=fmt)
            metrics = step.apply(res.ctx)
            entry.update(format=chosen.name, disk_bytes=safetensors_bytes(target))
            entry["disk_vs_model_bytes"] = entry["disk_bytes"] / row["model_bytes"]
            entry.update(reload_ppl(target, res.ctx.data, res.model, pruned))
            for key in ("gptopt_ppl", "plain_ppl"):
                if key in entry:
                    entry[key.replace("_ppl", "_ppl_ratio")] = entry[key] / row["ppl"]
            entry["files"] = metrics["files"]
            if fmt == "compressed-tensors" or entry["format"] == "compressed-tensors":
                cfg = json.loads((target / "config.json").read_text())["quantization_config"]
                entry["quantization_config"] = cfg
                entry["schema_valid"] = validate(cfg)
        except GptoptError as exc:
            entry["refused"] = one_line(exc)
        row["saves"][fmt] = entry
        shutil.rmtree(target, ignore_errors=True)
    return row


def validate(cfg) -> bool:
    """compressed-tensors' own pydantic models accept the written config."""
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationConfig

    if cfg.get("config_groups"):
        QuantizationConfig.model_validate(cfg)
    sc = cfg.get("sparsity_config") or {}
    if sc:
        SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    return True


def dense_bytes(workdir: Path) -> int:
    from gptopt_core import Pipeline

    target = workdir / "dense"
    Pipeline(model="smollm2-135m", device="cpu", quiet=True).add("save", to=str(target)).run()
    size = safetensors_bytes(target)
    shutil.rmtree(target, ignore_errors=True)
    return size


def num(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if abs(v) < 1e6 else f"{v:.3g}"


def table(result) -> str:
    dense = result["dense_safetensors_bytes"]
    lines = ["| chain | format | model_bytes before save | on disk | disk / model_bytes | disk / dense | ppl saved | "
             "ppl `gptopt run --model DIR` | ppl plain `from_pretrained` | zeros exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        for fmt, e in row["saves"].items():
            if "refused" in e:
                lines.append(f"| {row['recipe']} | {fmt}: refused | {row['model_bytes'] / 1e6:.1f} MB | - | - | - | "
                             f"{row['ppl']:.3f} | - | - | - |")
                continue
            route = ", de-quantized" if e.get("plain_route") == "dequantize" else ""
            plain = f"{num(e['plain_ppl'])} (x{num(e['plain_ppl_ratio'], 5)}{route})" if "plain_ppl" in e else \
                "cannot read (see below)"
            zeros = "-" if "zeros_exact" not in e else ("yes" if e["zeros_exact"] else "NO")
            lines.append(f"| {row['recipe']} | {fmt} -> {e['format']} | {row['model_bytes'] / 1e6:.1f} MB | "
                         f"{e['disk_bytes'] / 1e6:.1f} MB | {e['disk_vs_model_bytes']:.3f} | "
                         f"{e['disk_bytes'] / dense:.3f} | {row['ppl']:.3f} | {e['gptopt_ppl']:.3f} "
                         f"(x{e['gptopt_ppl_ratio']:.5f}) | {plain} | {zeros} |")
    return "\n".join(lines)


def verdicts(result) -> list[str]:
    """The issue's figures, each computed from the rows: met / not met, with the number."""
    dense = result["dense_safetensors_bytes"]
    out = []
    for row in result["rows"]:
        for fmt, e in row["saves"].items():
            if "refused" in e or e.get("format") != "compressed-tensors":
                continue
            ratio = e["gptopt_ppl_ratio"]
            parts = [f"reloaded ppl x{ratio:.5f} ({'met' if abs(ratio - 1) <= 0.001 else 'NOT met'}: within 0.1 %)"]
            if "quantized:grid" in row["facts"]:
                d = e["disk_vs_model_bytes"]
                parts.insert(0, f"disk / model_bytes {d:.3f} ({'met' if abs(d - 1) <= 0.05 else 'NOT met'}: within 5 %)")
            if "int4" in row["recipe"] and "g64" in row["recipe"]:
                r = e["disk_bytes"] / dense
                parts.append(f"disk / dense {r:.3f} ({'met' if r <= 0.30 else 'NOT met'}: <= 0.30)")
            if "masks" in row["facts"] and "quantized:grid" not in row["facts"]:
                parts.append(f"disk / dense {e['disk_bytes'] / dense:.3f} ("
                             f"{'met' if e['disk_bytes'] < dense else 'NOT met'}: smaller than dense), zeros after "
                             f"reload {'exactly the masks' if e.get('zeros_exact') else 'NOT the masks'}")
            if "masks" in row["facts"] and "quantized:grid" in row["facts"] and "plain_zeros_exact" in e:
                exact = "exactly the saved model's" if e["plain_zeros_exact"] else "NOT the saved model's"
                parts.append(f"zeros after plain from_pretrained {exact} (sparsity {row['sparsity']:.4f}: the "
                             "masks and kept weights that round to zero)")
            if "plain_ppl_ratio" in e:
                parts.append(f"plain from_pretrained x{num(e['plain_ppl_ratio'], 5)}")
            out.append(f"- {row['recipe']} ({fmt}): " + "; ".join(parts))
    return out


def commits(result) -> str:
    """Which commit measured which rows (rows merged from several runs), e.g. ``commit abc (07, 14), def (13)``."""
    by: dict = {}
    for row in result["rows"]:
        by.setdefault(row.get("commit") or result["commit"], []).append(row["recipe"].split("-")[0]
                                                                          if row["recipe"][:2].isdigit()
                                                                          else row["recipe"])
    if len(by) == 1:
        return f"commit {next(iter(by))}"
    return "rows at commit " + ", ".join(f"{c} ({', '.join(names)})" for c, names in by.items())


def block(result) -> str:
    notes = []
    for row in result["rows"]:
        for fmt, e in row["saves"].items():
            if "refused" in e:
                notes.append(f"- {row['recipe']} `--format {fmt}`: {e['refused']}")
            elif "plain_error" in e:
                notes.append(f"- {row['recipe']} plain `from_pretrained`: {e['plain_error']}")
    skipped = [f"- {k}: not run ({v})" for k, v in result["skipped"].items()]
    measured = {r["recipe"] for r in result["rows"]}
    skipped += [f"- {n}: not measured in this run (`python benchmarks/save_formats.py --only {n[:2]}`)"
                for n in RECIPES if n not in measured]
    skipped += [f"- {r['recipe']}: {r['source']}" for r in result["rows"] if r.get("source")]
    return "\n".join([
        START, "",
        f"Measured {result['date']} on {result['machine']}, {commits(result)}, compressed-tensors "
        f"{result['versions']['compressed-tensors']}, transformers {result['versions']['transformers']}; "
        f"`python benchmarks/save_formats.py` (held-out pydoc, block 512, 4096 tokens). Dense fp32 safetensors: "
        f"{result['dense_safetensors_bytes'] / 1e6:.1f} MB.", "",
        table(result), "", "Against the issue's figures (computed from the rows above):", "", *verdicts(result), "",
        "Refusals and loader limits, as printed:", "", *notes, "", *skipped, "", END])


def main(argv=None):
    import importlib.metadata as md

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="row names (prefix match) to re-measure; others kept")
    parser.add_argument("--json", type=Path, default=OUT, help="results file (default docs/save_formats.json)")
    parser.add_argument("--merge", type=Path, nargs="*", default=[],
                        help="results files of other runs (e.g. rows measured in parallel) whose rows are taken")
    parser.add_argument("--commit", default=None,
                        help="the source tree's commit where it is no git checkout (e.g. a git archive)")
    args = parser.parse_args(argv)
    old = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    names = RECIPES + list(EXTRA)
    chosen = [n for n in names if not args.only or any(n.startswith(o) for o in args.only)]
    if args.merge and args.only is None:
        chosen = []
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                           text=True).stdout.strip()
    rows = {r["recipe"]: {"commit": old.get("commit"), **r} for r in old.get("rows", [])}
    for other in args.merge:
        merged = json.loads(other.read_text())
        rows.update({r["recipe"]: {"commit": merged.get("commit"), **r} for r in merged["rows"]})
        old.setdefault("dense_safetensors_bytes", merged.get("dense_safetensors_bytes"))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dense = old.get("dense_safetensors_bytes") if (args.only or args.merge) and old.get(
            "dense_safetensors_bytes") else dense_bytes(workdir)
        for name in chosen:
            print(f"== {name}", flush=True)
            rows[name] = {**measure(name, workdir), "commit": commit}
            print(json.dumps(rows[name], default=str), flush=True)
            partial = {**old, "dense_safetensors_bytes": dense, "rows": [rows[n] for n in names if n in rows]}
            args.json.write_text(json.dumps(partial, indent=1, default=str) + "\n")  # a stopped run keeps its rows
    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "commit": commit,
              "machine": f"{platform.machine()} CPU, torch threads {__import__('torch').get_num_threads()}",
              "versions": {d: md.version(d) for d in ("compressed-tensors", "transformers", "torch")},
              "dense_safetensors_bytes": dense, "skipped": SKIPPED,
              "rows": [rows[n] for n in names if n in rows]}
    args.json.write_text(json.dumps(result, indent=1, default=str) + "\n")
    if args.json == OUT:
        from docblock import write_block

        write_block(DOC, START, END, block(result))


if __name__ == "__main__":
    main()
