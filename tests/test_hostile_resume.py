"""``--resume``, output locks and round-3 leftovers as hostile input (issue 38): links, FIFOs, sockets and
out-of-tree paths planted under ``--out`` or beside an export, a lock held by another writer, a model directory
without a usable tokenizer, relabelled GGUF files, a full disk.

Every case runs the real ``gptopt`` console script in a fresh child process (so its peak memory is its own:
``VmHWM`` polled from ``/proc``) and must exit 2 with one or two stderr lines, no traceback, nothing written or
deleted anywhere under the test's directory (``--out`` included: each case is refused before anything is
written), a link's target and a planted "victim" directory outside ``--out`` unchanged, within a time and a
memory bound.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import types
from pathlib import Path

import pytest
from conftest import ROOT, error_lines, gptopt_exe
from test_hostile_formats import snapshot

from gptopt_core.kit.locks import OutputLock

LL = "tiny-random-llama"
RESUME = ["run", "--model", LL, "--seed", "3", "--device", "cpu", "--out", "out", "--resume", "lora", "--steps",
          "2", "--batch-size", "2", "--seq-len", "32", "--checkpoint-every", "1"]
CK = "out/checkpoints"
STEP = f"{CK}/step01-lora"
LAST = f"{STEP}/00000002"
#: the module fixture's directory of originals (a model directory and GGUF the leftover cases copy)
ORIGIN: list = []
#: per case: (kind, build(work, victim), args, expected text in the error line, where a lock is held or None)
CASES: dict = {}


def case(kind, name, build, expected, args=RESUME, hold=None):
    assert name not in CASES, name
    CASES[name] = (kind, build, args, expected, hold)


# -- what to plant -------------------------------------------------------------------------------------------------
def _clear(path: Path):
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def link(rel, target):
    """``rel`` (below the work directory) replaced by a symlink to ``target`` (a victim path or an absolute one)."""
    def build(w, v):
        _clear(w / rel)
        (w / rel).symlink_to(target(w, v) if callable(target) else target)
    return build


def fifo(rel):
    def build(w, v):
        _clear(w / rel)
        os.mkfifo(w / rel)
    return build


def sock(rel):
    def build(w, v):  # bound by a relative name: a socket path may have at most 107 bytes
        _clear(w / rel)
        cwd, s = os.getcwd(), socket.socket(socket.AF_UNIX)
        os.chdir((w / rel).parent)
        try:
            s.bind((w / rel).name)
        finally:
            os.chdir(cwd)
            s.close()
    return build


def write(rel, data):
    def build(w, v):
        _clear(w / rel)
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(data if isinstance(data, bytes) else data.encode())
    return build


def both(*builds):
    def build(w, v):
        for b in builds:
            b(w, v)
    return build


VICTIM_CK = lambda w, v: v / "checkpoints"  # noqa: E731 - a complete copy of the run's checkpoints, outside --out
VICTIM_FILE = lambda w, v: v / "precious.txt"  # noqa: E731


# -- --resume: links ------------------------------------------------------------------------------------------------
NO_LINKS = "follows no links there"
case("resume-link", "checkpoints a link to a checkpoints copy outside --out", link(CK, VICTIM_CK), NO_LINKS)
case("resume-link", "checkpoints a dangling link", link(CK, lambda w, v: v / "nowhere"), "is a symbolic link")
case("resume-link", "checkpoints a link to a file outside", link(CK, VICTIM_FILE), "is a symbolic link")
case("resume-link", "checkpoints a link to /", link(CK, "/"), "is a symbolic link")
case("resume-link", "step directory a link outside", link(STEP, lambda w, v: v / "checkpoints/step01-lora"),
     "checkpoints/step01-lora is a symbolic link")
case("resume-link", "step directory a dangling link", link(STEP, lambda w, v: v / "gone"), "is a symbolic link")
case("resume-link", "checkpoint directory a link outside",
     link(LAST, lambda w, v: v / "checkpoints/step01-lora/00000002"), "00000002 is a symbolic link")
case("resume-link", "a newer checkpoint directory a link outside",
     link(f"{STEP}/00000099", lambda w, v: v / "checkpoints/step01-lora/00000002"), "00000099 is a symbolic link")
case("resume-link", "chain.json a link to a copy outside", link(f"{CK}/chain.json", lambda w, v: v / "chain.json"),
     "chain.json is a symbolic link")
case("resume-link", "chain.json a link to /dev/zero", link(f"{CK}/chain.json", "/dev/zero"), "is a symbolic link")
case("resume-link", "trainable.safetensors a link outside",
     link(f"{LAST}/trainable.safetensors", lambda w, v: v / "checkpoints/step01-lora/00000002/trainable.safetensors"),
     "trainable.safetensors is a symbolic link")
case("resume-link", "trainer.pt a link to /dev/zero", link(f"{LAST}/trainer.pt", "/dev/zero"),
     "trainer.pt is a symbolic link")
case("resume-link", "meta.json a link outside", link(f"{LAST}/meta.json", VICTIM_FILE), "meta.json is a symbolic link")
case("resume-link", "a leftover .tmp directory a link outside",
     link(f"{STEP}/.tmp-00000003-1", lambda w, v: v / "checkpoints"), ".tmp-00000003-1 is a symbolic link")
case("resume-link", "run.json a link outside", link("out/run.json", VICTIM_FILE), "run.json is a symbolic link")
case("resume-link", "report.md a link outside", link("out/report.md", VICTIM_FILE), "report.md is a symbolic link")
case("resume-link", "run.json's temporary name a link outside", link("out/.run.json.tmp", VICTIM_FILE),
     ".run.json.tmp is a symbolic link")
case("resume-link", "tradeoff.png a link outside", link("out/tradeoff.png", VICTIM_FILE), "is a symbolic link")
case("resume-link", "the lock file a link outside", link("out/.gptopt.lock", VICTIM_FILE),
     ".gptopt.lock is a symbolic link")
case("resume-link", "a link in an unrelated subdirectory of --out",
     both(write("out/notes/a.txt", "x"), link("out/notes/etc", "/etc")), "notes/etc is a symbolic link")

# -- --resume: files that are not regular files --------------------------------------------------------------------
case("resume-special", "checkpoints a FIFO", fifo(CK), "checkpoints is a FIFO")
case("resume-special", "checkpoints a regular file", write(CK, "x"), "is not a directory")
case("resume-special", "step directory a FIFO", fifo(STEP), "step01-lora is a FIFO")
case("resume-special", "step directory a regular file", write(STEP, "x"), "step01-lora is not a directory")
case("resume-special", "chain.json a FIFO", fifo(f"{CK}/chain.json"), "chain.json is a FIFO")
case("resume-special", "chain.json a directory", both(lambda w, v: _clear(w / CK / "chain.json"),
                                                      lambda w, v: (w / CK / "chain.json").mkdir()),
     "chain.json is a directory, not a regular file")
case("resume-special", "trainable.safetensors a FIFO", fifo(f"{LAST}/trainable.safetensors"),
     "trainable.safetensors is a FIFO")
case("resume-special", "trainer.pt a FIFO", fifo(f"{LAST}/trainer.pt"), "trainer.pt is a FIFO")
case("resume-special", "meta.json a FIFO", fifo(f"{LAST}/meta.json"), "meta.json is a FIFO")
case("resume-special", "a socket in the step directory", sock(f"{STEP}/s"), "step01-lora/s is a socket")
case("resume-special", "the lock file a FIFO", fifo("out/.gptopt.lock"), ".gptopt.lock is a FIFO")
case("resume-special", "a FIFO named like a checkpoint", fifo(f"{STEP}/00000003"), "00000003 is a FIFO")

# -- --resume: out-of-tree and damaged chains ----------------------------------------------------------------------
case("resume-tree", "--out itself a link to a directory whose checkpoints link outside",
     both(lambda w, v: (w / "out").rename(w / "real-out"), link("out", lambda w, v: w / "real-out"),
          link("real-out/checkpoints", VICTIM_CK)), "checkpoints is a symbolic link")
case("resume-tree", "--out holds 20,001 entries", lambda w, v: [
    (w / "out" / f"f{i}").touch() for i in range(20_001)], "holds more than 20000 entries")
case("resume-tree", "--out does not exist", lambda w, v: shutil.rmtree(w / "out"), "holds no training checkpoints")
case("resume-tree", "no chain.json", lambda w, v: (w / CK / "chain.json").unlink(), "holds no training checkpoints")
case("resume-tree", "chain.json of 2 MiB", write(f"{CK}/chain.json", b" " * 2**21 + b"{}"), "larger than the")
case("resume-tree", "chain.json not JSON", write(f"{CK}/chain.json", "{not json"), "chain.json is unreadable")
case("resume-tree", "chain.json a JSON list", write(f"{CK}/chain.json", "[1, 2]"), "is not a chain gptopt wrote")
case("resume-tree", "chain.json of another seed", lambda w, v: (w / CK / "chain.json").write_text(json.dumps(
    {**json.loads((w / CK / "chain.json").read_text()), "seed": 4})), "different chain (seed differs)")
case("resume-tree", "--resume without --out", lambda w, v: None, "--resume needs --out DIR",
     args=[a for a in RESUME if a not in ("--out", "out")])

# -- output locks: export --to and save --to -----------------------------------------------------------------------
EXPORT = ["run", "--model", LL, "export", "--to", "x.gguf", "--type", "f32"]
SAVE = ["run", "--model", LL, "save", "--to", "saved"]
BUSY = "is being written by another gptopt run"
case("lock", "export while another process holds the file's lock", lambda w, v: None, BUSY, EXPORT, "x.gguf")
case("lock", "export --overwrite while another process holds the lock", lambda w, v: None, BUSY,
     EXPORT + ["--overwrite"], "x.gguf")
case("lock", "export with its lock file a link outside", link(".x.gguf.gptopt-lock", VICTIM_FILE),
     ".x.gguf.gptopt-lock is a symlink", EXPORT)
case("lock", "export with its lock file a FIFO", fifo(".x.gguf.gptopt-lock"), "is not a regular file", EXPORT)
case("lock", "save while another process holds the directory's lock", lambda w, v: None, BUSY, SAVE, "saved")
case("lock", "save with its lock file a link outside", link(".saved.gptopt-lock", VICTIM_FILE),
     ".saved.gptopt-lock is a symlink", SAVE)
case("lock", "save with its lock file a directory", lambda w, v: (w / ".saved.gptopt-lock").mkdir(),
     "is not a regular file", SAVE)

# -- round-3 leftovers -----------------------------------------------------------------------------------------------
M = ["run", "--model", "m", "eval", "--max-tokens", "64", "--block-size", "32"]
MG = ["run", "--model", "m.gguf", "eval", "--max-tokens", "64", "--block-size", "32"]


def model_copy(edit):
    def build(w, v):
        shutil.copytree(ORIGIN[0] / LL, w / "m")
        edit(w / "m")
    return build


case("leftover", "model directory without tokenizer files", model_copy(lambda d: (d / "tokenizer.json").unlink()),
     "has no tokenizer: neither tokenizer.json nor a vocabulary file", M)
case("leftover", "model directory whose tokenizer.json is not JSON",
     model_copy(lambda d: (d / "tokenizer.json").write_text('{"version": "1.0"')), "tokenizer.json is not valid JSON", M)
case("leftover", "model directory with an unusable vocab.json only",
     model_copy(lambda d: ((d / "tokenizer.json").unlink(), (d / "vocab.json").write_text('{"a": 0}'))),
     "its tokenizer files are incomplete", M)


def relabelled(arch):
    def build(w, v):
        from hostile_files import rewrite_gguf

        rewrite_gguf(ORIGIN[0] / f"{LL}.gguf", w / "m.gguf", arch=arch)
    return build


case("leftover", "llama GGUF relabelled qwen2", relabelled("qwen2"), "block 0 has no attn_q.bias", MG)
case("leftover", "llama GGUF relabelled qwen3", relabelled("qwen3"), "block 0 has no attn_q_norm.weight", MG)


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A real ``--out`` with checkpoints (``lora --checkpoint-every 1``, finished), the victim directory's
    template, a tiny Llama directory and its f32 GGUF."""
    from gptopt_core import Pipeline, tiny_model

    d = tmp_path_factory.mktemp("originals")
    Pipeline(model=LL, seed=3, device="cpu", out=d / "out", quiet=True).add(
        "lora", steps=2, batch_size=2, seq_len=32, checkpoint_every=1).run()
    model, tok = tiny_model(LL)
    model.save_pretrained(d / LL)
    tok.save_pretrained(d / LL)
    Pipeline(model=LL, quiet=True).add("export", to=str(d / f"{LL}.gguf"), type="f32").run()
    ORIGIN[:] = [d]
    return d


