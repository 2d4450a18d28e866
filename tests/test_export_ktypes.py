"""export --type q2_k / q3_k / q4_k / q5_k / q6_k / iq4_nl and --imatrix: the numpy encoders against ggml's own quantizer, the
files loaded by llama.cpp and decoded by gguf-py to what the encoder wrote, llama.cpp's fallback for rows that are
not whole 256-weight super-blocks, and the importance matrix read back and used by llama.cpp's quantizer."""
import ctypes
import filecmp
import os

import numpy as np
import pytest
import torch

from gptopt_core.kit.models import tiny_model

pytest.importorskip("llama_cpp")
TEXT = "The quick brown fox jumps over the lazy dog. def f(x): return x ** 2  # 12345\n"
KTYPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl"]


def ggml_lib():
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def wide_llama():
    """A tiny Llama whose rows are whole 256-weight super-blocks (hidden 256, feed-forward 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = tiny_model("tiny-random-llama")
    vocab = len(tok)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval(), tok


def file_tensors(path):
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name.lower(), values.reshape([int(x) for x in reversed(t.shape)]))
    return out


@pytest.mark.parametrize("type_name", KTYPES)
def test_encoder_matches_ggml_quantizer(type_name):
    """Same block bytes as ggml's ``ggml_quantize_chunk`` (no imatrix) up to float summation order, same error."""
    import gguf

    from gptopt_export.ggml_types import get

    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 768)) * np.exp(rng.standard_normal((1, 768)) * 0.5) * 0.02).astype(np.float32)
    x[0, :256] = 0  # an empty super-block
    qtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    ours = get(type_name).quantize(x)  # the type table's encoder
    ref = np.zeros_like(ours)
    assert ggml_lib().ggml_quantize_chunk(int(qtype), x.ctypes.data, ref.ctypes.data, 0, 16, 768, None) == ours.nbytes
    assert (ours == ref).mean() > 0.99  # the rest: float sums in another order (ties between candidate scales)
    a, b = (gguf.quants.dequantize(v, qtype).reshape(x.shape) for v in (ours, ref))
    assert np.abs(a[0, :256]).max() == 0
    assert np.sqrt(((a - x) ** 2).mean()) <= 1.005 * np.sqrt(((b - x) ** 2).mean())


@pytest.mark.parametrize("type_name", ["q4_0", "iq4_nl", "q3_k", "q2_k"])
def test_weighted_encoder_matches_ggml_quantizer_with_an_imatrix(type_name):
    """The types the table gives an importance-weighted encoder write ggml's bytes for the same imatrix."""
    import gguf

    from gptopt_export.ggml_types import get, weighted_names

    assert type_name in weighted_names()
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((16, 768)) * np.exp(rng.standard_normal((1, 768)) * 0.5) * 0.02).astype(np.float32)
    qw = np.exp(rng.standard_normal(768) * 1.5).astype(np.float32)
    t = get(type_name)
    ours, plain = t.quantize(x, qw), t.quantize(x)
    ref = np.zeros_like(ours)
    assert ggml_lib().ggml_quantize_chunk(t.ggml_id, x.ctypes.data, ref.ctypes.data, 0, 16, 768, qw.ctypes.data) \
        == ours.nbytes
    assert (ours == ref).mean() > 0.99 and (ours != plain).mean() > 0.1
    a, b = (gguf.quants.dequantize(v, t.qtype()).reshape(x.shape) for v in (ours, ref))
    assert (qw * (a - x) ** 2).sum() <= 1.005 * (qw * (b - x) ** 2).sum()


@pytest.mark.parametrize("type_name", KTYPES)
def test_ktype_file_loads_in_llamacpp_and_decodes_to_the_encoder(type_name, tmp_path):
    """Every weight is written as the type; llama.cpp predicts as torch with the de-quantized weights."""
    from gptopt_export.ggml_types import get
    from gptopt_export.gguf_writer import write_gguf
    from gptopt_export.llamacpp import next_token_logits
    from gptopt_export.tensors import permute_rows

    model, tok = wide_llama()
    metrics = write_gguf(model, tok, tmp_path / "k.gguf", type_name, "f32")
    assert metrics["gguf_tensor_types"] == {"f32": 7, type_name: 14} and metrics["gguf_fallback_tensors"] == 0
    tensors = file_tensors(tmp_path / "k.gguf")
    v = model.model.layers[1].self_attn.v_proj.weight.detach().numpy()
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, type_name.upper())
    assert np.array_equal(tensors["blk.1.attn_v.weight"][1], gguf.quants.dequantize(get(type_name).quantize(v), qtype))
    with torch.no_grad():  # the torch model with the file's weights (q/k rows back from llama.cpp's order)
        for i, layer in enumerate(model.model.layers):
            for short, mod in (("attn_q", layer.self_attn.q_proj), ("attn_k", layer.self_attn.k_proj),
                               ("attn_v", layer.self_attn.v_proj), ("attn_output", layer.self_attn.o_proj),
                               ("ffn_gate", layer.mlp.gate_proj), ("ffn_up", layer.mlp.up_proj),
                               ("ffn_down", layer.mlp.down_proj)):
                w = torch.from_numpy(tensors[f"blk.{i}.{short}.weight"][1].copy())
                if short in ("attn_q", "attn_k"):
                    w[permute_rows(w.shape[0], 4 if short == "attn_q" else 2)] = w.clone()
                mod.weight.copy_(w)
    ids = tok(TEXT)["input_ids"]
    got = next_token_logits(tmp_path / "k.gguf", ids, threads=2)
    with torch.inference_mode():
        want = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # ggml multiplies with 8-bit activations
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("type_name, fallback", [("q4_k", "q5_0"), ("q3_k", "iq4_nl")])
def test_rows_not_whole_superblocks_fall_back_as_llamacpp(type_name, fallback, tmp_path):
    from gptopt_export.gguf_writer import write_gguf
    from gptopt_export.llamacpp import next_token_logits

    model, tok = tiny_model("tiny-random-llama")  # rows of 64 and 128 weights
    metrics = write_gguf(model, tok, tmp_path / "f.gguf", type_name)
    assert metrics["gguf_tensor_types"] == {"f32": 5, fallback: 16} and metrics["gguf_fallback_tensors"] == 16
    assert f"{type_name} -> {fallback} as llama.cpp" in metrics["gguf_fallback_examples"][0]
    assert next_token_logits(tmp_path / "f.gguf", tok(TEXT)["input_ids"], threads=1).shape[0] > 0


