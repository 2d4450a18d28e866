"""Bad input across the core and every plugin, run as a user runs it: one clear line on stderr, exit code 2,
no traceback, nothing written (the --out dir and every other file unchanged)."""
import pytest
from conftest import error_lines, run_gptopt


def run_in_process(*args, cwd):
    """``gptopt`` through its console entry point (``gptopt_core.cli.main``) in this process: the same code path
    as the installed script without a ~0.5 s interpreter start per case (the round-2 cases use it)."""
    import contextlib
    import io
    import os
    import signal
    import types
    import warnings

    from gptopt_core.cli import main

    err, saved = io.StringIO(), (os.getcwd(), signal.getsignal(signal.SIGTERM), warnings.showwarning,
                                 signal.getsignal(signal.SIGHUP))
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code
    finally:
        os.chdir(saved[0])
        signal.signal(signal.SIGTERM, saved[1])
        signal.signal(signal.SIGHUP, saved[3])  # main() handles SIGHUP like SIGTERM
        warnings.showwarning = saved[2]
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def _corrupt_model_dir(tmp_path):
    from gptopt_core.kit.models import tiny_model

    model, tok = tiny_model("tiny-random-gpt2")
    d = tmp_path / "corrupt"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return d


CASES = {
    "missing model path": (lambda p: ["--model", "./no/such/model", "eval"], "not found"),
    "dir without config.json": (lambda p: ["--model", p / "empty", "eval"], "no config.json"),
    "corrupt safetensors": (lambda p: ["--model", _corrupt_model_dir(p), "eval"], "safetensors"),
    "unknown step": (lambda p: ["--model", "tiny-random-gpt2", "evaluate"], "unknown step 'evaluate'"),
    "unknown option": (lambda p: ["--model", "tiny-random-gpt2", "eval", "--blocksize", "3"], "No such option"),
    "out-of-range value": (lambda p: ["--model", "tiny-random-gpt2", "eval", "--block-size", "4"],
                           "block_size: Input should be greater than or equal to 8"),
    "ill-typed value": (lambda p: ["--model", "tiny-random-gpt2", "eval", "--max-tokens", "many"],
                        "max_tokens: Input should be a valid integer"),
    "empty data file": (lambda p: ["--model", "tiny-random-gpt2", "--data", p / "empty.txt", "eval"], "is empty"),
    "data shorter than one block": (lambda p: ["--model", "tiny-random-gpt2", "--data", p / "short.txt", "eval"],
                                    "fewer than one block"),
    "eval max-tokens below one block": (lambda p: ["--model", "tiny-random-gpt2", "eval", "--max-tokens", "256"],
                                        "--max-tokens 256 is below one block of --block-size 512"),
    "non-UTF-8 data": (lambda p: ["--model", "tiny-random-gpt2", "--data", p / "latin1.txt", "eval"], "not UTF-8"),
    "recipe with unknown key": (lambda p: ["--recipe", p / "bad.yaml"], "unknown key 'modle'"),
    "recipe with bad YAML": (lambda p: ["--recipe", p / "broken.yaml"], "not valid YAML"),
    "recipe with bad step params": (lambda p: ["--recipe", p / "badparams.yaml"], "eval: block_size"),
    "recipe from a newer gptopt": (lambda p: ["--recipe", p / "newer.yaml"], "newer than this gptopt"),
    "save onto a non-empty dir": (lambda p: ["--model", "tiny-random-gpt2", "save", "--to", p / "full"],
                                  "exists and is not empty"),
    "existing --out dir": (lambda p: ["--model", "tiny-random-gpt2", "--out", p / "full", "eval"],
                           "exists and is not empty"),
    "cuda without a GPU": (lambda p: ["--model", "tiny-random-gpt2", "--device", "cuda", "eval"], "no CUDA GPU"),
    "bad device": (lambda p: ["--model", "tiny-random-gpt2", "--device", "tpu", "eval"], "--device must be"),
    "no steps": (lambda p: ["--model", "tiny-random-gpt2"], "no steps given"),
    "truncated config.json": (lambda p: ["--model", p / "badconfig", "eval"], "config.json is not valid JSON"),
    "not a GGUF file": (lambda p: ["--model", p / "fake.gguf", "eval"], "not a GGUF file"),
    "corrupt GGUF file": (lambda p: ["--model", p / "corrupt.gguf", "eval"], "cannot read GGUF file"),
    "missing GGUF file": (lambda p: ["--model", p / "absent.gguf", "eval"], "does not exist"),
    "recipe with wrong types": (lambda p: ["--recipe", p / "wrongtype.yaml"], "'seed' must be an integer"),
    "recipe that is a list": (lambda p: ["--recipe", p / "list.yaml"], "a recipe is a mapping"),
    "ill-typed seed": (lambda p: ["--seed", "x", "--model", "tiny-random-gpt2", "eval"], "--seed must be an integer"),
    "missing data file": (lambda p: ["--model", "tiny-random-gpt2", "--data", p / "nope.txt", "eval"],
                          "does not exist"),
    "unknown built-in data": (lambda p: ["--model", "tiny-random-gpt2", "--data", "builtin:wiki", "eval"],
                              "unknown built-in data"),
    "missing required option": (lambda p: ["--model", "tiny-random-gpt2", "save"], "save: to: Field required"),
    "resume without checkpoints": (lambda p: ["--model", "tiny-random-gpt2", "--out", p / "full", "--resume",
                                              "eval"], "holds no training checkpoints"),
}

