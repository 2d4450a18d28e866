"""One writer registry: a third-party plugin's file writer (docs/save-formats.md's example, run as written) is an
``export --format`` value and a directory writer a ``save --format`` value, both chosen by facts under ``auto``; the
built-in bitsandbytes and cpu-fast writers are chosen by facts, not by attributes on the model."""
import json
import re
import types

import pytest
from conftest import ROOT

from gptopt_core import GptoptError, Pipeline, PlanError, Writer, hookimpl
from gptopt_core.plugins import get_plugins
from gptopt_core.kit.testing import make_context, register_plugin

LL = "tiny-random-llama"
PRUNE = ("prune", {"method": "magnitude", "sparsity": 0.5})


def docs_file_writer():
    """docs/save-formats.md's file writer example (``mask-json``), as the page writes it."""
    text = (ROOT / "docs" / "save-formats.md").read_text()
    code = re.search(r"A file writer example.*?```python\n(.*?)```", text, flags=re.S).group(1)
    module = types.ModuleType("mask_json_example")
    exec(compile(code, "save-formats.md", "exec"), module.__dict__)
    return module


class MaskDir(Writer):
    """A directory with the state dict and the masks' layer names."""

    name = "mask-dir"
    summary = "test: save_pretrained + masks.json"
    facts = frozenset({"masks"})

    def write(self, ctx, model, path, options):
        model.save_pretrained(str(path))
        (path / "masks.json").write_text(json.dumps(sorted(ctx.state["masks"])))


@pytest.fixture
def mask_writers():
    """The page's file writer (one plugin) and a directory writer of the same fact (another)."""
    plugin = types.SimpleNamespace(gptopt_register_writers=hookimpl(lambda register: register(MaskDir)))
    with register_plugin(docs_file_writer(), "mask-json-example"), register_plugin(plugin, "mask-dir-test"):
        yield get_plugins().info["mask-json-example"], get_plugins().info["mask-dir-test"]


def run(*steps, model=LL):
    pipe = Pipeline(model=model, device="cpu", quiet=True)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def test_a_plugins_file_writer_is_an_export_format_and_auto_picks_it_by_facts(mask_writers, tmp_path):
    files, dirs = mask_writers
    assert files.writers == ["mask-json"] and files.save_formats == [] and dirs.save_formats == ["mask-dir"]
    res = run(PRUNE, ("export", {"to": str(tmp_path / "a.json"), "format": "mask-json"}),
              ("export", {"to": str(tmp_path / "b.json"), "format": "auto"}))
    for record, name in zip(res.records[1:], ("a.json", "b.json")):
        assert record["metrics"]["format"] == "mask-json" and record["metrics"]["mask_layers"] == 14
        kept = json.loads((tmp_path / name).read_text())
        assert len(kept) == 14 and all(v == pytest.approx(0.5, abs=0.02) for v in kept.values())
    assert "gguf" not in res.records[-1]["facts"]  # only the gguf writer gives llamacpp its file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]  # no temporary left
    with pytest.raises(PlanError, match="export --format gguf: give a file name ending in .gguf"):
        run(("export", {"to": str(tmp_path / "c.json"), "format": "auto"}))  # no masks: auto is gguf
    with pytest.raises(PlanError, match="export: unknown format 'nope'; known formats: auto, gguf, mask-json$"):
        run(PRUNE, ("export", {"to": str(tmp_path / "d.json"), "format": "nope"}))
    with pytest.raises(PlanError, match="export --format mask-json: --type are options of --format gguf"):
        run(PRUNE, ("export", {"to": str(tmp_path / "e.json"), "format": "mask-json", "type": "q8_0"}))
    with pytest.raises(PlanError, match="export --format mask-json: give a file name ending in .json"):
        run(PRUNE, ("export", {"to": str(tmp_path / "f.bin"), "format": "mask-json"}))


def test_a_plugins_directory_writer_is_a_save_format_and_auto_picks_it_by_facts(mask_writers, tmp_path):
    res = run(PRUNE, ("save", {"to": str(tmp_path / "m")}))
    assert res.records[1]["metrics"]["format"] == "mask-dir"
    assert len(json.loads((tmp_path / "m" / "masks.json").read_text())) == 14
    plain = run(("save", {"to": str(tmp_path / "p")}))  # no masks: the core's fallback
    assert plain.records[0]["metrics"]["format"] == "safetensors" and not (tmp_path / "p" / "masks.json").exists()
    with pytest.raises(PlanError, match="save: unknown format 'mask-json'; known formats: auto, bitsandbytes, "
                                        "compressed-tensors, cpu-fast, mask-dir, safetensors"):
        run(("save", {"to": str(tmp_path / "x"), "format": "mask-json"}))  # a file writer is not a save format


def test_a_writer_of_another_kind_or_a_taken_name_rejects_the_plugin():
    class Odd(Writer):
        name, kind = "odd", "tarball"

    class Taken(Writer):
        name, kind = "gguf", "directory"

    for cls, message in ((Odd, "writer 'odd': kind must be one of directory, file"),
                         (Taken, "save format 'gguf' is already registered by plugin gptopt-export")):
        plugin = types.SimpleNamespace(gptopt_register_writers=hookimpl(lambda register, c=cls: register(c)))
        with pytest.raises(GptoptError, match=message):
            with register_plugin(plugin, "bad-writer"):
                pass


def test_bitsandbytes_and_cpu_fast_writers_are_chosen_by_facts_not_model_attributes():
    from gptopt_core.writers import specialized

    ctx = make_context(LL)
    assert specialized(ctx, ctx.model, "safetensors") is None  # a float model: save_pretrained
    ctx.model.gptopt_cpu = {"format": "int8-dynamic"}  # an attribute alone chooses nothing
    assert specialized(ctx, ctx.model, "safetensors") is None
    for facts, name in (({"cpu-only", "quantized:cpu-int8"}, "cpu-fast"), ({"quantized:4bit"}, "bitsandbytes"),
                        ({"quantized:8bit", "adapter"}, "bitsandbytes")):
        ctx.facts = set(facts)
        assert specialized(ctx, ctx.model, "safetensors").name == name
    with pytest.raises(PlanError, match="save --format bitsandbytes: the model has no bitsandbytes layers"):
        run(("save", {"to": "unused-dir", "format": "bitsandbytes"}))