def run_child(args, cwd, timeout=120):
    """``gptopt ARGS`` in a fresh child process: exit code, stderr, seconds, and the child's own peak RSS."""
    with tempfile.TemporaryFile() as err:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
        start = time.monotonic()
        proc = subprocess.Popen([gptopt_exe(), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        hwm = 0
        while True:
            hwm = max(hwm, _vm_hwm_kib(proc.pid))
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                pytest.fail(f"gptopt {' '.join(args)} still ran after {timeout} s (a hang)")
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        err.seek(0)
        return types.SimpleNamespace(returncode=proc.returncode, stderr=err.read().decode("utf-8", "replace"),
                                     seconds=time.monotonic() - start, peak_mb=(hwm or usage.ru_maxrss) / 1024)


def _vm_hwm_kib(pid) -> int:
    """The child's own peak RSS so far (``VmHWM``, KiB). Not ``ru_maxrss``: Linux carries the parent's peak across
    fork and exec into it (``exec_mmap``), so after a test that loaded a model every child would report pytest's."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_resume_and_lock_cases(name, origin, tmp_path):
    kind, build, args, expected, hold = CASES[name]
    work, victim = tmp_path / "w", tmp_path / "victim"
    work.mkdir()
    shutil.copytree(origin / "out", work / "out")
    victim.mkdir()
    shutil.copytree(origin / "out" / "checkpoints", victim / "checkpoints")
    shutil.copy(origin / "out" / "checkpoints" / "chain.json", victim / "chain.json")
    (victim / "precious.txt").write_text("precious")
    build(work, victim)
    lock = OutputLock(work / hold).acquire() if hold else None
    try:
        before = snapshot(tmp_path)
        proc = run_child(args, work)
        after = snapshot(tmp_path)
    finally:
        if lock is not None:
            lock.release()
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, (name, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr and 1 <= len(lines) <= 2 and lines[-1].startswith("Error: "), lines
    assert expected in lines[-1], lines[-1]
    if hold:
        assert f"(PID {os.getpid()})" in lines[-1]
    assert after == before, "something was written or removed (under --out, beside it, or through a link)"
    assert (victim / "precious.txt").read_text() == "precious"
    assert proc.seconds < 90, proc.seconds  # refused before the model loads: seconds on a loaded 2-core machine
    assert proc.peak_mb < 1500, f"peak memory {proc.peak_mb:.0f} MB"


def test_the_table_has_at_least_30_cases_of_every_kind_and_the_docs_count_them():
    kinds = {}
    for kind, *_ in CASES.values():
        kinds[kind] = kinds.get(kind, 0) + 1
    assert len(CASES) >= 30 and set(kinds) == {"resume-link", "resume-special", "resume-tree", "lock", "leftover"}
    assert all(n >= 3 for n in kinds.values()), kinds
    doc = (ROOT / "docs" / "trust-model.md").read_text()
    assert f"`tests/test_hostile_resume.py` ({len(CASES)} cases" in doc, "docs/trust-model.md has another count"


def test_a_clean_copy_resumes_and_the_victim_is_untouched(origin, tmp_path):
    """The control: the same tree with nothing planted resumes (exit 0), so each refusal above is the plant's."""
    work = tmp_path / "w"
    work.mkdir()
    shutil.copytree(origin / "out", work / "out")
    proc = run_child(RESUME, work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (work / STEP).iterdir()] == ["00000002"]
    assert json.loads((work / "out" / "run.json").read_text())["status"] == "ok"


# -- concurrent writers of one output ----------------------------------------------------------------------------
def test_two_exports_of_one_file_at_once_cannot_both_succeed(tmp_path, monkeypatch):
    """Export A is held in the middle of writing (after its lock, before its file is published) while export B of
    the same file runs start to end: B is refused in one line naming the holder, A then finishes, and the file is
    A's. Without the lock both would finish and one result would be lost."""
    import threading

    import gptopt_export.gguf_writer as writer
    from gptopt_core import GptoptError, Pipeline

    target = tmp_path / "x.gguf"
    inside, release = threading.Event(), threading.Event()
    original = writer.publish_file

    def held(tmp, dst, overwrite, where="output"):
        if threading.current_thread().name == "A":
            inside.set()
            assert release.wait(120)
        return original(tmp, dst, overwrite, where)

    monkeypatch.setattr(writer, "publish_file", held)
    results = {}

    def export(name, **kw):
        try:
            results[name] = Pipeline(model=LL, quiet=True).add("export", to=str(target), type=kw.get("type", "f32"),
                                                                 overwrite=kw.get("overwrite", False)).run()
        except GptoptError as exc:
            results[name] = exc

    a = threading.Thread(target=export, args=("A",), name="A")
    a.start()
    assert inside.wait(300), "export A never reached its write"
    export("B", type="q8_0", overwrite=True)  # even with --overwrite: A holds the file
    release.set()
    a.join(300)
    assert isinstance(results["B"], GptoptError) and BUSY in str(results["B"]), results["B"]
    assert not isinstance(results["A"], Exception), results["A"]
    assert results["A"].records[0]["metrics"]["gguf_file_type"] == "f32"
    from gptopt_core import check_gguf_file

    assert check_gguf_file(target)["blocks"] >= 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no lock file, no .part left


def test_an_export_never_replaces_a_file_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    """Another program writes the target between the export's check and its publish: without --overwrite the
    export fails in one line and that file stays as it was (a rename would have replaced it silently)."""
    import gptopt_export.gguf_writer as writer
    from gptopt_core import GptoptError, Pipeline

    target = tmp_path / "x.gguf"
    original = writer.publish_file

    def racing(tmp, dst, overwrite, where="output"):
        Path(dst).write_text("someone else's")
        return original(tmp, dst, overwrite, where)

    monkeypatch.setattr(writer, "publish_file", racing)
    with pytest.raises(GptoptError, match="appeared while gptopt was writing it"):
        Pipeline(model=LL, quiet=True).add("export", to=str(target), type="f32").run()
    assert target.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