G2 = ["--model", "tiny-random-gpt2"]
PLUGIN_CASES = {  # one plugin per group: bnb (quantize), prune, transfer (lora/finetune), l1, bench, cpu-fast
    "quantize: 3 bits": (G2 + ["quantize", "--bits", "3"], "not 3; use --bits 8 or --bits 4"),
    "quantize: block size not a power of two": (G2 + ["quantize", "--bits", "4", "--block-size", "100"],
                                                "block size must be one of 64"),
    "quantize: missing plan file": (G2 + ["quantize", "--plan", "./no-plan.json"], "plan file ./no-plan.json does"),
    "prune after 4-bit quantize": (G2 + ["quantize", "--bits", "4", "prune", "--sparsity", "0.5"],
                                   "put prune before quantize"),
    "prune: sparsity 1.5": (G2 + ["prune", "--sparsity", "1.5"], "sparsity: Input should be less than 1"),
    "prune: pattern 5:4": (G2 + ["prune", "--pattern", "5:4"], "'5:4' is not a valid N:M pattern"),
    "gptq: group size not dividing a width": (G2 + ["quantize", "--method", "gptq", "--bits", "4", "--group-size",
                                                 "48"], "--group-size 48 does not divide the input width 64"),
    "gptq on a quantized model": (G2 + ["quantize", "--method", "gptq", "--bits", "4", "quantize", "--method", "rtn",
                                        "--bits", "8"], "it is already quantized"),
    "bnb with --observer": (G2 + ["quantize", "--bits", "4", "--observer", "mse"],
                            "--observer applies to --method rtn/gptq"),
    "rtn: unknown observer": (G2 + ["quantize", "--method", "rtn", "--bits", "4", "--observer", "max"],
                              "observer: Value error, unknown observer 'max'; registered: hmse, minmax, mse"),
    "gptq with a bitsandbytes option": (G2 + ["quantize", "--method", "gptq", "--bits", "4", "--quant-type", "nf4"],
                                        "--quant-type applies to --method bnb"),
    "sparsegpt: N:M and --sparsity": (G2 + ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--sparsity",
                                            "0.3"], "contradicts --pattern 2:4"),
    "rtn with 4-bit embeddings": (G2 + ["quantize", "--method", "rtn", "--bits", "4", "--embeddings", "4"],
                                  "use --embeddings 8"),
    "prune after gptq": (G2 + ["quantize", "--method", "gptq", "--bits", "4", "prune", "--method", "sparsegpt",
                               "--sparsity", "0.5"], "put prune before quantize"),
    "finetune after 4-bit quantize": (G2 + ["quantize", "--bits", "4", "finetune", "--steps", "2"],
                                      "or use lora (QLoRA) on the quantized model"),
    "lora: rank 0": (G2 + ["lora", "--r", "0"], "r: Input should be greater than or equal to 1"),
    "lora: steps and epochs": (G2 + ["lora", "--steps", "5", "--epochs", "1"], "give --steps or --epochs, not both"),
    "lora: targets matching nothing": (G2 + ["lora", "--target-modules", "*nomatch*", "--steps", "2"],
                                       "matched no linear layer of this model"),
    "checkpoints without --out": (["--model", "tiny-random-gpt2", "finetune", "--steps", "2", "--checkpoint-every",
                                   "1"], "--checkpoint-every needs `gptopt run --out DIR`"),
    "l1 with no training after it": (G2 + ["l1", "--weight", "1e-4", "eval"], "l1 does not train by itself"),
    "l1: negative weight": (G2 + ["l1", "--weight", "-1", "finetune", "--steps", "2"],
                            "weight: Input should be greater than or equal to 0"),
    "bench: 0 new tokens": (G2 + ["bench", "--new-tokens", "0"], "new_tokens: Input should be greater than or equal"),
    "cpu-fast: unknown format": (G2 + ["cpu-fast", "--format", "bogus"], "format: Input should be 'auto'"),
    "cpu-fast after 4-bit quantize": (G2 + ["quantize", "--bits", "4", "cpu-fast"], "it is already quantized"),
    "save: unknown format": (G2 + ["save", "--to", "./m", "--format", "onnx"],
                             "unknown format 'onnx'; known formats: auto, bitsandbytes, compressed-tensors, cpu-fast, "
                             "safetensors"),
    "export: unknown format": (G2 + ["export", "--to", "m.gguf", "--format", "onnx"],
                               "export: unknown format 'onnx'; known formats: auto, gguf"),
    "save: nf4 as compressed-tensors": (G2 + ["quantize", "--bits", "4", "save", "--to", "./m", "--format",
                                              "compressed-tensors"], "quantize with --method rtn or --method gptq"),
    "save: integer grid as safetensors": (G2 + ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32",
                                                "save", "--to", "./m", "--format", "safetensors"],
                                          "would be written de-quantized; use --format compressed-tensors"),
    "export onto an existing file": (G2 + ["export", "--to", "fake.gguf"], "exists; pass --overwrite"),
    "export: not a .gguf name": (G2 + ["export", "--to", "model.bin"], "give a file name ending in .gguf"),
    "export: unknown type": (G2 + ["export", "--to", "m.gguf", "--type", "q3_x"], "type: Input should be 'auto'"),
    "export of an unmerged adapter": (G2 + ["lora", "--steps", "1", "export", "--to", "m.gguf"],
                                      "give lora --merge so the adapter is folded"),
    "llamacpp with nothing exported": (G2 + ["llamacpp"], "put export --format gguf --to FILE.gguf before it"),
}
CASES.update({name: (lambda p, _args=args: _args, expected) for name, (args, expected) in PLUGIN_CASES.items()})

