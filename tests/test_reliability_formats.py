"""Round 3 of reliability (issue 29), beyond the one-line table of tests/test_hostile_formats.py: the run lock
against planted links, RANK without a distributed run, SIGHUP, a full disk, stale temporaries, round trips of
what export and save write, and fuzzing of GGUF headers and compressed-tensors configs."""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from conftest import ROOT, SLOW_SAVE, error_lines, peak_memory_mb, reset_peak_memory
from test_reliability_runs import dead_pid

from gptopt_core import GptoptError, Pipeline
from gptopt_core.errors import MAX_MESSAGE, user_error
from gptopt_core.kit.paths import LOCK_NAME, RunLock, clean_stale_partials

G2, LL = "tiny-random-gpt2", "tiny-random-llama"


# -- the run lock --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["link", "dangling"])
def test_the_lock_is_never_opened_through_a_link(tmp_path, kind):
    """Even past the emptiness check (e.g. --resume): O_NOFOLLOW refuses the link; nothing outside is touched."""
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    out.mkdir()
    if kind == "link":
        victim.write_text("precious")
        (out / LOCK_NAME).symlink_to(victim)
    else:
        (out / LOCK_NAME).symlink_to(tmp_path / "made-by-lock")
    with pytest.raises(GptoptError, match=f"{LOCK_NAME} is a symlink"):
        RunLock(out).acquire()
    assert not (tmp_path / "made-by-lock").exists()
    if kind == "link":
        assert victim.read_text() == "precious"


def test_a_fifo_lock_is_refused_without_blocking(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / LOCK_NAME)
    start = time.perf_counter()
    with pytest.raises(GptoptError, match="is not a regular file"):
        RunLock(out).acquire()
    assert time.perf_counter() - start < 10  # a blocked open would hang for good; 10 s is a loaded machine's margin


def test_rank_alone_does_not_skip_the_lock_or_the_save(tmp_path, monkeypatch):
    from gptopt_core.context import main_process

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main_process()
    seen = []
    original = RunLock.acquire

    def acquire(self):
        seen.append(self.out)
        return original(self)

    monkeypatch.setattr(RunLock, "acquire", acquire)
    Pipeline(model=G2, quiet=True, out=tmp_path / "out").add("save", to=str(tmp_path / "m")).run()
    assert seen == [tmp_path / "out"] and (tmp_path / "m" / "model.safetensors").is_file()
    monkeypatch.setenv("WORLD_SIZE", "2")  # a real distributed run: rank 1 does not write
    assert not main_process()


# -- signals -------------------------------------------------------------------------------------------------------
def test_sighup_during_save_unwinds_like_sigterm(tmp_path):
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, SLOW_SAVE, "cli", str(tmp_path), str(flag)], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert flag.exists(), proc.stderr.read() if proc.poll() is not None else "save never started"
    proc.send_signal(signal.SIGHUP)
    stderr = proc.communicate(timeout=180)[1]
    assert proc.returncode == 128 + signal.SIGHUP, stderr
    assert "Error: terminated (SIGHUP)" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and not (tmp_path / "run" / LOCK_NAME).exists()


# -- a full disk is the machine's fault: exit 2 --------------------------------------------------------------------
@pytest.mark.parametrize("error", [
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    OSError("8192 requested and 1288 written"),  # numpy tofile (the GGUF writer)
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: file write failed"),  # torch
    OSError(28, "No space left on device"),
])
def test_disk_full_however_a_library_says_it_is_exit_2(error):
    from gptopt_core.errors import StepFailed
    from gptopt_core.plugins import PluginHookError

    for wrapped in (error, PluginHookError("gptopt-core", "gptopt_save_model", error),
                    StepFailed("save", "gptopt-core", PluginHookError("p", "h", error))):
        mapped = user_error(wrapped)
        assert mapped is not None and mapped.exit_code == 2, wrapped
        assert str(mapped).startswith("no space left on the device") or "no space left" in str(mapped)


@pytest.fixture
def small_disk(tmp_path):
    """A 300 KiB tmpfs (root only); skipped where it cannot be mounted."""
    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(d)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield d
    # a file the failed write left open keeps the tmpfs busy: the umount must succeed
    assert subprocess.run(["umount", str(d)], capture_output=True).returncode == 0, "the small disk is still busy"


