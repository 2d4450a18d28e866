"""save --format compressed-tensors (gptopt-ctensors) and the save-format registry, on the tiny GPT-2 (Conv1D) and
tiny Llama (nn.Linear): packed integer grids, bitmask / 2:4 sparsity, reload through gptopt and plain
transformers, the config against compressed-tensors' own schema and llm-compressor's layout, refusals."""
import json

import pytest
import torch

from gptopt_core import GptoptError, Pipeline, PlanError, get_plugins
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.grids import grid_layers
from gptopt_core.kit.metrics import model_bytes
from gptopt_core.kit.modules import weight_matrix, weight_modules

EVAL = {"block_size": 128, "max_tokens": 512}
PRUNE = {"calib_samples": 4, "calib_seq_len": 32}

# the top-level keys compressed-tensors' ModelCompressor.update_config writes after an llm-compressor run
LLMC_TOP = {"config_groups", "format", "ignore", "kv_cache_scheme", "quant_method", "quantization_status",
            "sparsity_config", "transform_config", "version"}


def llmc_group(bits, group_size, symmetric):
    """The config group llm-compressor writes for `QuantizationModifier(scheme="W4A16" / "W4A16_ASYM" / W8A16)`:
    compressed-tensors' preset scheme, its group size / strategy set as the modifier's args set them, format filled
    in by ModelCompressor (pack-quantized for integer weight-only schemes)."""
    from compressed_tensors.quantization import preset_name_to_scheme

    group = preset_name_to_scheme("W4A16" if symmetric else "W4A16_ASYM", ["Linear"]).model_dump()
    group["weights"]["num_bits"] = bits
    if group_size == "channel":
        group["weights"].update(strategy="channel", group_size=None)
    else:
        group["weights"]["group_size"] = int(group_size)
    group["format"] = "pack-quantized"
    return group


def run(model, *steps, **kw):
    pipe = Pipeline(model=model, quiet=True, device="cpu", **kw)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def ppl(model, res):
    return perplexity(model, res.ctx.data.valid_ids, 128, 128, 512)["perplexity"]


def quant_config(path):
    return json.loads((path / "config.json").read_text())["quantization_config"]


def plain_ppl(path, res, step=1):
    """Perplexity of plain ``transformers.AutoModelForCausalLM.from_pretrained(path)`` relative to the saved model's
    (``res.records[step]``), after checking that transformers initialised nothing at random."""
    from transformers import AutoModelForCausalLM

    plain, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched tensors
    return ppl(plain, res) / res.records[step]["metrics"]["perplexity"]


@pytest.mark.parametrize("arch,quant", [
    ("tiny-random-llama", {"bits": 4, "group_size": "32", "symmetric": True}),
    ("tiny-random-llama", {"bits": 4, "group_size": "32", "symmetric": False}),
    ("tiny-random-gpt2", {"bits": 8, "group_size": "channel", "symmetric": False}),
])  # (GPT-2 int4 asymmetric groups and a tied int8 embedding: test_asymmetric_int4_groups_round_trip_exactly)
def test_grid_model_saves_packed_and_reloads_the_same(arch, quant, tmp_path, capsys):
    from compressed_tensors.quantization import QuantizationConfig

    out = tmp_path / "m"
    res = run(arch, ("quantize", {"method": "rtn", **quant}), ("eval", EVAL), ("save", {"to": str(out)}))
    held = res.records[1]["metrics"]["model_bytes"]
    assert res.records[2]["metrics"]["format"] == "compressed-tensors"  # auto: grids -> compressed-tensors
    on_disk = (out / "model.safetensors").stat().st_size
    assert abs(on_disk / held - 1) < 0.05, (on_disk, held)
    qc = quant_config(out)
    QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema
    assert LLMC_TOP <= set(qc) and qc["format"] == "pack-quantized" and qc["quantization_status"] == "compressed"
    group = qc["config_groups"]["group_0"]
    expected = llmc_group(quant["bits"], quant["group_size"], quant["symmetric"])
    note = capsys.readouterr().err
    if arch == "tiny-random-llama":  # targets Linear, head ignored: llm-compressor's layout exactly
        assert group == expected and qc["ignore"] == ["lm_head"]
        # asymmetric packed zero points: transformers reads them only through its de-quantizing route
        assert qc.get("dequantize", False) is not quant["symmetric"]
        assert ("reads it de-quantized" in note) is not quant["symmetric"]
    else:  # GPT-2's Conv1D layers: their own (in, out) orientation, one block per column, named one by one
        weights = {**expected["weights"], "strategy": "block", "block_structure": [256, 1]}
        assert {**group, "targets": ["Linear"]} == {**expected, "weights": weights} and len(group["targets"]) == 8
        assert qc["dequantize"] is True and "GPT-2 Conv1D grids" in note

    # gptopt reads it back: same weights (Conv1D transposed back), grids re-attached, same bytes and perplexity
    again = run(str(out), ("eval", EVAL))
    assert again.records[0]["metrics"]["perplexity"] == res.records[1]["metrics"]["perplexity"]
    assert again.records[0]["metrics"]["model_bytes"] == held
    assert "quantized:grid" in again.ctx.facts
    before = dict(weight_modules(res.model))
    for name, module in weight_modules(again.model):
        assert torch.equal(module.weight, before[name].weight), name
    assert [(n, g.describe()) for n, _, g in grid_layers(again.model)] == \
        [(n, g.describe()) for n, _, g in grid_layers(res.model)]

    # plain transformers (its compressed-tensors quantizer) reads it too: same perplexity (fp16 de-quantization)
    assert abs(plain_ppl(out, res) - 1) < 1e-4