LONG = "x" * 300  # one path component longer than the file system allows (255 bytes)
ROUND2_CASES = {  # issue 20: untrusted recipes, output locations, user mistakes that were internal errors
    "recipe: !!binary path": (["--recipe", "binary.yaml"], "'!!binary' are not allowed"),
    "recipe: !!python tag": (["--recipe", "python.yaml"], "'!!python/object/apply"),
    "recipe: !!set tag": (["--recipe", "set.yaml"], "'!!set' are not allowed"),
    "recipe: alias bomb": (["--recipe", "bomb.yaml"], "anchors (&name) are not allowed"),
    "recipe: alias": (["--recipe", "alias.yaml"], "aliases (*name) are not allowed"),
    "recipe: duplicate top key": (["--recipe", "dupkey.yaml"], "duplicate key 'model'"),
    "recipe: duplicate option key": (["--recipe", "dupopt.yaml"], "duplicate key 'max_tokens'"),
    "recipe: nested 200 deep": (["--recipe", "deep.yaml"], "nested deeper than 32 levels"),
    "recipe: larger than 4 MiB": (["--recipe", "huge.yaml"], "larger than 4 MiB"),
    "recipe: steps: true for an int": (["--recipe", "booltrue.yaml"], "steps: Value error, Input should be a number"),
    "recipe: seed beyond 2**32-1": (["--recipe", "bigseed.yaml"], "--seed must be an integer from 0 to 4294967295"),
    "recipe: float seed": (["--recipe", "floatseed.yaml"], "'seed' must be an integer"),
    "recipe: absolute save path": (["--recipe", "abs.yaml"], "escapes the working directory"),
    "recipe: save through a symlink out": (["--recipe", "symlinked.yaml"], "escapes the working directory"),
    "recipe: not UTF-8": (["--recipe", "latin1.yaml"], "is not UTF-8 text"),
    "recipe: missing file": (["--recipe", "nope.yaml"], "does not exist"),
    "recipe: step is a number": (["--recipe", "numstep.yaml"], "must be a step name or a one-key mapping"),
    "recipe: params are a list": (["--recipe", "listparams.yaml"], "params must be a mapping, got list"),
    "recipe: steps is a mapping": (["--recipe", "mapsteps.yaml"], "'steps' must be a list"),
    "recipe: list as a mapping key": (["--recipe", "listkey.yaml"], "a mapping key must be a plain value"),
    "recipe: empty file": (["--recipe", "blank.yaml"], "a recipe is a mapping"),
    "recipe: and steps on the command line": (["--recipe", "bad.yaml", "eval"], "not both"),
    "run.json: duplicate keys": (["--recipe", "dup.json"], "duplicate key 'steps'"),
    "run.json: nested 40 deep": (["--recipe", "deep.json"], "nested deeper than 32 levels"),
    "run.json: save outside": (["--recipe", "outside.json"], "escapes the working directory"),
    "seed 2**32": (["--seed", str(2**32), "--model", "tiny-random-gpt2", "eval"], "from 0 to 4294967295"),
    "seed -1": (["--seed", "-1", "--model", "tiny-random-gpt2", "eval"], "from 0 to 4294967295"),
    "--out under a regular file": (["--out", "afile/run", "--model", "tiny-random-gpt2", "eval"],
                                   "which is a file, not a directory"),
    "--out is a file": (["--out", "afile", "--model", "tiny-random-gpt2", "eval"], "is a file, not a directory"),
    "--out dangling symlink": (["--out", "dangling", "--model", "tiny-random-gpt2", "eval"], "dangling symlink"),
    "--out symlink loop": (["--out", "loop", "--model", "tiny-random-gpt2", "eval"], "is a symlink loop"),
    "--out on a read-only file system": (["--out", "/proc/sys/gptopt-run", "--model", "tiny-random-gpt2", "eval"],
                                         "cannot be written"),
    "--out name too long": (["--out", LONG, "--model", "tiny-random-gpt2", "eval"], "longer than the file system"),
    "save --to under a regular file": (G2 + ["save", "--to", "afile/m"], "which is a file, not a directory"),
    "save --to dangling symlink": (G2 + ["save", "--to", "dangling"], "dangling symlink"),
    "save --to symlink loop": (G2 + ["save", "--to", "loop/m"], "is a symlink loop"),
    "save --to on a read-only file system": (G2 + ["save", "--to", "/proc/sys/gptopt-m"], "cannot be written"),
    "save --to name too long": (G2 + ["save", "--to", LONG], "longer than the file system allows"),
    "save --to . --overwrite": (G2 + ["save", "--to", ".", "--overwrite"], "the working directory"),
    "save --to blank": (G2 + ["save", "--to", "  "], "the path is empty"),
    "save --to the --out dir": (["--out", "run"] + G2 + ["save", "--to", "run"], "which this run also writes"),
    "two saves to one path": (G2 + ["save", "--to", "m", "save", "--to", "./m"], "as step 1 'save' --to does"),
    "--model name too long": (["--model", LONG, "eval"], "--model: path component"),
    "--data name too long": (G2 + ["--data", LONG + ".txt", "eval"], "--data: path component"),
    "--eval-data name too long": (G2 + ["--eval-data", LONG, "eval"], "--eval-data: path component"),
    "data: jsonl not UTF-8": (G2 + ["--data", "b.jsonl", "eval"], "not UTF-8 text (line 2"),
    "data: non-string rows": (G2 + ["--data", "mixed.jsonl", "eval"], "2 of 4 rows have no string 'text'"),
    "data: .JSONL upper case": (G2 + ["--data", "MIXED.JSONL", "eval"], "2 of 4 rows have no string 'text'"),
    "data: jsonl bad line": (G2 + ["--data", "badline.jsonl", "eval"], "line 2 is not valid JSON"),
    "data: jsonl without text": (G2 + ["--data", "notext.jsonl", "eval"], "has no 'text' column"),
    "data: csv not UTF-8": (G2 + ["--data", "latin1.csv", "eval"], "not UTF-8 text"),
    "data: json that is a number": (G2 + ["--data", "number.json", "eval"], "give a list of"),
    "data: corrupt parquet": (G2 + ["--data", "corrupt.parquet", "eval"], "cannot read data"),
    "config.json is a list": (["--model", "cfglist", "eval"], "is a JSON list, not an object"),
    "config.json string quantization_config": (["--model", "cfgqc", "eval"], "'quantization_config' must be a mapping"),
    "pickle adapter without --allow-pickle": (["--model", "peft", "eval"], "pickle adapter (adapter_model.bin)"),
    "lora: steps true": (G2 + ["lora", "--steps", "true"], "steps: Input should be a valid integer"),
    "finetune: 0 steps": (G2 + ["finetune", "--steps", "0"], "steps: Input should be greater than or equal to 1"),
    "finetune: seq len 4": (G2 + ["finetune", "--seq-len", "4"], "seq_len: Input should be greater than or equal"),
    "lora: negative lr": (G2 + ["lora", "--lr", "-1"], "lr: Input should be greater than 0"),
    "prune: sparsity nan": (G2 + ["prune", "--sparsity", "nan"], "sparsity: Input should be less than 1"),
    "prune: unknown method": (G2 + ["prune", "--method", "foo"], "method: Input should be 'magnitude'"),
    "quantize: unknown quant type": (G2 + ["quantize", "--bits", "4", "--quant-type", "xx"],
                                     "quant_type: Input should be 'nf4' or 'fp4'"),
    "bench: batch size 0": (G2 + ["bench", "--batch-size", "0"], "batch_size: Input should be greater than or equal"),
    "eval: stride over block size": (G2 + ["eval", "--stride", "600"], "stride must not exceed block-size"),
    "eval: unknown split": (G2 + ["eval", "--split", "test"], "split: String should match pattern"),
}
CASES.update({name: (lambda p, _args=args: _args, expected) for name, (args, expected) in ROUND2_CASES.items()})


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "short.txt").write_text("A short text.\n" * 3)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1") * 100)
    (tmp_path / "bad.yaml").write_text("modle: tiny-random-gpt2\nsteps: [eval]\n")
    (tmp_path / "broken.yaml").write_text("model: [tiny\nsteps: {eval\n")
    (tmp_path / "badparams.yaml").write_text("model: tiny-random-gpt2\nsteps:\n  - eval: {block_size: -1}\n")
    (tmp_path / "newer.yaml").write_text("gptopt: 99.0.0\nmodel: tiny-random-gpt2\nsteps: [eval]\n")
    (tmp_path / "badconfig").mkdir()
    (tmp_path / "badconfig" / "config.json").write_text('{"model_type": "gp')
    (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04" + bytes(200))
    (tmp_path / "corrupt.gguf").write_bytes(b"GGUF" + bytes([3, 0, 0, 0]) + bytes(range(256)) * 4)
    (tmp_path / "wrongtype.yaml").write_text("model: tiny-random-gpt2\nseed: abc\nsteps: [eval]\n")
    (tmp_path / "list.yaml").write_text("- eval\n- save\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("precious")
    make_round2_files(tmp_path)
    return tmp_path


def make_round2_files(d):
    import base64
    import json

    import yaml

    def recipe(name, text):
        (d / name).write_text("model: tiny-random-gpt2\n" + text)

    recipe("binary.yaml", "steps:\n  - save: {to: !!binary %s, overwrite: true}\n"
           % base64.b64encode(str(d / "full").encode()).decode())
    recipe("python.yaml", "seed: !!python/object/apply:os.getpid []\nsteps: [eval]\n")
    recipe("set.yaml", "steps: !!set {eval: null}\n")
    (d / "bomb.yaml").write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + chr(ord(c) - 1)] * 9)}]\n" for c in "bcdefgh") + "steps: [eval]\n")
    recipe("alias.yaml", "steps: *x\n")
    recipe("dupkey.yaml", "model: tiny-random-llama\nsteps: [eval]\n")
    recipe("dupopt.yaml", "steps:\n  - eval: {max_tokens: 600, max_tokens: 700}\n")
    recipe("deep.yaml", "steps: " + "[" * 200 + "]" * 200 + "\n")
    recipe("huge.yaml", "steps: [eval]\n#" + "x" * (4 * 2**20) + "\n")
    recipe("booltrue.yaml", "steps:\n  - lora: {steps: true}\n")
    recipe("bigseed.yaml", f"seed: {2**32}\nsteps: [eval]\n")
    recipe("floatseed.yaml", "seed: 1.5\nsteps: [eval]\n")
    recipe("abs.yaml", f"steps:\n  - save: {{to: {d / 'elsewhere'}}}\n")
    (d / "sub").mkdir()
    (d / "outlink").symlink_to(d.parent)
    recipe("symlinked.yaml", "steps:\n  - save: {to: outlink/escaped}\n")
    (d / "latin1.yaml").write_bytes("model: caf\xe9\nsteps: [eval]\n".encode("latin-1"))
    recipe("numstep.yaml", "steps: [5]\n")
    recipe("listparams.yaml", "steps:\n  - eval: [1, 2]\n")
    recipe("mapsteps.yaml", "steps: {eval: {}}\n")
    (d / "listkey.yaml").write_text("? [a, b]\n: 1\n")
    (d / "blank.yaml").write_text("")
    (d / "dup.json").write_text('{"recipe": {"model": "tiny-random-gpt2", "steps": ["eval"]}, "steps": [], "steps": []}')
    (d / "deep.json").write_text('{"recipe": ' * 40 + "{}" + "}" * 40)
    (d / "outside.json").write_text(json.dumps({"recipe": {"model": "tiny-random-gpt2", "steps": [
        {"save": {"to": str(d.parent / "outside")}}]}, "steps": []}))
    (d / "afile").write_text("a regular file")
    (d / "dangling").symlink_to(d / "nowhere")
    (d / "loop").symlink_to(d / "loop2")
    (d / "loop2").symlink_to(d / "loop")
    (d / "b.jsonl").write_bytes(b'{"text":"a"}\n{"text":"b \xff"}\n')
    rows = "\n".join(json.dumps({"text": t}) for t in ["one " * 50, 7, "two " * 50, None])
    (d / "mixed.jsonl").write_text(rows)
    (d / "MIXED.JSONL").write_text(rows)
    (d / "badline.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "notext.jsonl").write_text('{"body": "x"}\n')
    (d / "latin1.csv").write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    (d / "number.json").write_text("42")
    (d / "corrupt.parquet").write_bytes(b"PAR1" + bytes(100))
    for name, cfg in (("cfglist", [1, 2]), ("cfgqc", {"model_type": "gpt2", "quantization_config": "4bit"})):
        (d / name).mkdir()
        (d / name / "config.json").write_text(json.dumps(cfg))
        (d / name / "model.safetensors").write_bytes(b"")
    (d / "peft" / "adapter").mkdir(parents=True)
    (d / "peft" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (d / "peft" / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    (d / "peft" / "model.safetensors").write_bytes(b"")
    (d / "peft" / "adapter" / "adapter_config.json").write_text(yaml.safe_dump({"peft_type": "LORA"}))
    (d / "peft" / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, workdir):
    make_args, expected = CASES[case]
    args = make_args(workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    no_out = "--out" in map(str, args) or "checkpoints without --out" in case
    out = [] if no_out else ["--out", workdir / "out"]
    proc = (run_in_process if case in ROUND2_CASES else run_gptopt)("run", *out, *args, cwd=workdir)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, (case, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert expected in lines[0], lines[0]
    after = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert after == before, "something was written"


def test_the_table_covers_the_core_and_every_plugin():
    from gptopt_core.plugins import get_plugins

    steps = {a for args, _ in PLUGIN_CASES.values() for a in args if not str(a).startswith(("-", "*", "."))}
    plugins = {get_plugins().steps[s].plugin for s in steps if s in get_plugins().steps}
    assert {"gptopt-quantize", "gptopt-prune", "gptopt-transfer", "gptopt-l1", "gptopt-bench", "gptopt-cpu",
            "gptopt-export"} <= plugins
    assert len(CASES) >= 100
