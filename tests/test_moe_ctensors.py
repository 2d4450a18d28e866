"""save --format compressed-tensors of quantized tiny mixture-of-experts models (tests/moe_models.py): one packed
layer per expert in the names vLLM and the hub use, routers float and in ignore, gptopt's reader back at identical
logits, plain transformers (de-quantized, float16) within its rounding."""
import json

import pytest
import torch
from moe_models import save_tiny_moe
from safetensors import safe_open

from gptopt_core import GptoptError, Pipeline

#: family -> (block name in the file, per-expert leaves gate, up, down)
LAYOUT = {"mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
          "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {f: save_tiny_moe(root / f, f) for f in LAYOUT}


def unpacked(f, name):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    shape = torch.Size(f.get_tensor(f"{name}.weight_shape").tolist())
    q = unpack_from_int32(f.get_tensor(f"{name}.weight_packed"), 4, shape).float()
    scale = f.get_tensor(f"{name}.weight_scale").float()
    return q * scale.repeat_interleave(32, dim=1), scale


@pytest.mark.parametrize("family", list(LAYOUT))
def test_quantized_moe_saves_one_packed_layer_per_expert_and_reloads(moe_dirs, tmp_path, family):
    from transformers import AutoModelForCausalLM

    from gptopt_ctensors import load_model

    block, leaves = LAYOUT[family]
    float_model = AutoModelForCausalLM.from_pretrained(str(moe_dirs[family]))
    gu0 = [float_model.model.layers[i].mlp.experts.gate_up_proj.detach() for i in range(2)]
    down0 = [float_model.model.layers[i].mlp.experts.down_proj.detach() for i in range(2)]
    out = tmp_path / "ct"
    res = (Pipeline(model=str(moe_dirs[family]), quiet=True, device="cpu")
           .add("quantize", method="rtn", bits=4, group_size=32).add("save", to=str(out), format="compressed-tensors")
           .run())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in qc["config_groups"].values()] == [["Linear"]] and qc["dequantize"] is True
    assert {f"model.layers.{i}.{block}.gate" for i in range(2)} <= set(qc["ignore"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert not any(k.endswith(("gate_up_proj", "down_proj")) for k in keys)
        assert f.get_tensor(f"model.layers.0.{block}.gate.weight").dtype == torch.float32
        for i in range(2):
            inter = gu0[i].shape[1] // 2
            for j in range(8):
                originals = (gu0[i][j, :inter], gu0[i][j, inter:], down0[i][j])
                for leaf, w0 in zip(leaves, originals):
                    w, scale = unpacked(f, f"model.layers.{i}.{block}.experts.{j}.{leaf}")
                    # round to nearest of that very matrix: within half a step (and the fp16 scale) of the float expert
                    assert (w - w0).abs().le(scale.repeat_interleave(32, dim=1) * 0.55).all(), (i, j, leaf)  # fp16 scales
        memory = res.model.model.layers[1].mlp.experts  # the model in memory holds what the file holds
        w, _ = unpacked(f, f"model.layers.1.{block}.experts.5.{leaves[2]}")
        assert torch.equal(memory.down_proj[5], w)
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine = res.model(ids).logits
        again, _, info = load_model(out)
        assert info["experts"] == 16 and torch.equal(again(ids).logits, mine)
        plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        torch.testing.assert_close(plain(ids).logits, mine, rtol=0, atol=3e-3)  # its float16 de-quantization


def test_save_packs_quantizes_expert_codes_and_says_when_it_rounded_float_experts(moe_dirs, tmp_path, capsys):
    from gptopt_core import expert_layers, grid_codes

    res = (Pipeline(model=str(moe_dirs["mixtral"]), quiet=True, device="cpu")
           .add("quantize", method="gptq", bits=4, group_size=32, calib_blocks=8, calib_seq_len=32)
           .add("save", to=str(tmp_path / "gptq"), format="compressed-tensors").run())
    assert "MoE experts float" not in capsys.readouterr().err
    views = dict(expert_layers(res.model))
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), "pt") as f:  # GPTQ's codes, never re-rounded
        w, _ = unpacked(f, "model.layers.1.block_sparse_moe.experts.6.w2")
        view = views["model.layers.1.mlp.experts.6.down_proj"]
        assert torch.equal(w, view.weight.detach().float())
        q, _ = unpacked(f, "model.layers.0.block_sparse_moe.experts.2.w3")  # up: the second half of gate_up's rows
        gu = views["model.layers.0.mlp.experts.2.gate_up_proj"]
        assert torch.equal(q, gu.weight.detach().float()[gu.weight.shape[0] // 2:])
        assert grid_codes(view).abs().max() > 0
    (Pipeline(model=str(moe_dirs["mixtral"]), quiet=True, device="cpu")
     .add("quantize", method="rtn", bits=8, group_size="channel", exclude=["*experts*"])
     .add("save", to=str(tmp_path / "ct"), format="compressed-tensors").run())
    err = capsys.readouterr().err
    assert "note: quantize left 16 of the 16 MoE experts float; save rounded each to int8-channel-sym" in err
    assert "steps before this save measured float experts" in err


def test_moe_experts_need_the_one_packed_scheme_of_the_linear_layers(moe_dirs, tmp_path):
    run = (Pipeline(model=str(moe_dirs["mixtral"]), quiet=True, device="cpu")
           .add("quantize", method="rtn", bits=8, activations=8)
           .add("save", to=str(tmp_path / "w8a8"), format="compressed-tensors"))
    with pytest.raises(GptoptError, match="experts are written on the linear layers' scheme, so they need one "
                                          "packed int scheme"):
        run.run()
    assert not (tmp_path / "w8a8").exists()
