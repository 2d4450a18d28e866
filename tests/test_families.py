"""The family matrix: every step on a tiny random model of every family in the architecture table.

One cell = one short chain on ``tiny-random-<family>`` (2 blocks, hidden 64), asserting what the step is for:
perplexity, quantized layers, integer grids exact, sparsity and the 2:4 pattern, trained weights, a reload by plain
``transformers`` at the same logits, and a GGUF file llama.cpp loads and predicts with as torch does. A cell a
family cannot run (GGUF for a family llama.cpp has no architecture for) must refuse in one line, before anything is
written. docs/architectures.md is generated from the same table and cell list (tests/test_docs.py keeps it in
sync).
"""
import numpy as np
import pytest
import torch

from gptopt_core import GptoptError, Pipeline, architecture_table
from gptopt_core.architectures import tiny_names
from gptopt_core.kit.families import FAMILIES
from gptopt_core.kit.grids import grid_layers, on_grid
from gptopt_core.matrix import CELLS, supported
from gptopt_core.kit.modules import weight_matrix, weight_modules

ARCH = {f"tiny-random-{a.name}": a for a in architecture_table().values()}
#: dense families; the mixture-of-experts rows run every cell in tests/test_moe.py (with checks on experts and routers)
NAMES = [n for n in tiny_names() if ARCH[n].moe is None]
EVAL = {"block_size": 64, "max_tokens": 256}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import pydoc_data.topics

    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(pydoc_data.topics.topics.values())[:12000])
    return str(path)


def run(model, text, steps, out=None):
    pipe = Pipeline(model=model, data=text, quiet=True, device="cpu", out=out)
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def block_layers(model, arch):
    """``{qualified name: module}`` of the linear layers inside the blocks, as the table names them."""
    blocks = model.get_submodule(arch.blocks)
    return {f"{arch.blocks}.{i}.{rel}": block.get_submodule(rel) for i, block in enumerate(blocks)
            for rel in arch.linear_layers}


def test_the_table_has_every_family_the_issue_names():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "gpt_neox", "gpt2"} <= \
        set(architecture_table())
    assert [a.model_type for a in FAMILIES] == list(architecture_table())[:len(FAMILIES)]


@pytest.mark.parametrize("name", NAMES)
def test_the_table_describes_the_model(name):
    """Blocks, linear layers, embedding, head and norms are where the row says; the sequential groups are the ones
    the calibration engine sees in the data flow (layers reading one input tensor)."""
    from gptopt_core.kit.calibration import _Collector, capture_first_inputs, find_blocks
    from gptopt_core.kit.models import tiny_model

    arch = ARCH[name]
    model, tok = tiny_model(name)
    prefix, blocks = find_blocks(model)
    assert prefix == arch.blocks and len(blocks) == model.config.num_hidden_layers
    layers = block_layers(model, arch)
    assert set(layers) == {n for n, _ in weight_modules(model) if n.startswith(arch.blocks + ".")}
    assert model.get_submodule(arch.embedding) is model.get_input_embeddings()
    assert model.get_submodule(arch.head) is model.get_output_embeddings()
    model.get_submodule(arch.final_norm)
    for rel in arch.extra_norms:
        blocks[0].get_submodule(rel)
    ids = torch.tensor([tok("def f(x): return x * 2  # a test of the groups")["input_ids"]])
    inputs = capture_first_inputs(model, blocks, [ids], "cpu")
    block0 = {rel: blocks[0].get_submodule(rel) for rel in arch.linear_layers}
    hooks = _Collector(block0, kinds=(), record_order=True)
    try:
        hooks.run(blocks[0], inputs)
        seen = hooks.groups()
    finally:
        hooks.remove()
    assert [tuple(sorted(g)) for g in seen] == [tuple(sorted(g)) for g in arch.groups]


def two_of_four(matrix) -> bool:
    groups = (matrix != 0).reshape(matrix.shape[0], -1, 4).sum(-1)
    return bool((groups <= 2).all())


def check_eval(res, arch):
    ppl = res.records[0]["metrics"]["perplexity"]
    assert np.isfinite(ppl) and 1 < ppl < 10 * 257