def tied_llama(path):
    """tiny-random-llama with its head tied to the token embedding (as SmolLM2's), saved to ``path``."""
    from gptopt_core.kit.models import tiny_model

    model, tokenizer = tiny_model("tiny-random-llama")
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_embeddings_and_head_reload_in_plain_transformers(tied, tmp_path):
    """quantize --embeddings 8: token embedding and head as naive-quantized int8 (a tied head: targeted with its own
    scale, its weight written once); transformers reads them exactly beside the packed int4 Linear layers."""
    from safetensors import safe_open

    from gptopt_core.saveformats import tensor_bytes

    model = tied_llama(tmp_path / "tied") if tied else "tiny-random-llama"
    out = tmp_path / "m"
    res = run(model, ("quantize", {"method": "rtn", "bits": 4, "group_size": "32", "embeddings": "8"}),
              ("eval", EVAL), ("save", {"to": str(out)}))
    held = res.records[1]["metrics"]["model_bytes"]
    assert abs(tensor_bytes(out) / held - 1) < 0.02  # int8 weight as packed int8, + a tied head's scale (1.1 % here)
    qc = quant_config(out)
    emb = qc["config_groups"]["group_1"]
    assert emb["format"] == "naive-quantized" and emb["targets"] == ["lm_head", "model.embed_tokens"]
    assert emb["weights"]["num_bits"] == 8 and emb["weights"]["strategy"] == "channel"
    assert qc["format"] == "mixed-precision" and "dequantize" not in qc
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.int8
    assert ("lm_head.weight" in keys) is not tied and "lm_head.weight_scale" in keys
    again = run(str(out), ("eval", EVAL))
    assert again.records[0]["metrics"]["perplexity"] == res.records[1]["metrics"]["perplexity"]
    assert again.records[0]["metrics"]["model_bytes"] == held
    assert plain_ppl(out, res) == pytest.approx(1, abs=1e-4)


