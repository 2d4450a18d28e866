"""Bad input across the core and every plugin, run as a user runs it: one clear line on stderr, exit code 2,
no traceback, nothing written (the --out dir and every other file unchanged)."""
import pytest
from conftest import error_lines, run_gptopt


def _corrupt_model_dir(tmp_path):
    from gptopt_core.models import tiny_model

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
}
CASES.update({name: (lambda p, _args=args: _args, expected) for name, (args, expected) in PLUGIN_CASES.items()})


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
    return tmp_path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2(case, workdir):
    make_args, expected = CASES[case]
    args = make_args(workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    no_out = "--out" in map(str, args) or "checkpoints without --out" in case
    out = [] if no_out else ["--out", workdir / "out"]
    proc = run_gptopt("run", *out, *args, cwd=workdir)
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
    assert {"gptopt-bnb", "gptopt-prune", "gptopt-transfer", "gptopt-l1", "gptopt-bench", "gptopt-cpu"} <= plugins
    assert len(CASES) >= 45