def check_bnb(res, arch):
    m = res.records[0]["metrics"]
    assert m["quantized_modules"] >= len(arch.linear_layers) * res.model.config.num_hidden_layers
    assert m["model_bytes"] < m["bytes_before"]
    assert np.isfinite(res.records[1]["metrics"]["perplexity"])


def check_grids(res, arch):
    grids = {n: (m, g) for n, m, g in grid_layers(res.model)}
    layers = block_layers(res.model, arch)
    assert set(layers) <= set(grids)
    for name, (module, grid) in grids.items():
        assert on_grid(module, grid), name
    assert np.isfinite(res.records[1]["metrics"]["perplexity"])


def check_prune(pattern):
    def check(res, arch):
        for name, module in block_layers(res.model, arch).items():
            w = weight_matrix(module)
            assert abs(float((w == 0).float().mean()) - 0.5) < 0.02, name
            if pattern == "2:4":
                assert two_of_four(w), name
        assert np.isfinite(res.records[1]["metrics"]["perplexity"])
    return check


def check_trained(res, arch):
    from gptopt_core.kit.models import tiny_model

    before = dict(weight_modules(tiny_model(f"tiny-random-{arch.name}")[0]))
    after = dict(weight_modules(res.model))
    assert not any(hasattr(m, "lora_A") for m in res.model.modules())  # merged / plain model
    changed = [n for n in before if not torch.equal(before[n].weight, after[n].weight)]
    assert len(changed) >= len(arch.linear_layers)
    assert np.isfinite(res.records[-1]["metrics"]["perplexity"])


def check_l1(res, arch):
    """Trained as check_trained, and l1's proximal steps zeroed weights of every block layer (finetune alone
    zeroes none), as its own metrics report."""
    check_trained(res, arch)
    m = res.records[1]["metrics"]
    assert m["l1_layers_regularized"] >= len(arch.linear_layers) * res.model.config.num_hidden_layers
    zeros = {n: float((weight_matrix(mod) == 0).float().mean()) for n, mod in block_layers(res.model, arch).items()}
    assert m["l1_zero_fraction"] > 0.01 and all(z > 0.01 for z in zeros.values()), (m["l1_zero_fraction"], zeros)


def check_cpu_fast(res, arch):
    assert res.records[0]["metrics"]["format"] == "bf16"
    layers = block_layers(res.model, arch)  # the step converted the model: every block layer computes in bf16
    assert layers and {weight_matrix(m).dtype for m in layers.values()} == {torch.bfloat16}
    assert np.isfinite(res.records[1]["metrics"]["perplexity"])


def check_saved(res, arch, out):
    """Plain ``from_pretrained`` reads the saved directory with nothing initialised at random, same logits."""
    from transformers import AutoModelForCausalLM

    plain, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not any(info.values()), info
    ids = res.ctx.data.valid_ids[:64].unsqueeze(0)
    with torch.inference_mode():
        want, got = res.model(ids).logits.float(), plain.eval()(ids).logits.float()
    assert torch.allclose(got, want, atol=1e-3 * float(want.abs().max()), rtol=0), float((got - want).abs().max())


#: llama.cpp's perplexity over torch's on the same held-out windows (the ``llamacpp`` step's
#: ``perplexity_vs_last_eval``): f32 computes what torch does; q8_0 / q4_0 hold the chain's grids exactly, and ggml
#: multiplies them with activations rounded to q8_0 blocks (measured within 0.3 % on these models)
PPL_RATIO = {"f32": 1e-3, "q8_0": 0.01, "q4_0": 0.01}


def torch_rows(res) -> dict:
    """``{GGUF tensor name: torch float32 values}`` of the run's model, rows in llama.cpp's order."""
    from gptopt_export.tensors import sources

    return {s.name: s.values.numpy() for s in sources(res.model)}