@pytest.mark.parametrize("arch", ["tied-llama", "tiny-random-gpt2"])
def test_what_plain_transformers_cannot_read_is_said_at_save_and_fails_loudly(arch, tmp_path, capsys):
    """Asymmetric packed zero points or Conv1D blocks beside another config group (here the int8 embedding's):
    transformers' default route cannot hold them and its de-quantizing one takes one scheme for every layer
    (docs/save-formats.md). save says so in one line; transformers errors or reports the layers it left
    uninitialised - it never loads them silently."""
    from transformers import AutoModelForCausalLM

    model = tied_llama(tmp_path / "tied") if arch == "tied-llama" else arch
    out = tmp_path / "m"
    run(model, ("quantize", {"method": "rtn", "bits": 4, "group_size": "32", "embeddings": "8",
                             "symmetric": arch != "tied-llama"}), ("save", {"to": str(out)}))
    note = [line for line in capsys.readouterr().err.splitlines() if "from_pretrained" in line]
    what = "asymmetric packed zero points" if arch == "tied-llama" else "GPT-2 Conv1D grids"
    assert len(note) == 1 and f"cannot read {what} beside another scheme" in note[0]
    assert "`gptopt run --model DIR`" in note[0] and "dequantize" not in quant_config(out)
    # (gptopt reads these layouts exactly: test_asymmetric_int4_groups_round_trip_exactly)
    if arch == "tied-llama":  # compressed-tensors builds the zero point unpacked: size mismatch, an error
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(str(out))
    else:  # Conv1D is never quantized by compressed-tensors: transformers reports their weights missing
        _, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert len(info["missing_keys"]) == 8 and all(k.endswith(".weight") for k in info["missing_keys"])


@pytest.mark.parametrize("arch,pattern,fmt", [("tiny-random-llama", "2:4", "sparse-24-bitmask"),
                                              ("tiny-random-gpt2", None, "sparse-bitmask")])
def test_pruned_model_saves_sparse_and_reloads_exact_zeros(arch, pattern, fmt, tmp_path, capsys):
    from compressed_tensors.config import SparsityCompressionConfig

    prune = {"method": "wanda", **PRUNE, **({"pattern": pattern} if pattern else {"sparsity": 0.5})}
    res = run(arch, ("prune", prune), ("eval", EVAL), ("save", {"to": str(tmp_path / "ct"),
                                                                 "format": "compressed-tensors"}),
              ("save", {"to": str(tmp_path / "dense")}))
    assert res.records[3]["metrics"]["format"] == "safetensors"  # auto keeps a pruned float model dense
    sc = quant_config(tmp_path / "ct")["sparsity_config"]
    SparsityCompressionConfig.load_from_registry(sc["format"], **sc)
    assert sc["format"] == fmt and sc["global_sparsity"] == 0.5
    assert (tmp_path / "ct" / "model.safetensors").stat().st_size < (tmp_path / "dense" / "model.safetensors").stat().st_size
    again = run(str(tmp_path / "ct"), ("eval", EVAL))
    assert again.records[0]["metrics"]["perplexity"] == res.records[1]["metrics"]["perplexity"]
    masks = res.ctx.state["masks"]
    for name, module in weight_modules(again.model):
        assert torch.equal(module.weight != 0, masks[name]), name

    # compressed-tensors 0.20.1 has no sparse decompressor: save says so in one line, and plain transformers
    # reports every sparse layer's weight missing (initialised at random), never loads it silently
    from transformers import AutoModelForCausalLM

    note = [line for line in capsys.readouterr().err.splitlines() if "from_pretrained" in line]
    assert len(note) == 1 and f"cannot read bitmask sparsity ({len(masks)} sparse layers" in note[0]
    assert "save --format safetensors" in note[0]
    _, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(f"{n}.weight" for n in masks)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_pruned_then_quantized_keeps_zeros_in_the_codes_and_loads_in_transformers(method, tmp_path):
    """2:4 then an int4 grid: the zeros live in the packed codes, so plain transformers reads the model with its
    sparsity exact; no sparsity config is written (compressed-tensors 0.20 writes none; vLLM 0.24 refuses one with
    targets even in format "dense")."""
    from transformers import AutoModelForCausalLM

    quant = {"method": method, "bits": 4, "group_size": "32", **({"calib_blocks": 4, "calib_seq_len": 32}
                                                                  if method == "gptq" else {})}
    res = run("tiny-random-llama", ("prune", {"method": "magnitude", "pattern": "2:4"}), ("quantize", quant),
              ("eval", EVAL), ("save", {"to": str(tmp_path / "m")}))
    qc = quant_config(tmp_path / "m")
    assert qc["sparsity_config"] == {} and LLMC_TOP <= set(qc)
    masks = res.ctx.state["masks"]
    assert abs(plain_ppl(tmp_path / "m", res, step=2) - 1) < 1e-4
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"))
    plain(torch.tensor([[1, 2, 3]]))  # compressed-tensors decompresses the packed layers on the first forward
    for name, module in weight_modules(plain):
        if name in masks:
            assert not weight_matrix(module)[~masks[name]].any(), name  # pruned stay zero


