"""Pipeline, plan validation, the three doors (CLI, recipe, Python), eval and data."""
import json
import math
import types

import pydantic
import pytest
import torch
import yaml
from conftest import run_gptopt

from gptopt_core import Fact, GptoptError, Params, ParamsError, Pipeline, PlanError, StateKey, Step, hookimpl
from gptopt_core.kit.data import TextData, split_documents
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.models import tiny_model
from gptopt_core.kit.testing import register_plugin


def _strip_timings(records):
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k != "seconds"}
        r["metrics"] = {k: v for k, v in r["metrics"].items() if k not in ("saved_to",)}
        out.append(r)
    return out


def test_cli_recipe_and_python_give_identical_records(tmp_path):
    args = ["eval", "--block-size", "128", "--max-tokens", "512", "eval", "--block-size", "64", "--stride", "32",
            "--max-tokens", "256"]
    cli = run_gptopt("run", "--model", "tiny-random-llama", "--seed", "3", "--out", tmp_path / "cli", "--quiet", *args)
    assert cli.returncode == 0, cli.stderr
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tiny-random-llama", "seed": 3, "steps": [
        {"eval": {"block_size": 128, "max_tokens": 512}}, {"eval": {"block_size": 64, "stride": 32, "max_tokens": 256}}]}))
    rec = run_gptopt("run", "--recipe", recipe, "--out", tmp_path / "rec", "--quiet")
    assert rec.returncode == 0, rec.stderr
    py = (Pipeline(model="tiny-random-llama", seed=3, out=tmp_path / "py", quiet=True)
          .add("eval", block_size=128, max_tokens=512).add("eval", block_size=64, stride=32, max_tokens=256).run())
    manifests = [json.loads((tmp_path / d / "run.json").read_text()) for d in ("cli", "rec", "py")]
    records = [_strip_timings(m["steps"]) for m in manifests]
    assert records[0] == records[1] == records[2]
    assert manifests[0]["recipe"] == manifests[1]["recipe"] == manifests[2]["recipe"]
    assert records[0][0]["metrics"]["perplexity"] == pytest.approx(py.records[0]["metrics"]["perplexity"])
    # run.json replays the same chain
    replay = run_gptopt("run", "--recipe", tmp_path / "cli" / "run.json", "--out", tmp_path / "replay", "--quiet")
    assert replay.returncode == 0, replay.stderr
    again = json.loads((tmp_path / "replay" / "run.json").read_text())
    assert _strip_timings(again["steps"]) == records[0]


class NeedsParams(Params):
    level: int = pydantic.Field(1, ge=0, le=3)


class Packs(Step):
    """Pretend to pack weights."""

    name = "packs"
    Params = NeedsParams
    provides = frozenset({"packed:4bit"})

    def apply(self, ctx):
        return {"level": self.params.level}


class Cuts(Step):
    """Pretend to cut weights."""

    name = "cuts"
    forbids = {"packed": "packed weights cannot be cut; put cuts before packs"}
    provides = frozenset({"cut"})

    def apply(self, ctx):
        ctx.state["cuts"] = True
        return {}


class NeedsCut(Step):
    """Needs a cut model."""

    name = "needs-cut"
    requires = {"cut": "run cuts first"}

    def apply(self, ctx):
        raise RuntimeError("boom")


plugin = types.SimpleNamespace(
    gptopt_register_steps=hookimpl(lambda register: [register(c) for c in (Packs, Cuts, NeedsCut)]),
    gptopt_register_vocabulary=hookimpl(lambda register: [register(w) for w in (
        StateKey("cuts", "whether cuts ran"), Fact("packed", "weights packed"), Fact("cut", "weights cut"))]))


def test_plan_is_validated_before_anything_loads():
    with register_plugin(plugin, "test-order"):
        pipe = Pipeline(model="./does/not/exist", quiet=True).add("packs").add("cuts")
        with pytest.raises(PlanError, match=r"step 2 'cuts' cannot run after packs: the model is packed:4bit \(packed "
                                            r"weights cannot be cut; put cuts before packs\)"):
            pipe.run()  # the model path is bad too, but the plan fails first
        with pytest.raises(PlanError, match="step 1 'needs-cut' needs cut: run cuts first"):
            Pipeline(model="tiny-random-gpt2").add("needs-cut").validate()
        Pipeline(model="tiny-random-gpt2").add("cuts").add("packs").add("needs-cut").validate()
        with pytest.raises(ParamsError, match=r"packs: level: Input should be less than or equal to 3 \(got 7\)"):
            Pipeline().add("packs", level=7)
        with pytest.raises(ParamsError, match="packs: unknown option 'levle'"):
            Pipeline().add("packs", levle=1)
    with pytest.raises(GptoptError, match="unknown step 'packs'"):
        Pipeline().add("packs")


def test_failed_step_is_recorded_and_named(tmp_path):
    from gptopt_core import StepFailed

    with register_plugin(plugin, "test-order"):
        pipe = Pipeline(model="tiny-random-gpt2", out=tmp_path / "o", quiet=True).add("cuts").add("needs-cut")
        with pytest.raises(StepFailed, match=r"step 'needs-cut' \(plugin test-order\) failed: RuntimeError: boom"):
            pipe.run()
    manifest = json.loads((tmp_path / "o" / "run.json").read_text())
    assert manifest["status"] == "failed"
    assert [(s["name"], s["status"]) for s in manifest["steps"]] == [("cuts", "ok"), ("needs-cut", "failed")]


def test_perplexity_matches_a_direct_computation():
    model, tok = tiny_model("tiny-random-gpt2")
    ids = torch.randint(0, 200, (300,), generator=torch.Generator().manual_seed(0))
    got = perplexity(model, ids, block_size=100, stride=100, max_tokens=300)
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in range(0, 300, 100):
            x = ids[b:b + 100].unsqueeze(0)
            logits = model(x).logits[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
            n += 99
    assert got["tokens"] == n and got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # a sliding window scores every token after the first exactly once
    slide = perplexity(model, ids, block_size=100, stride=50, max_tokens=300)
    assert slide["tokens"] == 299


def test_split_is_by_document_and_deterministic(tmp_path):
    docs = [f"document {i} " * 20 for i in range(25)]
    train, valid = split_documents(docs)
    assert len(valid) == 2 and not set(train) & set(valid) and split_documents(docs) == (train, valid)
    data = TextData.load("builtin:pydoc")
    assert len(data.valid_docs) == 7 and data.content_hash() == TextData.load("builtin:pydoc").content_hash()
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    (tmp_path / "d.csv").write_text("text\n" + "\n".join(docs))
    assert TextData.load(str(tmp_path / "d.jsonl")).valid_docs == valid
    assert TextData.load(str(tmp_path / "d.csv")).train_docs == [d.strip() for d in train] or \
        TextData.load(str(tmp_path / "d.csv")).train_docs == train
    (tmp_path / "notext.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(GptoptError, match="no 'text' column"):
        TextData.load(str(tmp_path / "notext.jsonl"))


def test_train_blocks_come_only_from_train_split():
    _, tok = tiny_model("tiny-random-llama")
    data = TextData.load("builtin:pydoc", tok)
    blocks = data.train_blocks(4, 64, seed=0)
    assert all(b.shape == (1, 64) for b in blocks)
    train = data.train_ids
    for b in blocks:
        windows = train.unfold(0, 64, 1)
        assert (windows == b[0]).all(dim=1).any()
    assert all(torch.equal(a, b) for a, b in zip(blocks, data.train_blocks(4, 64, seed=0)))