def check_saved_roundtrip(res, arch, out):
    """The saved directory reads back by plain ``transformers`` (:func:`check_saved`) and by gptopt itself (``--model
    DIR``: its pre-load checks pass), at the same logits, and a family llama.cpp runs exports from it."""
    check_saved(res, arch, out)
    # Qwen2: transformers 5 reloads a saved directory with Qwen2's own tokenizer class (Split + ByteLevel), which
    # the exporter writes as llama.cpp's qwen2 pre-tokenizer
    exports = arch.gguf is not None
    steps = [("export", {"to": str(out.parent / "back.gguf"), "type": "f32"})] if exports else [("eval", EVAL)]
    back = Pipeline(model=str(out), data=res.ctx.data_spec, quiet=True, device="cpu")
    for name, params in steps:
        back.add(name, **params)
    again = back.run()
    ids = res.ctx.data.valid_ids[:64].unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(again.model(ids).logits, res.model(ids).logits)
    assert not exports or (out.parent / "back.gguf").stat().st_size > 0


def check_gguf(type_name):
    def check(res, arch, out):
        from gguf import GGUFReader, quants

        measured = res.records[-1]["metrics"]
        assert res.records[-1]["name"] == "llamacpp" and measured["gguf_path"] == str(out)
        assert abs(measured["perplexity_vs_last_eval"] - 1) <= PPL_RATIO[type_name], measured
        if type_name == "f32":
            assert measured["llamacpp_decode_tokens_per_s"] > 0
            return
        # grids exact: every block weight de-quantizes (gguf-py, ggml's reference) to exactly the torch weight
        want, checked = torch_rows(res), 0
        for t in GGUFReader(str(out)).tensors:
            if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2:
                assert t.tensor_type.name == type_name.upper(), t.name
                values = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(want[t.name].shape)
                assert np.array_equal(values, want[t.name]), (t.name, float(np.abs(values - want[t.name]).max()))
                checked += 1
        assert checked >= len(arch.linear_layers) * res.model.config.num_hidden_layers
    return check


RTN = {"method": "rtn", "group_size": "32", "symmetric": True}
GPTQ = {"method": "gptq", "bits": 4, "group_size": "32", "calib_blocks": 4, "calib_seq_len": 32}
PRUNE = {"calib_samples": 4, "calib_seq_len": 32}
#: the llamacpp step as a user runs it, on eval's windows (with a short bench in the f32 cell only: speed is not
#: what the matrix checks)
LLAMACPP = {"block_size": EVAL["block_size"], "max_tokens": EVAL["max_tokens"], "bench": False, "threads": 2}
BENCH = {"bench": True, "prompt_tokens": 16, "new_tokens": 4, "warmup": 0, "repeats": 1}
FAST = {"steps": 2, "batch_size": 2, "seq_len": 32, "warmup_steps": 0}

