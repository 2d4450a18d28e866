"""Side files as hostile input (issue 38, items 2, 3 and 8): importance matrices (``export --imatrix-in``, GGUF and
legacy ``.dat``), ``export --plan`` files, recipes and data files.

Every case runs ``gptopt run`` in this process (the console entry point) and must exit 2 with one or two stderr
lines, no traceback and no raw control character (ESC, BEL, C1, bidirectional overrides) in stderr, write nothing
outside --out, and finish within a SIGALRM bound (a hang fails the case instead of the suite). A plugin registered
for the table records every model load and every step started: a case marked ``pre`` must be refused before the
model loads (the file alone is wrong), one marked ``post`` right after the load, before any step runs (the file
does not fit this model).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import time
import unicodedata

import pytest
from conftest import ROOT, error_lines
from test_bad_input import run_in_process
from test_hostile_formats import snapshot, special

from gptopt_core import hookimpl

LL, G2 = "tiny-random-llama", "tiny-random-gpt2"
#: seconds a case may take before SIGALRM fails it (a hang), and the bound it is held to
ALARM_S, BOUND_S = 60, 10


class Recorder:
    """Model loads and started steps, seen through the hooks every run calls."""

    def __init__(self):
        self.loads, self.steps = [], []

    @hookimpl(tryfirst=True)
    def gptopt_resolve_model(self, spec, options):
        self.loads.append(spec)

    @hookimpl
    def gptopt_step_started(self, ctx, step):
        self.steps.append(step.name)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Good importance matrices of the tiny Llama (GGUF and legacy) and GPT-2, and the tiny Llama as an f32 GGUF."""
    from gptopt_core import Pipeline

    d = tmp_path_factory.mktemp("sidefiles")
    for name, tag in ((LL, "ll"), (G2, "g2")):
        Pipeline(model=name, quiet=True).add("export", to=str(d / f"{tag}.gguf"), type="f32",
                                             imatrix=str(d / f"{tag}-imatrix.gguf"), imatrix_blocks=2,
                                             imatrix_seq_len=16).run()
    return d


def means(b, tag="ll"):
    from gptopt_export import imatrix

    return imatrix.read(b / f"{tag}-imatrix.gguf")


# -- builders: (workdir, originals) -> path ------------------------------------------------------------------------
def dat(entries=None, n=None, tail=b"", edit=None, name="i.dat"):
    """A legacy file: ``entries`` ``[(name, ncall, values)]`` (default: the tiny Llama's), ``n`` entries claimed."""
    import numpy as np

    def build(w, b):
        ents = entries if entries is not None else [(k, 1, v) for k, v in sorted(means(b).items())]
        if edit:
            ents = edit([list(e) for e in ents])
        out = struct.pack("<i", len(ents) if n is None else n)
        for key, ncall, values in ents:
            raw = key if isinstance(key, bytes) else key.encode()
            vals = np.asarray(values, dtype="<f4")
            out += struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, vals.size) + vals.tobytes()
        (w / name).write_bytes(out + tail)
        return w / name
    return build


def raw(data: bytes, name="i.dat"):
    def build(w, b):
        (w / name).write_bytes(data)
        return w / name
    return build


