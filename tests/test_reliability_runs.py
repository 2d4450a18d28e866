"""Concurrent and interrupted runs, what a run writes where, and data read without quiet loss (issue 20)."""
import json
import os
import signal
import subprocess
import sys
import time

import click
import pytest
from conftest import SLOW_SAVE, error_lines, gptopt_exe, run_gptopt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptopt_core import GptoptError, Pipeline, Step, hookimpl
from gptopt_core.kit.data import TextData, tokenize_bounded
from gptopt_core.errors import MAX_MESSAGE
from gptopt_core.kit.paths import LOCK_NAME, RunLock, clean_stale_partials
from gptopt_core.plugins import get_plugins


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_on_a_locked_out_dir_exits_2_and_a_dead_lock_is_free(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        proc = run_gptopt("run", "--model", "tiny-random-gpt2", "--out", out, "eval", cwd=tmp_path)
        lines = error_lines(proc.stderr)
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert f"--out {out} is in use by another gptopt run (PID {os.getpid()})" in lines[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    assert not out.exists()  # the lock made the directory and nothing else was written: it is gone again
    # a lock file left by a process that died (kill -9) holds no flock: the next run takes it over
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{dead_pid()}\n")
    with RunLock(out) as lock:
        assert (out / LOCK_NAME).read_text() == f"{os.getpid()}\n" and lock.fd is not None
    assert list(out.iterdir()) == []


def test_stale_partial_directories_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "m"
    dead, alive = dead_pid(), os.getppid()
    for name in (f".m.partial-{dead}", f".m.partial-{alive}", f".m.old-{dead}", ".other.partial-1"):
        (tmp_path / name).mkdir()
    removed = clean_stale_partials(target)
    assert [p.name for p in removed] == [f".m.partial-{dead}"]  # .old kept: m does not exist, it is the only copy
    target.mkdir()
    assert [p.name for p in clean_stale_partials(target)] == [f".m.old-{dead}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.partial-" + str(alive), ".other.partial-1", "m"]


def test_sigterm_during_save_is_like_ctrl_c(tmp_path):
    flag = tmp_path / "flag"
    (tmp_path / f".m.partial-{dead_pid()}").mkdir()  # left by an earlier save killed with -9
    proc = subprocess.Popen([sys.executable, SLOW_SAVE, "cli", str(tmp_path), str(flag)], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    while not flag.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert flag.exists(), proc.stderr.read() if proc.poll() is not None else "save never started"
    assert [p.name for p in tmp_path.glob(".m.partial-*")] == [f".m.partial-{proc.pid}"]  # the stale one is gone
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=180)[1]
    assert proc.returncode == 143, stderr
    assert "Error: terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.*"))
    manifest = json.loads((tmp_path / "run" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["steps"][0]["status"] == "interrupted"
    assert not (tmp_path / "run" / LOCK_NAME).exists()


class StopAt:
    def __init__(self, n):
        self.n = n

    @hookimpl
    def gptopt_after_optimizer_step(self, ctx, model, step):
        if step == self.n:
            raise KeyboardInterrupt


def test_resume_finishes_a_run_whose_save_had_completed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("A few words of training text. " * 100)

    def pipeline(resume=False):
        return (Pipeline(model="tiny-random-gpt2", data="d.txt", seed=1, device="cpu", out="out", quiet=True,
                         resume=resume)
                .add("save", to="m").add("finetune", steps=4, batch_size=1, seq_len=16, checkpoint_every=2))

    get_plugins().register(StopAt(3), "stop-at-3")
    try:
        with pytest.raises(KeyboardInterrupt):
            pipeline().run()
    finally:
        get_plugins().unregister("stop-at-3")
    assert (tmp_path / "m" / "run.json").is_file()  # the save had completed before the interruption
    first_save = json.loads((tmp_path / "m" / "run.json").read_text())
    resumed = pipeline(resume=True).run()
    assert [r["status"] for r in resumed.records] == ["ok", "ok"]
    assert len(resumed.records[1]["metrics"]["loss_history"]) == 4
    again = json.loads((tmp_path / "m" / "run.json").read_text())
    assert again["model"]["hash"] == first_save["model"]["hash"] and again["created"] >= first_save["created"]
    # a different chain still may not replace it
    other = Pipeline(model="tiny-random-gpt2", data="d.txt", seed=2, device="cpu", out="out2", quiet=True).add(
        "save", to="m")
    with pytest.raises(GptoptError, match="exists and is not empty"):
        other.run()


def snapshot(root, skip):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if not any(p == s or s in p.parents for s in skip))


def test_a_run_writes_nothing_outside_out_to_and_the_cache(tmp_path):
    home, work, tmp = tmp_path / "home", tmp_path / "work", tmp_path / "tmp"
    for d in (home, work, tmp):
        d.mkdir()
    (work / "d.jsonl").write_text("\n".join(json.dumps({"text": f"document {i}: " + "some words " * 40})
                                            for i in range(30)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "GPTOPT_CACHE", "TMP"))}
    env.update(HOME=str(home), TMPDIR=str(tmp), GPTOPT_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    before = snapshot(tmp_path, [])
    proc = subprocess.run([gptopt_exe(), "run", "--model", "tiny-random-gpt2", "--data", "d.jsonl", "--out", "out",
                           "--quiet", "eval", "--max-tokens", "600", "save", "--to", "m"], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    after = snapshot(tmp_path, [work / "out", work / "m", tmp_path / "cache"])
    assert after == before
    assert (work / "out" / "run.json").is_file() and (work / "m" / "model.safetensors").is_file()


def test_data_files_are_read_without_quiet_loss(tmp_path):
    rows = [{"text": f"row {i} " * 30} for i in range(20)]
    (tmp_path / "UPPER.JSONL").write_text("\n".join(json.dumps(r) for r in rows))
    data = TextData.load(str(tmp_path / "UPPER.JSONL"))
    assert sorted(data.train_docs + data.valid_docs) == sorted(r["text"] for r in rows)
    assert not any(d.startswith("{") for d in data.train_docs)  # parsed as JSON lines, not read as plain text
    mixed = [{"text": f"row {i} " * 30} if i % 2 else {"text": i} for i in range(50)]
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in mixed))
    with pytest.raises(GptoptError, match=r"25 of 50 rows have no string 'text' \(first: row 1, int\)"):
        TextData.load(str(tmp_path / "mixed.jsonl"))
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "rows.csv").write_text("text,other\n" + "\n".join(f'"{r["text"]}",1' for r in rows))
    for name in ("list.json", "rows.csv"):
        loaded = TextData.load(str(tmp_path / name))
        assert len(loaded.train_docs) + len(loaded.valid_docs) == 20, name


