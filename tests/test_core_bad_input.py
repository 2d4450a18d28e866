"""Bad input: one clear line on stderr, exit code 2, no traceback, nothing written."""
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
}


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
    out = [] if "--out" in map(str, args) else ["--out", workdir / "out"]
    proc = run_gptopt("run", *out, *args, cwd=workdir)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, (case, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert expected in lines[0], lines[0]
    after = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    assert after == before, "something was written"
