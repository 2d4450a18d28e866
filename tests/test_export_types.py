"""The GGUF type table (``gptopt_export.ggml_types``) and the export plan (``gptopt_export.plan``).

One record per type, checked against gguf-py's own ids, block sizes and file types; no other module of the export
plugin keeps a table of type facts; every type encodes to its size and decodes near its values. One export walks
the model's tensors once (the plan built in preflight is what ``apply`` writes), a chain that changes the model
first gets a plan of the changed model, and the bytes of a set of tiny exports are pinned: the type table and the
plan left them identical to the writer before them (the hashes below were taken from that writer).

Nothing here needs llama.cpp."""
import ast
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gptopt_core import Pipeline, tiny_model

EXPORT = Path(__file__).resolve().parents[1] / "plugins" / "gptopt_export"


def test_every_record_matches_gguf_py():
    import gguf

    from gptopt_export.ggml_types import TYPES, weighted_names

    for name, t in TYPES.items():
        qtype = gguf.GGMLQuantizationType[name.upper()]
        assert t.ggml_id == qtype.value and t.qtype() is qtype, name
        assert (t.block, t.block_bytes) == gguf.GGML_QUANT_SIZES[qtype], name
        file_type = gguf.LlamaFileType(t.file_type).name
        assert file_type == "ALL_F32" if name == "f32" else file_type.startswith(f"MOSTLY_{name.upper()}"), name
        assert t.is_float == (name in ("f32", "f16", "bf16")) and (t.pack is None) == (t.exact_grid is None)
        if t.fallback:  # llama.cpp falls back to a smaller block the row may still divide
            assert t.k_type and TYPES[t.fallback].block < t.block and not TYPES[t.fallback].fallback
    assert {TYPES[n].exact_grid for n in ("q8_0", "q4_0", "q4_1")} == {(8, True), (4, True), (4, False)}
    assert set(weighted_names()) >= {"q4_0", "iq4_nl"}


OLD_TABLES = {"K_TYPES", "WEIGHTED", "BLOCK_OF", "FALLBACK", "ENCODERS", "FLOAT_TYPES", "QUANT_TYPES", "FILE_TYPES",
              "TYPES"}


def test_no_other_module_keeps_a_type_table():
    """The facts of a type live in its record only: no module of the export plugin but the table itself defines
    one of the tables they were spread over before."""
    found = []
    for path in sorted(EXPORT.glob("*.py")):
        if path.name == "ggml_types.py":
            continue
        for node in ast.parse(path.read_text()).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
                node, ast.AnnAssign) else []
            found += [f"{path.name}: {t.id}" for t in targets if isinstance(t, ast.Name) and t.id in OLD_TABLES]
    assert found == []


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.exp(rng.standard_normal((1, shape[1])) * 0.5) * 0.02).astype(np.float32)


def _type_names():
    from gptopt_export.ggml_types import NAMES

    return NAMES