def test_long_text_is_tokenized_in_pieces_with_the_same_ids(monkeypatch):
    import gptopt_core.kit.data as data_mod
    from gptopt_core.kit.models import byte_tokenizer

    tok = byte_tokenizer()
    text = ("A line of text with words. " * 40 + "\n") * 30
    whole = tokenize_bounded(tok, text)
    monkeypatch.setattr(data_mod, "TOKENIZE_WHOLE", 1000)
    monkeypatch.setattr(data_mod, "TOKENIZE_PIECE", 700)
    pieces = tokenize_bounded(tok, text)
    assert pieces.dtype == whole.dtype and pieces.tolist() == whole.tolist() and len(whole) == len(text)


STEP_VALUES = st.one_of(st.text(max_size=12), st.sampled_from(["true", "-1", "0", "1e9", "nan", "inf", "4294967296",
                                                                "8:4", "", " ", "\u00e9", "auto"]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_cli_values_for_any_step_parse_or_fail_in_one_line(data):
    from gptopt_core.cli import make_step_command, option_specs

    plugins = get_plugins()
    name = data.draw(st.sampled_from(sorted(plugins.steps)))
    cls = plugins.steps[name]
    specs = option_specs(cls)
    args = []
    for spec in data.draw(st.lists(st.sampled_from(specs), max_size=4)) if specs else []:
        if spec["bool"]:
            args.append(spec["flag"])
        else:
            args += [spec["flag"], data.draw(STEP_VALUES)]
    try:
        make_step_command(cls).main(args=args, prog_name=name, standalone_mode=False)
    except GptoptError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= MAX_MESSAGE
    except click.UsageError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.integers(), st.booleans(), st.none(), st.text(max_size=6), st.floats()),
       st.sampled_from(["auto", "cpu", "cuda", "cuda:0", "tpu", ""]))
def test_any_run_level_values_construct_or_fail_in_one_line(seed, device):
    try:
        Pipeline(model="tiny-random-gpt2", seed=seed, device=device)
    except GptoptError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= MAX_MESSAGE


@pytest.mark.parametrize("step, params, expected", [
    ("eval", {"block_size": 2048}, "step 1 'eval': --block-size 2048 is longer than the model's 1024 positions"),
    ("lora", {"seq_len": 1500, "steps": 1}, "step 1 'lora': --seq-len 1500 is longer than the model's 1024"),
    ("cpu-fast", {"block_size": 2048}, "step 1 'cpu-fast': --block-size 2048 is longer than the model's 1024"),
    ("eval", {"sample": "word " * 1000, "sample_tokens": 100, "max_tokens": 600, "block_size": 64},
     "eval: --sample is 5000 tokens; with --sample-tokens 100 that is longer than the model's 1024 positions"),
])
def test_token_lengths_beyond_the_model_positions_fail_before_the_first_step(tmp_path, step, params, expected):
    (tmp_path / "d.txt").write_text("Some text to score. " * 200)
    pipe = Pipeline(model="tiny-random-gpt2", data=str(tmp_path / "d.txt"), quiet=True, out=tmp_path / "out")
    with pytest.raises(GptoptError) as info:
        pipe.add(step, **params).run()
    assert expected in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing ran, nothing written


class Verbose(Step):
    """Raise an exception whose text is long and spans lines (a plugin bug)."""

    name = "verbose-failure"

    def apply(self, ctx):
        raise ValueError("first line\nsecond line " + "x" * 5000)


@hookimpl
def gptopt_register_steps(register):
    register(Verbose)


def test_a_plugin_error_is_one_bounded_line(tmp_path, capsys, monkeypatch):
    import types
    import warnings

    from gptopt_core.cli import main
    from gptopt_core.kit.testing import register_plugin

    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.txt").write_text("Some text. " * 50)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own: undone after
    saved = signal.getsignal(signal.SIGTERM)
    try:
        with register_plugin(types.SimpleNamespace(gptopt_register_steps=gptopt_register_steps), "verbose"):
            with pytest.raises(SystemExit) as info:
                main(["run", "--model", "tiny-random-gpt2", "--data", "d.txt", "--quiet", "verbose-failure"])
    finally:
        signal.signal(signal.SIGTERM, saved)
    lines = error_lines(capsys.readouterr().err)
    assert info.value.code == 1 and len(lines) == 1, lines
    assert "ValueError: first line\\nsecond line xxx" in lines[0] and len(lines[0]) < MAX_MESSAGE + 100