#: cell -> (steps, check); a check taking ``out`` gets the path the chain saved / exported to
RECIPES = {
    "eval": ([("eval", EVAL)], check_eval),
    "quantize bnb int8": ([("quantize", {"bits": 8}), ("eval", EVAL)], check_bnb),
    "quantize bnb nf4": ([("quantize", {"bits": 4}), ("eval", EVAL)], check_bnb),
    "quantize rtn int4": ([("quantize", {**RTN, "bits": 4}), ("eval", EVAL)], check_grids),
    "quantize gptq int4": ([("quantize", GPTQ), ("eval", EVAL)], check_grids),
    "prune magnitude": ([("prune", {"method": "magnitude", "sparsity": 0.5}), ("eval", EVAL)], check_prune("")),
    "prune magnitude 2:4": ([("prune", {"method": "magnitude", "pattern": "2:4"}), ("eval", EVAL)],
                            check_prune("2:4")),
    "prune wanda": ([("prune", {"method": "wanda", "sparsity": 0.5, **PRUNE}), ("eval", EVAL)], check_prune("")),
    "prune wanda 2:4": ([("prune", {"method": "wanda", "pattern": "2:4", **PRUNE}), ("eval", EVAL)],
                        check_prune("2:4")),
    "prune sparsegpt": ([("prune", {"method": "sparsegpt", "sparsity": 0.5, **PRUNE}), ("eval", EVAL)],
                        check_prune("")),
    "prune sparsegpt 2:4": ([("prune", {"method": "sparsegpt", "pattern": "2:4", **PRUNE}), ("eval", EVAL)],
                            check_prune("2:4")),
    "lora + merge": ([("lora", {"r": 4, "merge": True, "lr": 1e-2, **FAST}), ("eval", EVAL)], check_trained),
    "finetune": ([("finetune", {"lr": 1e-3, **FAST}), ("eval", EVAL)], check_trained),
    "l1 + finetune": ([("l1", {"weight": 5.0}), ("finetune", {"lr": 1e-3, **FAST}), ("eval", EVAL)],
                      check_l1),
    "cpu-fast": ([("cpu-fast", {"format": "bf16", "guard": False}), ("eval", EVAL)], check_cpu_fast),
    "save safetensors": ([("save", {"format": "safetensors"})], check_saved_roundtrip),
    "save compressed-tensors": ([("quantize", {**RTN, "bits": 4}), ("save", {"format": "compressed-tensors"})],
                                check_saved),
    "export gguf f32 + llamacpp": ([("eval", EVAL), ("export", {"type": "f32"}), ("llamacpp", {**LLAMACPP, **BENCH})],
                                   check_gguf("f32")),
    "rtn int8 -> export gguf q8_0 + llamacpp": ([("quantize", {**RTN, "bits": 8}), ("eval", EVAL),
                                                 ("export", {"type": "auto"}), ("llamacpp", LLAMACPP)],
                                                check_gguf("q8_0")),
    "gptq int4 -> export gguf q4_0 + llamacpp": ([("quantize", GPTQ), ("eval", EVAL), ("export", {"type": "auto"}),
                                                  ("llamacpp", LLAMACPP)], check_gguf("q4_0")),
}


def test_the_recipes_cover_every_cell():
    """The cells are the ones the plugins owning their steps declare (gptopt_register_vocabulary); each has a recipe
    here and a built-in owner."""
    from gptopt_core import get_plugins

    assert sorted(RECIPES) == sorted(CELLS)
    owners = {CELLS[c].plugin for c in CELLS}
    assert {"gptopt-core", "gptopt-quantize", "gptopt-prune", "gptopt-export"} <= owners
    assert all(get_plugins().info[o].builtin or get_plugins().info[o].distribution == "gptopt" for o in owners)


def _with_target(steps, out):
    fixed = []
    for name, params in steps:
        if name == "save":
            params = {**params, "to": str(out)}
        elif name == "export":
            params = {**params, "to": str(out)}
        fixed.append((name, params))
    return fixed


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("name", NAMES)
def test_family_matrix(name, cell, text, tmp_path):
    arch = ARCH[name]
    steps, check = RECIPES[cell]
    out = tmp_path / ("m.gguf" if "export" in cell else "m")
    steps = _with_target(steps, out)
    why = supported(arch, cell)
    if why is not None:  # the family cannot run this cell: one line, nothing written
        with pytest.raises(GptoptError) as info:
            run(name, text, steps)
        assert "\n" not in str(info.value) and arch.model_type in str(info.value)
        assert not out.exists()
        return
    res = run(name, text, steps)
    if "out" in check.__code__.co_varnames[:check.__code__.co_argcount]:
        check(res, arch, out)
    else:
        check(res, arch)