def imx(edit=None, counts=None, meta=True, gtype="imatrix", extra=(), sums_dtype="float32"):
    """A GGUF importance matrix: the tiny Llama's entries, ``edit({name: values})`` applied, ``counts`` ``{name:
    array}`` replacing the token counts, ``extra`` tensors added, without llama.cpp's metadata (``meta=False``)."""
    import gguf
    import numpy as np

    def build(w, b):
        ents = {k: np.asarray(v, dtype=np.float32).reshape(1, -1) for k, v in means(b).items()}
        if edit:
            ents = edit(ents)
        writer = gguf.GGUFWriter(str(w / "i.gguf"), "imatrix")
        if gtype:
            writer.add_string("general.type", gtype)
        if meta:
            writer.add_array("imatrix.datasets", ["text"])
            writer.add_uint32("imatrix.chunk_count", 2)
            writer.add_uint32("imatrix.chunk_size", 16)
        for key, values in sorted(ents.items()):
            if values is not None:
                writer.add_tensor(f"{key}.in_sum2", (values * 32).astype(sums_dtype))
            c = (counts or {}).get(key, np.full((values.shape[0] if values is not None else 1, 1), 32.0, np.float32))
            if c is not None:
                writer.add_tensor(f"{key}.counts", np.asarray(c, dtype=np.float32))
        for key, _ in extra:
            writer.add_tensor(key, np.zeros((4, 4), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return w / "i.gguf"
    return build


def first(edit):
    """An ``imx`` edit applied to the first entry's values (a ``(1, n)`` float32 array)."""
    def apply(ents):
        key = sorted(ents)[0]
        ents[key] = edit(ents[key].copy())
        return ents
    return apply


def setv(index, value):
    def apply(v):
        v.reshape(-1)[index] = value
        return v
    return apply


def copy_of(src, name, cut=None, edit=None):
    def build(w, b):
        data = (b / src).read_bytes()
        data = data[:cut] if cut else data
        (w / name).write_bytes(edit(bytearray(data)) if edit else data)
        return w / name
    return build


def text(content, name):
    def build(w, b):
        (w / name).write_bytes(content.encode() if isinstance(content, str) else content)
        return w / name
    return build


ESC_TITLE = "\x1b]0;owned\x07"  # sets the terminal's title
ESC_CLEAR = "\x1b[2J\x1b[H"  # clears the screen
BIDI = "\u202e"  # right-to-left override: the rest of the line reads backwards
IMX = ["--model", LL, "export", "--to", "x.gguf", "--type", "q4_0", "--imatrix-in", "{m}"]
PLAN = ["--model", LL, "export", "--to", "x.gguf", "--type", "q4_0", "--plan", "{m}"]
DATA = ["--model", LL, "--data", "{m}", "eval"]

#: name -> (when: pre | post, build, args with {m}, expected text in the error line)
CASES = {}


def case(when, name, build, args, expected):
    assert name not in CASES, name
    CASES[name] = (when, build, args, expected)


# -- importance matrices, legacy .dat: every count against the file's length before a loop ----------------------------
# the round-4 probe's file: the reader before this round stepped back 4 bytes per entry and looped 2**31 times
case("pre", "imatrix .dat of 20 bytes claiming 2**31-1 entries", raw(struct.pack("<5i", 2**31 - 1, -16, 1, 0, 1)),
     IMX, "claims 2147483647 entries but its 20 bytes hold at most 1")
case("pre", "imatrix .dat empty", raw(b""), IMX, "ends at byte 0 inside the entry count")
case("pre", "imatrix .dat claiming 0 entries", raw(struct.pack("<i", 0) + b"\0" * 16), IMX, "claims 0 entries")
case("pre", "imatrix .dat with a negative name length", raw(struct.pack("<4i", 1, -12, 1, 1) + b"\0" * 8), IMX,
     "entry 1 claims a name of -12 bytes")
case("pre", "imatrix .dat claiming 2**31-1 values",
     raw(struct.pack("<ii", 1, 19) + b"blk.0.attn_q.weight" + struct.pack("<ii", 1, 2**31 - 1) + b"\0" * 16), IMX,
     "claims 2147483647 values but 16 bytes are left")
case("pre", "imatrix .dat truncated in its values", lambda w, b: _cut(dat()(w, b), 0.5), IMX, "bytes are left")
case("pre", "imatrix .dat with zero counts (ncall 0)", dat(edit=lambda e: [e[0][:1] + [0] + e[0][2:]] + e[1:]), IMX,
     "was summed over 0 chunks (ncall); counts must be positive")
case("pre", "imatrix .dat with a NaN", dat(edit=lambda e: [e[0][:2] + [[float("nan")] + list(e[0][2][1:])]] + e[1:]),
     IMX, "has 1 NaN or infinite values (first at column 0: nan)")
case("pre", "imatrix .dat with a negative value",
     dat(edit=lambda e: [e[0][:2] + [list(e[0][2][:3]) + [-1.0] + list(e[0][2][4:])]] + e[1:]), IMX,
     "has 1 negative values (first at column 3: -1.0)")
case("pre", "imatrix .dat naming one tensor twice", dat(edit=lambda e: e + e[:1]), IMX, "appears twice")
case("pre", "imatrix .dat with trailing junk", dat(tail=b"\x01\x02\x03"), IMX,
     "has 3 bytes after its last entry that are not a chunk count and a dataset name")
case("pre", "imatrix .dat with a dataset length past the end", dat(tail=struct.pack("<ii", 2, 10**6) + b"abc"),
     IMX, "bytes after its last entry")
case("pre", "imatrix .dat with a name that is not UTF-8", dat([(b"blk.0.\xff\xfe", 1, [1.0] * 64)]), IMX,
     "entry 1's name is not UTF-8 (byte 6)")
case("pre", "imatrix .dat that is a FIFO", lambda w, b: special("fifo", w / "i.dat"), IMX,
     "is a FIFO (named pipe), not a regular file")
case("pre", "imatrix .dat that is /dev/zero", lambda w, b: special("zero", w / "i.dat"), IMX,
     "is a character device, not a regular file")

# -- importance matrices, GGUF ------------------------------------------------------------------------------------
case("pre", "imatrix GGUF with zero counts", imx(counts={"blk.0.attn_q.weight": [[0.0]]}), IMX,
     "has count(s) [0.0]; counts (tokens summed) must be positive")
case("pre", "imatrix GGUF with an infinite count", imx(counts={"blk.1.ffn_up.weight": [[float("inf")]]}), IMX,
     "counts (tokens summed) must be positive")
case("pre", "imatrix GGUF with a NaN sum", imx(first(setv(5, float("nan")))), IMX, "has 1 NaN or infinite sums")
case("pre", "imatrix GGUF with a negative sum", imx(first(setv(0, -3.0))), IMX, "has 1 negative sums")
case("pre", "imatrix GGUF with a value of 1e35", imx(first(setv(1, 1e34))), IMX, "larger than 1e+30")
case("pre", "imatrix GGUF missing a counts tensor", imx(counts={"blk.0.ffn_down.weight": None}), IMX,
     "'blk.0.ffn_down.weight.in_sum2' has no '.counts' partner")
case("pre", "imatrix GGUF with counts but no sums", imx(lambda e: {**e, "blk.0.ffn_gate.weight": None}), IMX,
     "'blk.0.ffn_gate.weight.counts' has no '.in_sum2' partner")
case("pre", "imatrix GGUF with three counts for one matrix", imx(counts={"blk.0.attn_k.weight": [[1.0], [1.0],
                                                                                                   [1.0]]}),
     IMX, "give one count per matrix (1)")
case("pre", "imatrix GGUF with f16 sums", imx(sums_dtype="float16"), IMX, "is stored as F16 / F32, not f32")
case("pre", "imatrix GGUF without llama.cpp's metadata", imx(meta=False), IMX,
     "lacks imatrix.datasets, imatrix.chunk_count, imatrix.chunk_size")
case("pre", "imatrix GGUF whose general.type is 'model'", imx(gtype="model"), IMX, "general.type is 'model'")
case("pre", "imatrix GGUF with a tensor that is no imatrix entry",
     imx(extra=[("token_embd.weight", "zeros")]), IMX,
     "holds 1 tensor(s) that are not NAME.in_sum2 / NAME.counts (first: 'token_embd.weight')")
case("pre", "a model GGUF given as the imatrix", copy_of("ll.gguf", "i.gguf"), IMX,
     "holds no importance matrix: it is a model file (architecture 'llama')")
case("pre", "imatrix GGUF truncated to half", lambda w, b: _cut(copy_of("ll-imatrix.gguf", "i.gguf")(w, b), 0.5),
     IMX, "cannot read the GGUF file")
case("pre", "imatrix GGUF claiming 2**60 tensors", copy_of("ll-imatrix.gguf", "i.gguf", edit=lambda d: bytes(
    d[:8] + (2**60).to_bytes(8, "little") + d[16:])), IMX, "cannot read the GGUF file")
case("pre", "a legacy file named .gguf", lambda w, b: os.replace(dat()(w, b), w / "i.gguf") or w / "i.gguf", IMX,
     "is not a GGUF file (bad magic)")
case("pre", "imatrix GGUF that is a FIFO", lambda w, b: special("fifo", w / "i.gguf"), IMX,
     "is a FIFO (named pipe), not a regular file")

# -- importance matrices against the model: right after the load, before any step -------------------------------------
case("post", "another model's imatrix (GPT-2's for a Llama)", copy_of("g2-imatrix.gguf", "i.gguf"), IMX,
     "2 of 8 entries name no tensor of this model (first: 'blk.0.attn_qkv.weight')")
case("post", "imatrix with wider rows than the model's", imx(first(lambda v: v.repeat(2, axis=1)[:, :96])), IMX,
     "entry 'blk.0.attn_k.weight' has 96 values but blk.0.attn_k.weight has 64 input columns")
case("post", "imatrix of two matrices per tensor (experts)", imx(first(lambda v: v.repeat(2, axis=0))),
     IMX, "has 128 values but blk.0.attn_k.weight has 64 input columns")
case("post", "imatrix .dat entry named with a terminal title sequence",
     dat([(f"blk.0.{ESC_TITLE}attn_q.weight", 1, [1.0] * 64)]), IMX,
     "1 of 1 entries name no tensor of this model (first: 'blk.0.\\x1b]0;owned\\x07attn_q.weight')")

# -- export --plan files -------------------------------------------------------------------------------------------
case("pre", "plan .json that is a FIFO", lambda w, b: special("fifo", w / "p.json"), PLAN,
     "is a FIFO (named pipe), not a regular file")
case("pre", "plan .yaml that is /dev/zero", lambda w, b: special("zero", w / "p.yaml"), PLAN,
     "is a character device, not a regular file")
case("pre", "plan .json that is a dangling link", lambda w, b: special("dangling", w / "p.json"), PLAN,
     "does not exist")
case("pre", "plan with an unknown type", text('{"blk.0.attn_v.weight": "q3_x"}', "p.json"), PLAN,
     "'blk.0.attn_v.weight': type 'q3_x' unknown")
case("pre", "plan with a list for a type", text('{"blk.0.attn_v.weight": ["q8_0"]}', "p.json"), PLAN,
     "give a type name such as q8_0, not a list")
case("pre", "plan with a number for a type", text("blk.0.attn_v.weight: 8\n", "p.yaml"), PLAN, "not a number")
case("pre", "plan with a number for a name", text("5: q8_0\n", "p.yaml"), PLAN, "key 5 is not a tensor name")
case("pre", "plan that is an empty mapping", text("{}", "p.json"), PLAN, "give a mapping of tensor names to GGUF "
                                                                          "types (got an empty mapping)")
case("pre", "plan that is a JSON list", text('["q8_0"]', "p.json"), PLAN, "(got a list)")
case("pre", "plan with a duplicate JSON key", text('{"output.weight": "q8_0", "output.weight": "f16"}', "p.json"),
     PLAN, "duplicate key")
case("pre", "plan with a screen-clearing type", text(json.dumps({"blk.0.attn_v.weight": ESC_CLEAR + "q8_0"}),
                                                     "p.json"), PLAN, "type '\\x1b[2J\\x1b[Hq8_0' unknown")
case("pre", "plan with a title sequence in a name and a bad type",
     text(json.dumps({ESC_TITLE + "blk.0": "qq"}), "p.json"), PLAN, "'\\x1b]0;owned\\x07blk.0': type 'qq' unknown")
case("post", "plan naming one tensor by its GGUF and its module name",
     text(json.dumps({"blk.0.attn_v.weight": "q8_0", "model.layers.0.self_attn.v_proj": "f16"}), "p.json"), PLAN,
     "'blk.0.attn_v.weight' and 'model.layers.0.self_attn.v_proj' name the same tensor (blk.0.attn_v.weight)")
case("post", "plan naming a tensor the model lacks, with a title sequence",
     text(json.dumps({f"blk.9.{ESC_TITLE}": "q8_0"}), "p.json"), PLAN,
     "'blk.9.\\x1b]0;owned\\x07' is not a tensor of this model")
case("post", "plan naming a tensor with a right-to-left override", text(json.dumps({f"blk.0.{BIDI}thgiew": "q8_0"}),
                                                                       "p.json"), PLAN, "'blk.0.\\u202ethgiew'")

# -- recipes and data files ---------------------------------------------------------------------------------------
case("pre", "recipe .json that is a FIFO", lambda w, b: special("fifo", w / "r.json"), ["--recipe", "{m}"],
     "is not a regular file")
case("pre", "recipe with a screen-clearing step name",
     text(json.dumps({"model": LL, "steps": [{ESC_CLEAR + "eval": {}}]}), "r.json"), ["--recipe", "{m}"],
     "\\x1b[2J\\x1b[Heval")
case("pre", "recipe with a title sequence in an option", text(json.dumps(
    {"model": LL, "steps": [{"eval": {ESC_TITLE: 1}}]}), "r.json"), ["--recipe", "{m}"],
     "unknown option '\\x1b]0;owned\\x07'")
case("pre", "recipe .yaml with a raw escape character", text(f"model: {LL}\nsteps:\n  - eval: {{}}\n# {ESC_CLEAR}\n",
                                                            "r.yaml"), ["--recipe", "{m}"],
     "unacceptable character #x001b")
case("pre", "data file without a suffix that is a FIFO", lambda w, b: special("fifo", w / "corpus"), DATA,
     "is not a regular file")
case("pre", "data .txt that is /dev/zero", lambda w, b: special("zero", w / "d.txt"), DATA, "is not a regular file")
case("pre", "data .csv whose columns carry escape sequences", text(f"{ESC_CLEAR}body,{BIDI}x\nhello,world\n",
                                                                   "d.csv"), DATA,
     "has no 'text' column (columns: \\x1b[2J\\x1b[Hbody, \\u202ex)")
case("pre", "data .jsonl whose keys carry a title sequence", text(json.dumps({ESC_TITLE: "hi"}) + "\n", "d.jsonl"),
     DATA, "(columns: \\x1b]0;owned\\x07)")


def _cut(path, fraction):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def test_the_table_has_50_cases_of_every_surface():
    surfaces = {"imatrix": 0, "plan": 0, "recipe": 0, "data": 0}
    for name in CASES:
        for s in surfaces:
            surfaces[s] += name.lower().startswith((s, f"a {s}", f"another model's {s}")) or f" {s} " in name
    assert len(CASES) >= 50 and all(n >= 2 for n in surfaces.values()), surfaces
    assert {when for when, *_ in CASES.values()} == {"pre", "post"}
    doc = (ROOT / "docs" / "trust-model.md").read_text()
    assert f"`tests/test_hostile_sidefiles.py` ({len(CASES)} cases" in doc, "docs/trust-model.md has another count"


def raw_controls(text: str) -> list[str]:
    """Characters a terminal acts on or that hide text: C0/C1 controls except the newline, DEL, format characters."""
    return [c for c in text if c != "\n" and (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F
                                               or unicodedata.category(c) in ("Cf", "Zl", "Zp", "Cs"))]


def _alarm(signum, frame):
    raise TimeoutError(f"no answer within {ALARM_S} s")


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_side_file_is_refused_in_one_line_before_the_work(name, base, tmp_path):
    from gptopt_core.kit.testing import register_plugin

    when, build, args, expected = CASES[name]
    work = tmp_path / "w"
    work.mkdir()
    built = build(work, base)
    args = [str(built) if a == "{m}" else a for a in args]
    before, originals = snapshot(tmp_path, work / "out"), snapshot(base)
    recorder = Recorder()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(ALARM_S)
    start = time.perf_counter()
    try:
        with register_plugin(recorder, "sidefiles-recorder"):
            proc = run_in_process("run", "-q", "--out", work / "out", *args, cwd=work)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.perf_counter() - start
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, (name, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("Error: "), lines
    assert expected in lines[-1], lines[-1]
    assert not raw_controls(proc.stderr), repr(proc.stderr)
    assert snapshot(tmp_path, work / "out") == before, "something was written outside --out"
    assert snapshot(base) == originals
    assert not (work / "x.gguf").exists()
    assert seconds < BOUND_S, seconds
    assert recorder.steps == [], f"a step ran before the refusal: {recorder.steps}"
    if when == "pre":
        assert recorder.loads == [], "refused only after the model loaded"
    else:
        assert recorder.loads == [LL], recorder.loads


def test_safe_text_escapes_what_a_terminal_acts_on_and_keeps_the_rest():
    from gptopt_core import GptoptError, safe_text

    assert safe_text(f"a{ESC_TITLE}b{BIDI}c\u200bd\r\n\x00\x7f\x9b\udce9") == (
        "a\\x1b]0;owned\\x07b\\u202ec\\u200bd\\r\\n\\x00\\x7f\\x9b\\udce9")
    assert safe_text("café ✓ 日本 blk.0.attn_q.weight") == "café ✓ 日本 blk.0.attn_q.weight"
    assert safe_text("x" * 100 + "\x1b", 20) == "x" * 20 + "...(+84 chars)"
    assert str(GptoptError(f"plan: '{ESC_CLEAR}'")) == "plan: '\\x1b[2J\\x1b[H'"


def test_a_partial_imatrix_is_used_and_its_gaps_reported(base, tmp_path):
    """A valid file that misses one block weight and names a norm (no quantizer weights a vector): the export runs,
    counts both, and writes finite blocks."""
    import gguf
    import numpy as np

    from gptopt_core import Pipeline

    def edit(ents):
        ents.pop("blk.1.ffn_down.weight")
        ents["blk.0.attn_norm.weight"] = np.ones((1, 64), np.float32)
        ents["blk.0.attn_q.weight"][0, :32] = 0.0  # a block of columns that never fired: a zero scale, not NaN
        return ents

    path = imx(edit)(tmp_path, base)
    res = Pipeline(model=LL, quiet=True).add("export", to=str(tmp_path / "m.gguf"), type="q4_0",
                                             imatrix_in=str(path)).run()
    m = res.records[0]["metrics"]
    assert (m["imatrix_entries"], m["imatrix_unused"], m["imatrix_missing"]) == (14, 1, 1)
    assert m["gguf_imatrix_weighted_tensors"] == 13
    for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        assert np.isfinite(values).all(), t.name


@pytest.mark.parametrize("name", ["imatrix .dat of 20 bytes claiming 2**31-1 entries", "plan .json that is a FIFO"])
def test_refusal_in_a_real_process_is_bounded_in_time_and_memory(name, base, tmp_path):
    """The console script in its own process, under a subprocess timeout: no hang (a FIFO, a count that would loop)
    and a bounded peak resident set."""
    import subprocess
    import sys

    when, build, args, expected = CASES[name]
    built = build(tmp_path, base)
    args = [str(built) if a == "{m}" else a for a in args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"),
                                                        os.environ.get("PYTHONPATH", "")])}
    # VmHWM, the process's own peak: ru_maxrss would carry pytest's peak across fork and exec (Linux exec_mmap)
    code = ("import atexit, sys; atexit.register(lambda: print('peak-kib', next(int(l.split()[1]) for l in "
            "open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr)); "
            "from gptopt_core.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "run", "-q", *args], cwd=tmp_path, env=env, timeout=120,
                          capture_output=True, text=True)
    lines = [l for l in error_lines(proc.stderr) if not l.startswith("peak-kib")]
    peak_mb = int(proc.stderr.rsplit("peak-kib", 1)[1].split()[0]) / 1024
    assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr
    assert peak_mb < 1500, f"peak {peak_mb:.0f} MB"
    assert not (tmp_path / "x.gguf").exists()