@pytest.mark.parametrize("arch", ["tiny-random-llama", "tiny-random-gpt2"])
def test_asymmetric_int4_groups_round_trip_exactly(arch, tmp_path):
    """Unsigned codes / zero points <-> compressed-tensors' signed ones, packed 8 per int32, both layouts."""
    from gptopt_core.kit.grids import fit_grid, grid_codes, grid_of, round_to_grid
    from gptopt_core.saveformats import tensor_bytes
    from gptopt_core.kit.testing import make_context
    from gptopt_ctensors import load_model
    from gptopt_ctensors.writer import write

    ctx = make_context(model=arch)
    for _, module in weight_modules(ctx.model):
        round_to_grid(module, fit_grid(weight_matrix(module), 4, 32, symmetric=False))
    emb = ctx.model.get_input_embeddings()  # GPT-2's head is tied to it: written once, tied again on load
    round_to_grid(emb, fit_grid(emb.weight, 8, None, symmetric=True))
    write(ctx, ctx.model, tmp_path)
    ctx.tokenizer.save_pretrained(str(tmp_path))
    model, _, info = load_model(tmp_path)
    assert info["grids"] == len(weight_modules(ctx.model)) + 1
    assert model_bytes(model) == model_bytes(ctx.model)
    # Conv1D blocks keep int8 zero points (compressed-tensors packs them only for group / channel): +2.7 % here
    assert abs(tensor_bytes(tmp_path) / model_bytes(ctx.model) - 1) < (0.01 if arch == "tiny-random-llama" else 0.05)
    assert torch.equal(model.get_input_embeddings().weight, emb.weight)
    if arch == "tiny-random-gpt2":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    loaded = dict(weight_modules(model))
    for name, module in weight_modules(ctx.model):
        assert torch.equal(grid_codes(loaded[name]), grid_codes(module)), name
        assert torch.equal(grid_of(loaded[name]).zero, grid_of(module).zero), name
        assert torch.equal(loaded[name].weight, module.weight), name

    # the linear grids alone (one config group, written dequantize: true): plain transformers reads them too
    # (Conv1D's column blocks [32, 1] included), to fp16 de-quantization arithmetic
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.grids import detach_grid

    detach_grid(emb)
    (tmp_path / "grids").mkdir()
    write(ctx, ctx.model, tmp_path / "grids")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "grids"))
    ids = ctx.data.valid_ids[:64].unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ctx.model(ids).logits, atol=1e-3, rtol=0)


def test_refusals_name_a_format_that_holds_the_model(tmp_path):
    with pytest.raises(GptoptError, match="nothing to compress"):  # a float model: on the model, before writing
        run("tiny-random-llama", ("save", {"to": str(tmp_path / "c"), "format": "compressed-tensors"}))
    # nf4 + int8 embeddings: one BitsAndBytesConfig cannot hold it; refused unless --allow-dequantized
    with pytest.raises(GptoptError, match="int8 layers would be written de-quantized"):  # refused before writing
        run("tiny-random-llama", ("quantize", {"bits": 4, "embeddings": "8"}), ("save", {"to": str(tmp_path / "d")}))
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no partial directories
    # (--allow-dequantized writes it: tests/test_bnb.py saves such models that way)