def test_gptopt_register_architectures_adds_a_family_and_blames_a_duplicate(text, tmp_path):
    """A plugin's row is used by every step (LoRA's auto targets, find_blocks, export); a model_type the core
    already registers is an error naming the second plugin."""
    import types

    from gptopt_core import Architecture, architecture_of, hookimpl
    from gptopt_core.kit.calibration import find_blocks
    from gptopt_core.kit.models import tiny_model
    from gptopt_core.kit.testing import register_plugin

    llama = architecture_table()["llama"]
    # Llama's layout registered under another model_type: a model of it now has a family
    def tiny(vocab):
        config = llama.tiny(vocab)
        config.model_type = "my_llama"
        return config

    row = Architecture("my_llama", "my-llama", "model.layers", llama.groups, llama.embedding, llama.final_norm,
                       tiny=tiny, gguf=llama.gguf)
    plugin = types.SimpleNamespace(gptopt_register_architectures=hookimpl(lambda register: register(row)))
    model, _ = tiny_model("tiny-random-llama")
    model.config.model_type = "my_llama"
    assert architecture_of(model) is None
    with register_plugin(plugin, "my-family"):
        assert architecture_of(model) is row and row.plugin == "my-family"
        assert find_blocks(model)[0] == "model.layers"
        # from its groups (which must name every linear layer of a block: check_architecture)
        assert row.lora_targets == ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        from gptopt_transfer import resolve_targets

        names, _ = resolve_targets(model, ["auto"])
        assert {n.rsplit(".", 1)[-1] for n in names} == set(row.lora_targets)
        res = run("tiny-random-my-llama", text, [("export", {"to": str(tmp_path / "m.gguf"), "type": "f32"})])
        assert architecture_of(res.model) is row
        assert res.records[0]["metrics"]["gguf_architecture"] == "llama"
    assert architecture_of(model) is None  # unregistered with the plugin
    dup = types.SimpleNamespace(gptopt_register_architectures=hookimpl(lambda register: register(llama)))
    with pytest.raises(GptoptError, match="plugin dup-family: architecture 'llama' is already registered by "
                                          "gptopt-core"):
        with register_plugin(dup, "dup-family"):
            pass
    assert architecture_table()["llama"].plugin == "gptopt-core"


def test_unsupported_families_are_one_line_on_the_command_line(cli, tmp_path):
    from transformers import BloomConfig, BloomForCausalLM

    from gptopt_core.kit.models import byte_tokenizer

    opt = cli("run", "--model", "tiny-random-opt", "eval", "--max-tokens", "600", "export", "--to",
              tmp_path / "o.gguf")
    assert opt.returncode == 2 and "llama.cpp has no architecture for 'opt' models" in opt.stderr
    assert "Traceback" not in opt.stderr and not (tmp_path / "o.gguf").exists()
    bloom = BloomForCausalLM(BloomConfig(vocab_size=257, hidden_size=32, n_layer=2, n_head=2))
    bloom.save_pretrained(tmp_path / "bloom")
    byte_tokenizer().save_pretrained(tmp_path / "bloom")
    proc = cli("run", "--model", tmp_path / "bloom", "export", "--to", tmp_path / "b.gguf")
    lines = [l for l in proc.stderr.splitlines() if l.startswith("Error")]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "architecture 'bloom' is not in the architecture table; supported: gemma" in lines[0]
    assert "gptopt_register_architectures hook" in lines[0] and not (tmp_path / "b.gguf").exists()
    unknown = cli("run", "--model", "tiny-random-nosuch", "eval")
    assert unknown.returncode == 2 and "choose one of tiny-random-llama, tiny-random-mistral" in unknown.stderr


@pytest.mark.parametrize("name", [n for n in NAMES if ARCH[n].embedding_scale != "none"])
def test_bitsandbytes_quantizes_scaled_embeddings(name, text):
    """Gemma's token embedding scales its output (``embed_scale``, the table's ``embedding_scale``): ``quantize
    --embeddings 8`` quantizes it and keeps the scale, so the model computes as the float one does."""
    from gptopt_core.kit.models import tiny_model

    float_model, tok = tiny_model(name)
    res = run(name, text, [("quantize", {"bits": 8, "embeddings": "8"})])
    emb = res.model.get_input_embeddings()
    assert type(emb).__name__ == "ScaledQuantEmbedding8bit" and float(emb.embed_scale) == 8.0  # sqrt(64)
    ids = torch.tensor([tok("def f(x): return x ** 2  # scaled")["input_ids"]])
    with torch.inference_mode():
        want = float_model.get_input_embeddings()(ids)
        got = emb(ids).float()
    assert torch.allclose(got, want, atol=float(want.abs().max()) / 100), float((got - want).abs().max())
    plain = run(name, text, [("quantize", {"bits": 8})])
    assert res.records[0]["metrics"]["model_bytes"] < plain.records[0]["metrics"]["model_bytes"]
