"""Untrusted recipes, run.json files, model directories and output paths (issue 20): each hole closed with a test
that fails if it opens again. Mostly in-process and model-free, so fast."""
import base64
import json
import os
import time

import pytest
import yaml
from conftest import error_lines, run_gptopt
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptopt_core import GptoptError, Pipeline, Step
from gptopt_core.errors import MAX_MESSAGE
from gptopt_core.kit.paths import check_output_path
from gptopt_core.recipes import load_recipe_text, parse_recipe

# ~400 bytes that expand to 10**9 strings in a loader that follows aliases
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)) + "model: *i\nsteps: [eval]\n"


def test_binary_tagged_save_path_deletes_nothing(tmp_path):
    """The reproduction from the issue: a !!binary scalar became the real path after the check and --overwrite
    wiped the directory it named."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    work = tmp_path / "work"
    work.mkdir()
    encoded = base64.b64encode(str(victim).encode()).decode()
    (work / "r.yaml").write_text(f"model: tiny-random-gpt2\nsteps:\n  - save: {{to: !!binary {encoded}, "
                                 "overwrite: true}\n")
    proc = run_gptopt("run", "--recipe", "r.yaml", cwd=work)
    assert proc.returncode == 2 and "'!!binary' are not allowed" in error_lines(proc.stderr)[0], proc.stderr
    assert (victim / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("text, expected", [
    ("model: !!binary dGlueS1yYW5kb20tZ3B0Mg==\nsteps: [eval]\n", "'!!binary' are not allowed"),
    ("model: !!python/object/apply:os.system ['echo pwned > PWNED']\nsteps: [eval]\n", "'!!python/object/apply"),
    ("model: !!str tiny-random-gpt2\nsteps: [eval]\n", "'!!str' are not allowed"),
    ("model: !local tiny\nsteps: [eval]\n", "'!local' are not allowed"),
    ("steps: !!set {eval: null}\n", "'!!set' are not allowed"),
    ("model: &m tiny-random-gpt2\nsteps: [eval]\n", "anchors (&name) are not allowed"),
    ("model: *m\nsteps: [eval]\n", "aliases (*name) are not allowed"),
    ("steps: [eval]\n<<: *base\n", "aliases (*name) are not allowed"),
    (ALIAS_BOMB, "anchors (&name) are not allowed"),
    ("model: tiny-random-gpt2\nmodel: tiny-random-llama\nsteps: [eval]\n", "duplicate key 'model'"),
    ("steps:\n  - eval: {max_tokens: 600, max_tokens: 700}\n", "duplicate key 'max_tokens'"),
    ("steps: " + "[" * 200 + "]" * 200 + "\n", "nested deeper than 32 levels"),
    ("? [a, b]\n: 1\n", "a mapping key must be a plain value"),
])
def test_recipe_loader_builds_plain_data_only(text, expected):
    start = time.process_time()  # CPU time: expansion burns it, other jobs on a busy machine do not add to it
    with pytest.raises(GptoptError) as info:
        load_recipe_text(text)
    assert expected in str(info.value)
    assert len(str(info.value)) <= MAX_MESSAGE and "\n" not in str(info.value)
    assert time.process_time() - start < 1.0  # no expansion, no quadratic work


def test_plain_yaml_still_loads_and_dates_stay_strings():
    doc = load_recipe_text("model: tiny-random-gpt2\nseed: 3\ndata: 2024-01-01\nsteps:\n  - eval: {max_tokens: 600,"
                           " sample: null}\n  - save: {to: out/m, overwrite: false}\n")
    assert doc == {"model": "tiny-random-gpt2", "seed": 3, "data": "2024-01-01",
                   "steps": [{"eval": {"max_tokens": 600, "sample": None}}, {"save": {"to": "out/m",
                                                                                      "overwrite": False}}]}


def test_alias_bomb_on_the_cli_is_one_short_line(tmp_path):
    (tmp_path / "bomb.yaml").write_text(ALIAS_BOMB)
    assert len(ALIAS_BOMB) < 600
    proc = run_gptopt("run", "--recipe", "bomb.yaml", cwd=tmp_path, timeout=60)
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2 and len(lines) == 1 and "anchors" in lines[0] and len(lines[0]) < 400


@pytest.mark.parametrize("doc, expected", [
    ('{"recipe": {"model": "tiny-random-gpt2", "steps": ["eval"]}, "steps": [], "steps": []}', "duplicate key"),
    ('{"recipe": ' * 40 + "{}" + "}" * 40, "nested deeper than 32 levels"),
    ('{"recipe": {"model": "tiny-random-gpt2", "steps": [{"save": {"to": "/elsewhere/m"}}]}, "steps": []}',
     "escapes the working directory"),
])
def test_run_json_replay_goes_through_the_same_checks(tmp_path, monkeypatch, doc, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.json").write_text(doc)
    with pytest.raises(GptoptError, match=expected.replace("(", r"\(")):
        Pipeline.from_recipe(tmp_path / "run.json").validate()


def test_recipe_may_not_reach_out_through_a_symlink(tmp_path, monkeypatch):
    """The path is checked after it is resolved: a link inside the working directory to a directory outside it
    does not let a recipe write there."""
    outside, work = tmp_path / "outside", tmp_path / "work"
    outside.mkdir()
    work.mkdir()
    (work / "link").symlink_to(outside)
    monkeypatch.chdir(work)
    (work / "r.yaml").write_text("model: tiny-random-gpt2\nsteps:\n  - save: {to: link/m}\n")
    with pytest.raises(GptoptError, match="escapes the working directory"):
        Pipeline.from_recipe("r.yaml").validate()
    (work / "ok.yaml").write_text("model: tiny-random-gpt2\nsteps:\n  - save: {to: sub/m}\n")
    Pipeline.from_recipe("ok.yaml").validate()  # below the working directory: fine


class ExportLike(Step):
    """A plugin step with its own output path (as an export step's --to file)."""

    name = "export-like"
    path_params = ("to",)

    class Params(Step.Params):
        to: str


def test_every_path_param_of_every_step_is_checked_from_python(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    for bad, expected in ((tmp_path / "dangling", "dangling symlink"), (tmp_path / "file" / "m.gguf", "is a file"),
                          ("x" * 300, "longer than the file system allows")):
        pipe = Pipeline(model="tiny-random-gpt2")
        pipe.steps.append(ExportLike(to=str(bad)))
        with pytest.raises(GptoptError, match=expected):
            pipe.validate()
    with pytest.raises(GptoptError, match="dangling symlink"):
        Pipeline(model="tiny-random-gpt2").add("save", to=str(tmp_path / "dangling")).validate()


def test_check_output_path_refuses_bytes_and_returns_the_resolved_path(tmp_path):
    with pytest.raises(GptoptError, match="a path must be text, got bytes"):
        check_output_path(os.fsencode(tmp_path / "m"), "save --to")
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    assert check_output_path(str(tmp_path / "alias" / "m")) == (tmp_path / "real" / "m").resolve()
    with pytest.raises(GptoptError, match="escapes"):
        check_output_path(str(tmp_path / "alias" / "m"), confine_to=tmp_path / "elsewhere")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from gptopt_core.kit.models import tiny_model

    d = tmp_path_factory.mktemp("peft")
    model, tok = tiny_model("tiny-random-gpt2")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (d / "adapter" / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle
    return d


def test_pickle_adapter_needs_allow_pickle(adapter_dir):
    from gptopt_core.kit.models import check_local_dir

    with pytest.raises(GptoptError, match="pickle adapter \\(adapter_model.bin\\); pass --allow-pickle"):
        check_local_dir(adapter_dir, allow_pickle=False)
    check_local_dir(adapter_dir, allow_pickle=True)


def plain(value):
    if isinstance(value, dict):
        return all(isinstance(k, (str, int, float, bool, type(None))) and plain(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain(v) for v in value)
    return isinstance(value, (str, int, float, bool, type(None)))


YAML_BITS = st.sampled_from(["!!binary ", "!!python/name:os.system ", "&a ", "*a ", "<<: ", "? ", "- ", ": ", "[",
                             "]", "{", "}", ",", "\n", "  ", "'", '"', "#", "|", ">", "%YAML 1.1\n", "---\n", "~",
                             "model", "steps", "save", "to", "/tmp", "2024-01-01", "1e3", "0x1f", "yes", "\t",
                             "\\x00", "\u00e9", "eval"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(YAML_BITS, max_size=30).map("".join))
def test_any_yaml_text_loads_plain_data_or_fails_in_one_short_line(text):
    try:
        doc = load_recipe_text(text)
    except GptoptError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= MAX_MESSAGE
        return
    assert plain(doc)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(blacklist_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", ".", "..", "~", "/", "a/../../b", "x" * 300, "a/" * 3000, "m\x00", "~nosuchuser/x"]))
def test_any_save_path_is_accepted_or_refused_in_one_line(tmp_path, text):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        Pipeline(model="tiny-random-gpt2").add("save", to=text).validate()
    except GptoptError as exc:
        assert "\n" not in str(exc) and len(str(exc)) <= MAX_MESSAGE
    finally:
        os.chdir(cwd)
    assert sorted(os.listdir(tmp_path)) == []  # validation writes nothing


def test_recipe_file_too_large_is_refused_before_parsing(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("steps: [eval]\n#" + "x" * (5 * 2**20) + "\n")
    with pytest.raises(GptoptError, match="larger than 4 MiB"):
        parse_recipe(big)


def test_recipe_replay_of_plain_yaml_dump_still_works(tmp_path):
    recipe = {"gptopt": "0.1.0", "model": "tiny-random-gpt2", "data": "builtin:pydoc", "seed": 0, "device": "auto",
              "steps": [{"eval": {"block_size": 512, "stride": None, "max_tokens": 4096, "sample": None,
                                  "sample_tokens": 32, "split": "valid"}}]}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert parse_recipe(tmp_path / "recipe.yaml")["steps"][0][0] == "eval"