@pytest.mark.parametrize("steps", [["save", "--to", "{d}/m"], ["export", "--to", "{d}/m.gguf", "--type", "f32"]])
def test_a_disk_that_fills_during_save_or_export_is_exit_2_and_leaves_nothing(small_disk, tmp_path, steps):
    from test_hostile_formats import run_in_process

    args = [a.replace("{d}", str(small_disk)) for a in steps]
    proc = run_in_process("run", "-q", "--model", LL, *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no space left on the device" in proc.stderr and "Traceback" not in proc.stderr
    assert list(small_disk.iterdir()) == []  # the temporary directory / .part file is gone


# -- stale temporaries of runs killed with -9 ----------------------------------------------------------------------
def test_the_next_export_removes_part_files_of_dead_exports(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    stale, live = tmp_path / f".m.gguf.{dead}.abc123.part", tmp_path / f".m.gguf.{alive}.def456.part"
    other = tmp_path / f".n.gguf.{dead}.x.part"
    for p in (stale, live, other):
        p.write_bytes(b"GGUF")
    Pipeline(model=LL, quiet=True).add("export", to=str(tmp_path / "m.gguf"), type="f32").run()
    assert not stale.exists() and live.exists() and other.exists() and (tmp_path / "m.gguf").is_file()


def test_offload_dirs_of_dead_processes_are_removed(tmp_path):
    from gptopt_core.kit.offload import DiskStore

    dead = tmp_path / f"gptopt-offload-{dead_pid()}-abcd"
    live = tmp_path / f"gptopt-offload-{os.getppid()}-efgh"
    for d in (dead, live):
        d.mkdir()
        (d / "block-0000.safetensors").write_bytes(b"x")
    store = DiskStore(str(tmp_path))
    assert not dead.exists() and live.exists()
    assert os.path.basename(store.dir).startswith(f"gptopt-offload-{os.getpid()}-")


def test_save_over_a_symlink_leaves_no_old_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("x")
    (tmp_path / "m").symlink_to(tmp_path / "real")
    Pipeline(model=G2, quiet=True).add("save", to="m", overwrite=True).run()
    assert (tmp_path / "m" / "model.safetensors").is_file() and not (tmp_path / "m").is_symlink()
    assert not list(tmp_path.glob(".m.*"))
    # and a stale .old-PID link of a killed save is removed (the link, not what it points to)
    (tmp_path / f".m.old-{dead_pid()}").symlink_to(tmp_path / "real")
    assert len(clean_stale_partials(tmp_path / "m")) == 1 and (tmp_path / "real" / "old.txt").exists()


# -- round trips: what export and save write reads back with the same perplexity -----------------------------------
EVAL = {"max_tokens": 600, "block_size": 64}


@pytest.mark.parametrize("model", [G2, LL])
def test_gptopt_reads_its_own_gguf_and_safetensors_back_with_the_same_perplexity(tmp_path, model):
    first = Pipeline(model=model, quiet=True).add("eval", **EVAL).add(
        "export", to=str(tmp_path / "m.gguf"), type="f32").add("save", to=str(tmp_path / "m")).run()
    ppl = first.records[0]["metrics"]["perplexity"]
    for spec in (tmp_path / "m.gguf", tmp_path / "m"):
        again = Pipeline(model=str(spec), quiet=True).add("eval", **EVAL).run()
        assert again.records[0]["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-5), spec


# -- fuzzing -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_gguf(tmp_path_factory):
    import gguf

    d = tmp_path_factory.mktemp("fuzz")
    Pipeline(model=LL, quiet=True).add("export", to=str(d / "m.gguf"), type="f32").run()
    data = (d / "m.gguf").read_bytes()
    return data, gguf.GGUFReader(str(d / "m.gguf")).data_offset


def one_line(exc):
    text = str(exc)
    return "\n" not in text and 0 < len(text) <= MAX_MESSAGE


@contextlib.contextmanager
def address_space_cap(extra_mb=3072):
    """This process may map at most ``extra_mb`` more than it has mapped now (``RLIMIT_AS``), restored after: an
    unbounded allocation is a MemoryError here instead of the whole suite's process growing until the OOM killer
    ends it (what one random draw of the GGUF fuzz did before the block count was bounded, issue 38)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(re.search(r"^VmSize:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1)) * 1024
    cap = mapped + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def block_count_edited(raw, value: bytes):
    """The tiny Llama's GGUF with the 4 bytes of ``llama.block_count``'s value overwritten by ``value``."""
    import gguf

    blob = bytearray(raw)
    at = raw.index(b"llama.block_count") + len("llama.block_count") + 4  # the key, its value's type, the value
    assert int.from_bytes(blob[at - 4:at], "little") == gguf.GGUFValueType.UINT32
    blob[at:at + 4] = value
    return bytes(blob)


def array_count_edited(raw):
    """The 257-entry INT32 array ``tokenizer.ggml.token_type`` claiming 2**62 entries, the file cut to a whole
    number of entries: gguf-py read entry after entry past the end as empty arrays, one list item each, forever."""
    at = raw.index(b"tokenizer.ggml.token_type") + len("tokenizer.ggml.token_type") + 8  # ARRAY, then INT32
    blob = bytearray(raw)
    blob[at:at + 8] = (2**62).to_bytes(8, "little")
    return bytes(blob[:len(blob) - (len(blob) - at - 8) % 4])


@pytest.mark.parametrize("edit, expected", [
    (lambda raw: block_count_edited(raw, b"\x7f" * 4), "claims 2139062143 blocks but holds tensors for 2"),
    (array_count_edited, "(an array) claims 4611686018427387904 entries of at least 4 bytes")],
    ids=["block count 0x7f7f7f7f", "array count 2**62"])
def test_a_gguf_claiming_billions_is_refused_in_bounded_memory(llama_gguf, tmp_path, edit, expected):
    """What the fuzz found (issue 38): the block count's four bytes overwritten with 0x7F (2,139,062,143 blocks)
    made the block check build ``list(range(count))``, tens of GB, until the OOM killer ended pytest; an array's
    count ran gguf-py's reader without end. In a child process whose address space is capped at 3 GB (a relapse
    is a MemoryError there, not a dead machine): exit 2, one line naming the count, the peak of a plain refusal."""
    path = tmp_path / "m.gguf"
    path.write_bytes(edit(llama_gguf[0]))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "plugins"),
                                                        os.environ.get("PYTHONPATH", "")])}
    code = ("import atexit, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "atexit.register(lambda: print('peak-kib', next(int(l.split()[1]) for l in open('/proc/self/status') "
            "if l.startswith('VmHWM:')), file=sys.stderr)); from gptopt_core.cli import main; main(sys.argv[1:])")
    proc = subprocess.run([sys.executable, "-c", code, "run", "-q", "--model", str(path), "eval"], cwd=tmp_path,
                          env=env, timeout=120, capture_output=True, text=True)
    lines = [l for l in error_lines(proc.stderr) if not l.startswith("peak-kib")]
    peak_mb = int(proc.stderr.rsplit("peak-kib", 1)[1].split()[0]) / 1024
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert expected in lines[0], lines
    assert peak_mb < 1500, f"peak {peak_mb:.0f} MB"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@settings(max_examples=40, deadline=10_000, database=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_edit_of_a_gguf_header_loads_or_fails_in_one_line(llama_gguf, tmp_path_factory, data):
    """Bytes of the header (keys, values, tensor table) overwritten, or the file cut: a model comes back or one
    SourceError line; nothing else escapes, each case in seconds and bounded memory."""
    from gptopt_core.kit.gguf_files import load_gguf

    raw, header_end = llama_gguf
    blob = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(4, header_end - 1))
        value = data.draw(st.sampled_from([0, 1, 2, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        width = data.draw(st.sampled_from([1, 4, 8]))
        blob[at:at + width] = value.to_bytes(1, "little") * min(width, len(blob) - at)
    if data.draw(st.booleans()):
        blob = blob[:data.draw(st.integers(8, len(blob)))]
    path = tmp_path_factory.mktemp("case") / "m.gguf"
    path.write_bytes(bytes(blob))
    held = reset_peak_memory()  # this case's own peak, whatever an earlier case or test used
    try:
        with address_space_cap():  # random draws again (issue 38): an unbounded one fails here, in bounded memory
            loaded = load_gguf(path)
    except GptoptError as exc:
        assert one_line(exc), str(exc)
        assert "MemoryError" not in str(exc), str(exc)  # the cap hit inside a reader that wraps what it raises
    else:
        assert loaded.model is not None
    assert peak_memory_mb() - held < 500


TARGETS = st.sampled_from(["Linear", "lm_head", "re:.*", "re:.*mlp.*", r"re:model\.layers\.\d+\..*", "re:(a+)+$",
                           "re:(a|aa)*b", r"re:(a)\1", "re:(", "re:" + "a*" * 5, "x" * 300, "re:[a-z]{1,5000}"]) | \
    st.text(max_size=20).map(lambda t: "re:" + t)
WEIGHTS = st.fixed_dictionaries({}, optional={
    "num_bits": st.sampled_from([2, 4, 8, 16, 0, -1, "x", None]), "type": st.sampled_from(["int", "float", "x"]),
    "strategy": st.sampled_from(["group", "channel", "tensor", "block", "x"]),
    "group_size": st.sampled_from([32, 0, -5, None]), "symmetric": st.booleans(),
    "block_structure": st.sampled_from([[32, 1], [1], "x"])})
QCONFIG = st.fixed_dictionaries({"quant_method": st.just("compressed-tensors")}, optional={
    "config_groups": st.dictionaries(st.sampled_from(["group_0", "g"]), st.fixed_dictionaries(
        {"targets": st.lists(TARGETS, max_size=3) | st.integers()}, optional={"weights": WEIGHTS}), max_size=2)
    | st.lists(st.integers(), max_size=2),
    "ignore": st.lists(TARGETS, max_size=3), "format": st.sampled_from(["pack-quantized", "naive-quantized", "x"]),
    "sparsity_config": st.fixed_dictionaries({"format": st.sampled_from(["sparse-bitmask", "dense"])},
                                             optional={"targets": st.lists(TARGETS, max_size=2)})})
NAMES = [f"model.layers.{i}.{p}" for i in range(30) for p in ("self_attn.q_proj", "mlp.down_proj")] + ["a" * 200]


@pytest.fixture(scope="module")
def ctensors_imported():
    """compressed-tensors (and torch under it) imported before the first example: its import is no example's time."""
    import importlib

    for module in ("compressed_tensors.quantization", "gptopt_ctensors.config_check"):
        importlib.import_module(module)


@settings(max_examples=150, deadline=5_000, database=None, print_blob=True)
@given(qc=QCONFIG)
@example(qc={"quant_method": "compressed-tensors",  # compressed-tensors raises NotImplementedError for it
             "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 2, "type": "float"}}}})
def test_any_compressed_tensors_config_validates_or_fails_in_one_line_and_matches_fast(ctensors_imported, qc):
    """A quantization_config passes the guard and compressed-tensors' validation, or fails in one line; the
    targets that pass are matched against real and long module names in bounded time."""
    with address_space_cap():  # random draws again (issue 38), each in bounded memory
        config_validates_or_fails_in_one_line_and_matches_fast(qc)


def config_validates_or_fails_in_one_line_and_matches_fast(qc):
    from pathlib import Path

    from gptopt_ctensors.config_check import check_quantization_config
    from gptopt_ctensors.reader import _validated

    try:  # the reader's own path: the guard, then compressed-tensors' validation with its errors in one line
        check_quantization_config(qc, "--model m")
        config = _validated(qc, Path("m"))
    except GptoptError as exc:
        assert one_line(exc)
        return
    patterns = [t for g in (config.config_groups.values() if config else []) for t in g.targets] + list(qc.get(
        "ignore") or [])
    cpu = time.process_time()
    for target in patterns:
        if target.startswith("re:"):
            for name in NAMES:
                re.match(target[3:], name)
    assert time.process_time() - cpu < 2  # CPU time: a catastrophic pattern burns it, a busy machine does not


def test_unquoted_n_m_patterns_stay_strings_in_every_yaml_gptopt_reads():
    from gptopt_core.recipes import load_recipe_text

    doc = load_recipe_text("pattern: 2:4\nother: 1:30:00\nn: 12\nx: 1.5\nh: 0x1f\n")
    assert doc == {"pattern": "2:4", "other": "1:30:00", "n": 12, "x": 1.5, "h": 31}


def test_a_quantized_model_reads_back_from_its_gguf_and_compressed_tensors_at_the_same_perplexity(tmp_path):
    """int8 grids written exactly (q8_0 blocks; packed compressed-tensors) read back as the same weights."""
    first = Pipeline(model=LL, quiet=True).add("quantize", method="rtn", bits=8, group_size=32).add(
        "eval", **EVAL).add("export", to=str(tmp_path / "q.gguf")).add("save", to=str(tmp_path / "q")).run()
    ppl = first.records[1]["metrics"]["perplexity"]
    assert first.records[2]["metrics"]["gguf_exact_grid_tensors"] > 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == \
        "compressed-tensors"
    for spec in (tmp_path / "q.gguf", tmp_path / "q"):
        again = Pipeline(model=str(spec), quiet=True).add("eval", **EVAL).run()
        assert again.records[0]["metrics"]["perplexity"] == pytest.approx(ppl, rel=1e-4), spec


def test_a_library_error_keeps_its_cause_on_one_line():
    """huggingface_hub's strict dataclasses (transformers' configs) put the cause on a second line; pydantic adds a
    link line; a KeyError's text is only the key (issue 38: "Class validation error for validator ..." alone)."""
    from huggingface_hub.errors import StrictDataclassClassValidationError

    from gptopt_core import error_text

    exc = StrictDataclassClassValidationError("validate_architecture", ValueError("hidden size 64, 5 heads"))
    assert error_text(exc) == "Class validation error for validator 'validate_architecture': ValueError: hidden " \
                              "size 64, 5 heads"
    assert error_text(ValueError("1 error\n  x\n    For further information visit https://e")) == "1 error x"
    assert error_text(KeyError("bogus")) == "KeyError: 'bogus'" and error_text(OSError()) == "OSError"
    assert error_text(ValueError("x" * 500)).endswith("...(+100 chars)")