def gguf_keys_by_ggml(path):
    """(tensor count, the imatrix keys found) by ggml's own GGUF reader (what llama-quantize's loader calls)."""
    lib = ggml_lib()

    class InitParams(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, InitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(path).encode(), InitParams(True, None))
    assert ctx
    try:
        keys = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")
                if lib.gguf_find_key(ctx, k.encode()) >= 0]
        return lib.gguf_get_n_tensors(ctx), keys
    finally:
        lib.gguf_free(ctx)


def test_imatrix_is_read_back_and_used_by_llamacpps_quantizer(tmp_path):
    import pydoc_data.topics

    from gptopt_core.pipeline import Pipeline
    from gptopt_export import imatrix
    from gptopt_export.quantize_llamacpp import quantize, tensor_types

    text = tmp_path / "text.txt"
    text.write_text("\n".join(pydoc_data.topics.topics.values())[:12000])
    f32, imat, dat = tmp_path / "m.gguf", tmp_path / "imatrix.gguf", tmp_path / "imatrix.dat"
    pipe = Pipeline(model="tiny-random-llama", data=str(text), quiet=True)
    pipe.add("export", to=str(f32), type="f32", imatrix=str(imat), imatrix_blocks=4, imatrix_seq_len=64)
    metrics = pipe.run().records[0]["metrics"]
    assert metrics["imatrix_entries"] == 14 and metrics["imatrix_tokens"] == 256
    assert gguf_keys_by_ggml(imat) == (28, ["imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"])
    means = imatrix.read(imat)
    assert sorted(means) == sorted(n for n in file_tensors(f32) if n.startswith("blk.") and "norm" not in n)
    assert means["blk.0.ffn_down.weight"].shape == (128,) and (means["blk.0.attn_q.weight"] > 0).all()
    entries = {k: (v.astype(np.float64) * 256, 256) for k, v in means.items()}
    imatrix.write(dat, entries, 4, 64, "text")  # the legacy format gives the quantizer the same means
    assert all(np.allclose(imatrix.read(dat)[k], means[k], rtol=1e-6) for k in means)
    plain, weighted = tmp_path / "q.gguf", tmp_path / "q-im.gguf"
    quantize(f32, plain, "q4_0")
    assert quantize(f32, weighted, "q4_0", imatrix=imat)["imatrix_entries"] == 14
    assert tensor_types(weighted)["q4_0"] == 15 and not filecmp.cmp(plain, weighted, shallow=False)
    from gptopt_export.llamacpp import next_token_logits

    assert np.isfinite(next_token_logits(weighted, list(range(1, 20)), threads=1)).all()
    # gptopt's own q4_0 weighted by the same imatrix writes llama.cpp's bytes
    ours = tmp_path / "ours.gguf"
    m = Pipeline(model="tiny-random-llama", data=str(text), quiet=True).add(
        "export", to=str(ours), type="q4_0", imatrix_in=str(imat)).run().records[0]["metrics"]
    assert m["gguf_imatrix_weighted_tensors"] == 14  # every block weight (embedding and head have no imatrix row)
    import gguf

    raw = {p: {t.name: np.asarray(t.data).tobytes() for t in gguf.GGUFReader(str(p)).tensors} for p in (ours, weighted)}
    assert raw[ours]["blk.1.attn_v.weight"] == raw[weighted]["blk.1.attn_v.weight"]
    assert raw[ours]["blk.0.ffn_down.weight"] == raw[weighted]["blk.0.ffn_down.weight"]


def test_imatrix_file_name_is_checked():
    from gptopt_core import ParamsError
    from gptopt_core.pipeline import Pipeline

    with pytest.raises(ParamsError, match="imatrix file name ending in .gguf"):
        Pipeline(model="tiny-random-llama", quiet=True).add("export", to="m.gguf", imatrix="m.txt")