def test_gptopt_register_save_formats_adds_a_format_and_blames_a_duplicate(tmp_path):
    import types

    from gptopt_core.saveformats import SaveFormat
    from gptopt_core.kit.testing import register_plugin

    class StateDictFormat(SaveFormat):
        name = "torch-state"
        summary = "test: torch.save of the state dict"

        def claims(self, ctx, model):
            return False

        def write(self, ctx, model, path, options):
            torch.save(model.state_dict(), path / "state.pt")

    plugin = types.SimpleNamespace(gptopt_register_save_formats=lambda register: register(StateDictFormat))
    plugin.gptopt_register_save_formats = __import__("gptopt_core").hookimpl(plugin.gptopt_register_save_formats)
    with register_plugin(plugin, "state-format"):
        res = run("tiny-random-gpt2", ("save", {"to": str(tmp_path / "s"), "format": "torch-state"}))
        assert res.records[0]["metrics"]["format"] == "torch-state"
        assert (tmp_path / "s" / "state.pt").is_file() and not (tmp_path / "s" / "model.safetensors").exists()
        with pytest.raises(PlanError, match="known formats: auto, bitsandbytes, compressed-tensors, cpu-fast, safetensors, torch-state"):
            run("tiny-random-gpt2", ("save", {"to": str(tmp_path / "x"), "format": "nope"}))

    class Twice(StateDictFormat):
        name = "safetensors"

    dup = types.SimpleNamespace()
    dup.gptopt_register_save_formats = __import__("gptopt_core").hookimpl(lambda register: register(Twice))
    with pytest.raises(GptoptError, match="plugin dup-format: save format 'safetensors' is already registered by "
                                          "plugin gptopt-core"):  # rejected as it loads, not when a save runs
        with register_plugin(dup, "dup-format"):
            pass
    assert "dup-format" not in get_plugins().info and get_plugins().formats["safetensors"][0] == "gptopt-core"


def test_save_format_is_planned_against_the_pipelines_own_plugins(tmp_path):
    """``Pipeline(plugins=X)`` checks ``save --format`` against X's formats, the ones it will save with (not the
    process-wide set's)."""
    import types

    from gptopt_core import SaveFormat, hookimpl
    from gptopt_core.kit import builtin
    from gptopt_core.plugins import CORE, Plugins

    class Own(SaveFormat):
        name = "own-format"

        def write(self, ctx, model, path, options):
            (path / "own.txt").write_text("x")

    plugins = Plugins(strict=True)
    plugins.register(builtin, CORE, builtin=True)
    plugins.register(types.SimpleNamespace(gptopt_register_save_formats=hookimpl(lambda register: register(Own))),
                     "own")
    res = Pipeline(model="tiny-random-gpt2", device="cpu", quiet=True, plugins=plugins).add(
        "save", to=tmp_path / "m", format="own-format").run()  # a Path is taken for --to, as for out=
    assert res.records[0]["metrics"]["format"] == "own-format" and (tmp_path / "m" / "own.txt").is_file()
    with pytest.raises(PlanError, match="unknown format 'own-format'"):
        Pipeline(model="tiny-random-gpt2", device="cpu").add("save", to=tmp_path / "n", format="own-format").validate()


@pytest.mark.slow
def test_smollm2_int4_g64_int8_embeddings_saves_packed_and_plain_transformers_reloads_it(tmp_path):
    """SmolLM2 (head tied to the embedding), RTN int4 g64 + int8 embeddings: at most 0.30x the dense fp32 bytes,
    within 5 % of model_bytes, and plain transformers reads it at the saved model's perplexity (within 0.1 %; 256
    held-out tokens: the figure docs/save-formats.md measures on 4096 by benchmarks/save_formats.py)."""
    from transformers import AutoModelForCausalLM

    from gptopt_core.saveformats import tensor_bytes

    res = run("smollm2-135m", ("quantize", {"method": "rtn", "bits": 4, "group_size": "64", "embeddings": "8"}),
              ("save", {"to": str(tmp_path / "m")}))
    held = model_bytes(res.model)
    dense = 4 * sum(p.numel() for p in res.model.parameters())  # fp32, the tied weight once
    written = tensor_bytes(tmp_path / "m")
    assert abs(written / held - 1) < 0.05 and written <= 0.30 * dense, (written, held, dense)
    saved = perplexity(res.model, res.ctx.data.valid_ids, 256, 256, 257)["perplexity"]
    plain, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), output_loading_info=True)
    assert not any(info.values()), info
    again = perplexity(plain, res.ctx.data.valid_ids, 256, 256, 257)["perplexity"]
    assert abs(again / saved - 1) < 0.001