@pytest.mark.parametrize("name", _type_names())
def test_each_type_encodes_to_its_size_and_decodes_near_the_values(name):
    import gguf

    from gptopt_export.ggml_types import get

    t, x = get(name), _weights((8, 512))
    data = t.quantize(x)
    if not t.native:
        assert data.dtype == np.uint8 and data.nbytes == t.nbytes(x.shape) == x.size * t.bits / 8
    back = gguf.quants.dequantize(data, t.qtype()).reshape(x.shape)
    rel = np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())
    assert rel <= (0 if name == "f32" else 2.0 ** (-8 if t.is_float else 2 - t.bits)), rel
    if t.block > 1:
        with pytest.raises(ValueError, match=f"rows of {t.block * 3 // 2} are not whole {t.block}-weight blocks"):
            t.quantize(_weights((2, t.block * 3 // 2)))


# -- the plan: built once, rebuilt for a model the chain changed --------------------------------------------------
def _count_sources(monkeypatch):
    import gptopt_export.tensors as tensors

    calls, original = [], tensors.sources

    def counted(model, plugins=None):
        calls.append(1)
        return original(model, plugins)

    monkeypatch.setattr(tensors, "sources", counted)
    return calls


def _file_types(path):
    import gguf

    return {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors}


def _side_files(tmp_path):
    """A plan file and an importance matrix for tiny-random-llama."""
    from gptopt_export import imatrix, tensors

    model, _ = tiny_model("tiny-random-llama")
    srcs = [s for s in tensors.sources(model) if s.role == "weight"]
    imatrix.write(tmp_path / "im.dat", {s.name: (np.full(s.values.shape[-1], 4.0), 4) for s in srcs}, 1, 4, "t")
    (tmp_path / "plan.json").write_text(json.dumps({"model.layers.0.self_attn.v_proj": "q8_0"}))
    return tmp_path / "plan.json", tmp_path / "im.dat"


def test_one_export_walks_the_model_once(tmp_path, monkeypatch):
    plan, im = _side_files(tmp_path)
    calls = _count_sources(monkeypatch)
    m = Pipeline(model="tiny-random-llama", quiet=True).add(
        "export", to=str(tmp_path / "m.gguf"), type="q4_0", plan=str(plan), imatrix_in=str(im)).run().records[0]
    assert len(calls) == 1  # preflight's plan checked the plan file and the imatrix, and is what was written
    assert m["metrics"]["gguf_imatrix_weighted_tensors"] == 13 and m["metrics"]["gguf_plan"] == {
        "blk.0.attn_v.weight": "q8_0"}
    assert _file_types(tmp_path / "m.gguf")["blk.0.attn_v.weight"] == "q8_0"


def test_a_chain_that_changes_the_model_gets_a_plan_of_the_changed_model(tmp_path, monkeypatch):
    plan, _ = _side_files(tmp_path)
    calls = _count_sources(monkeypatch)
    m = Pipeline(model="tiny-random-llama", quiet=True).add("quantize", method="rtn", bits=4, group_size="32").add(
        "export", to=str(tmp_path / "m.gguf"), type="auto", plan=str(plan)).run().records[-1]["metrics"]
    assert len(calls) == 2  # preflight (checks) and apply (the model rtn left)
    assert m["gguf_exact_grid_tensors"] == 13 and m["gguf_rerounded_grid_tensors"] == 1
    types = _file_types(tmp_path / "m.gguf")
    assert types["blk.0.attn_v.weight"] == "q8_0" and types["blk.1.attn_v.weight"] == "q4_0"


def _round_blocks(model, bits=4, symmetric=True):
    """Round every block weight to a group-32 grid in place (as rtn does)."""
    from gptopt_core import fit_grid, is_weight_layer, round_to_grid, weight_matrix

    for name, module in model.named_modules():
        if ".layers." in name and is_weight_layer(module):
            round_to_grid(module, fit_grid(weight_matrix(module).detach().float(), bits, 32, symmetric))


def test_a_kept_plan_is_not_written_once_the_model_changed(tmp_path):
    """Called directly (preflight, then the model changes, then apply): the kept plan is stale and not used."""
    from gptopt_core import get_plugins, make_context

    plan, _ = _side_files(tmp_path)
    ctx = make_context("tiny-random-llama")
    plugins = get_plugins()
    step = plugins.step_class("export")(to=str(tmp_path / "m.gguf"), type="auto", plan=str(plan))
    step.plugins = plugins  # as the pipeline sets it: export picks its file writer from the registry
    step.check_plan([], [], set())
    step.preflight(ctx)
    kept = step._export_plan
    assert kept is not None and kept.current(ctx.model)
    _round_blocks(ctx.model)
    assert not kept.current(ctx.model)
    assert step.apply(ctx)["gguf_exact_grid_tensors"] == 13


# -- the bytes of tiny exports, pinned ----------------------------------------------------------------------------
def _det(model, seed=0):
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.from_numpy((rng.standard_normal(tuple(p.shape)) * 0.05).astype(np.float32)))
    return model


def _wide():
    from transformers import AutoModelForCausalLM, LlamaConfig

    _, tok = tiny_model("tiny-random-llama")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=len(tok) - 1, eos_token_id=len(tok) - 1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return _det(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()), tok


def _digest(path) -> str:
    """sha256 of every tensor's name, type and data, in file order (the header's other keys left out)."""
    import gguf

    h = hashlib.sha256()
    for t in gguf.GGUFReader(str(path)).tensors:
        h.update(f"{t.name}:{t.tensor_type.name}:".encode() + np.asarray(t.data).tobytes())
    return h.hexdigest()[:16]


def export_digests(out: Path) -> dict:
    """``{case: digest}`` of the pinned exports (run against another writer to re-pin, see the module docstring)."""
    from gptopt_export.gguf_writer import write_gguf

    model, tok = tiny_model("tiny-random-llama")
    _det(model)
    importance = {f"blk.{i}.{n}.weight": np.linspace(0.1, 2.0, 64 if n != "ffn_down" else 128, dtype=np.float32)
                  for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                              "ffn_down")}
    cases = [(model, tok, t, None, None, None) for t in ("f16", "bf16", "q8_0", "q4_1", "q5_0", "q5_1", "q4_k")]
    cases += [(model, tok, t, "q8_0", importance, None) for t in ("q4_0", "iq4_nl")]
    cases += [(model, tok, "q4_0", None, None, {"blk.0.attn_v.weight": "q6_k", "token_embd.weight": "f16"})]
    wide, wtok = _wide()
    cases += [(wide, wtok, t, "f32", None, None) for t in ("q4_k", "q5_k", "q6_k")]
    cases += [(wide, wtok, t, "f32", None, None) for t in ("q3_k", "q2_k")]  # added with these types (pinned then)
    out_digests = {}
    for i, (m, t, type_name, emb, imp, plan) in enumerate(cases):
        path = out / f"{i}.gguf"
        write_gguf(m, t, path, type_name, emb, name="t", importance=imp, plan=plan)
        out_digests[f"{i}-{type_name}"] = _digest(path)
    for symmetric in (True, False):  # grids written from their codes: q4_0 exactly, q4_1 with its min in fp16
        _round_blocks(model, 4, symmetric)
        write_gguf(model, tok, out / f"grid{symmetric}.gguf", "auto", "q8_0", name="t")
        out_digests[f"grid-{'sym' if symmetric else 'asym'}"] = _digest(out / f"grid{symmetric}.gguf")
    return out_digests


PINNED = {  # taken from the writer before the type table (commit e475253), identical after it; q4_k / q5_k / q2_k
    # re-pinned when make_qkx2 took ggml's updated min into its candidate scales (their bytes: llama.cpp's own)
    "0-f16": "5ac5a7caa6743c75", "1-bf16": "61df4bfa29462ed9", "2-q8_0": "2654ea37daab6ab8",
    "3-q4_1": "4d4afd815cd5fcac", "4-q5_0": "94d9b0f71ba3bb0e", "5-q5_1": "80cc4119e3e1e459",
    "6-q4_k": "94d9b0f71ba3bb0e", "7-q4_0": "cc372fe7f5a222f3", "8-iq4_nl": "18ff1d79db56ec3c",
    "9-q4_0": "c18211bb3c2b61d4", "10-q4_k": "3c337e73aaf549de", "11-q5_k": "c3f362eb3845b352",
    "12-q6_k": "2d03d57e5b4fbe7e", "grid-sym": "602dedbaf646165d", "grid-asym": "644db7a2d80346ea",
    # q3_k and q2_k, pinned when they were added (their bytes: llama.cpp's own, tests/test_export_ktypes.py)
    "13-q3_k": "db89a67f9b45a0ba", "14-q2_k": "6476c4475ec9c1cd",
}


def test_export_bytes_are_pinned(tmp_path):
    assert export_digests(tmp_path) == PINNED
