"""W8A8 (issue 35): ``quantize --method rtn|gptq --bits 8 --activations 8`` puts weights on int8 per-channel
symmetric grids and quantizes every quantized layer's input to int8 per token (gptopt_core.kit.activations), so eval
measures what vLLM's int8 kernels compute; ``save --format compressed-tensors`` writes it ``int-quantized`` with
``input_activations``, and both gptopt and plain transformers read it back. (vLLM itself: docs/save-formats.md.)"""
import json

import pytest
import torch
from test_bad_input import run_in_process

from gptopt_core import Pipeline
from gptopt_core.kit.activations import input_quant_layers, quantize_tokens
from gptopt_core.kit.evaluate import perplexity
from gptopt_core.kit.grids import grid_codes, grid_of

EVAL = {"block_size": 128, "max_tokens": 512}
#: the config group llm-compressor's W8A8 preset is written with and vLLM's CompressedTensorsW8A8Int8 selects
W8A8_GROUP = {"weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
              "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                                    "dynamic": True},
              "targets": ["Linear"], "format": "int-quantized"}


def run(model, *steps):
    pipe = Pipeline(model=model, quiet=True, device="cpu")
    for name, params in steps:
        pipe.add(name, **params)
    return pipe.run()


def test_tokens_are_rounded_per_row_to_int8_by_hand():
    x = torch.tensor([[0.5, -1.27, 0.013, 0.006],  # scale 1.27 / 127 = 0.01: 50, -127, 1.3 -> 1, 0.6 -> 1
                      [0.0, 0.0, 0.0, 0.0],  # an all-zero token stays zero
                      [2.54, 0.03, -0.05, 1.0]])  # scale 0.02: 127, 1.5 -> 2 (half to even), -2.5 -> -2, 50
    want = torch.tensor([[0.5, -1.27, 0.01, 0.01], [0.0, 0.0, 0.0, 0.0], [2.54, 0.04, -0.04, 1.0]])
    got = quantize_tokens(x)
    assert torch.allclose(got, want, atol=1e-6), got
    assert quantize_tokens(x.double()).dtype == torch.float64


def test_w8a8_layer_computes_the_int8_matmul_a_kernel_computes():
    """Every quantized layer's output is (int8 input codes @ int8 weight codes) * input scale * weight scale."""
    res = run("tiny-random-llama", ("quantize", {"method": "rtn", "bits": 8, "activations": 8}))
    model = res.ctx.model
    assert "quantized:w8a8" in res.ctx.facts and res.records[0]["metrics"]["scheme"] == "w8a8"
    layers = input_quant_layers(model)
    assert len(layers) == 14 and all(grid_of(m).describe() == "int8-channel-sym" for _, m, _ in layers)
    assert set(res.ctx.state["quantized"].values()) == {"int8-channel-sym+a8-token-sym"}
    module = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, module.in_features) * 2
    s_x = x.abs().amax(-1, keepdim=True) / 127
    q_x = torch.round(x / s_x).clamp(-128, 127)
    acc = q_x.double() @ grid_codes(module).double().t()  # integer accumulation
    want = acc * s_x.double() * grid_of(module).scale.double().t()
    with torch.no_grad():
        got = module(x)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # and it is not the float matmul
        assert not torch.allclose(torch.nn.functional.linear(x, module.weight), got, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_w8a8_saves_int_quantized_and_reloads_at_the_same_perplexity(method, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors import safe_open

    out = tmp_path / "m"
    quant = {"method": method, "bits": 8, "activations": 8}
    if method == "gptq":
        quant.update(calib_blocks=2, calib_seq_len=32)
    res = run("tiny-random-llama", ("quantize", quant), ("eval", EVAL), ("save", {"to": str(out)}))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    QuantizationConfig.model_validate(qc)
    group = {k: v for k, v in qc["config_groups"]["group_0"].items() if k in W8A8_GROUP}
    weights = {k: v for k, v in group["weights"].items() if k in W8A8_GROUP["weights"]}
    acts = {k: v for k, v in group["input_activations"].items() if k in W8A8_GROUP["input_activations"]}
    assert {**group, "weights": weights, "input_activations": acts} == W8A8_GROUP
    assert group["weights"]["group_size"] is None and group["input_activations"]["group_size"] is None
    assert len(qc["config_groups"]) == 1 and qc["format"] == "int-quantized" and qc["ignore"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        name = "model.layers.0.self_attn.q_proj"
        assert f.get_tensor(f"{name}.weight").dtype == torch.int8
        assert tuple(f.get_tensor(f"{name}.weight_scale").shape) == (64, 1)
        assert not any(k.endswith(("input_scale", "input_zero_point")) for k in f.keys())  # dynamic: no input scale is stored
    saved = res.records[1]["metrics"]["perplexity"]
    back = run(str(out), ("eval", EVAL))
    assert back.records[0]["metrics"]["perplexity"] == pytest.approx(saved, rel=1e-6)
    assert {"quantized:grid", "quantized:w8a8"} <= back.ctx.facts
    assert len(input_quant_layers(back.ctx.model)) == 14
    if method == "rtn":  # plain transformers: compressed-tensors fake-quantizes the inputs (max|x| / 127.5)
        from transformers import AutoModelForCausalLM

        plain, info = AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True)
        assert not any(info.values()), info
        ppl = perplexity(plain, res.ctx.data.valid_ids, 128, 128, 512)["perplexity"]
        assert ppl == pytest.approx(saved, rel=1e-3)


G = ["--model", "tiny-random-llama", "quantize"]
REFUSALS = {
    "4-bit weights": (G + ["--method", "rtn", "--bits", "4", "--activations", "8"], "needs --bits 8"),
    "bitsandbytes": (G + ["--bits", "8", "--activations", "8"], "--activations applies to --method rtn/gptq"),
    "groups": (G + ["--method", "gptq", "--bits", "8", "--activations", "8", "--group-size", "32"],
               "per-channel grids"),
    "asymmetric": (G + ["--method", "rtn", "--bits", "8", "--activations", "8", "--no-symmetric"], "symmetric"),
    "embeddings": (G + ["--method", "rtn", "--bits", "8", "--activations", "8", "--embeddings", "8"],
                   "embeddings and head stay float"),
    "4-bit activations": (G + ["--method", "rtn", "--bits", "8", "--activations", "4"], "int8 only (W8A8)"),
    "gpt2 conv1d to compressed-tensors": (["--model", "tiny-random-gpt2", "quantize", "--method", "rtn", "--bits",
                                           "8", "--activations", "8", "save", "--to", "m", "--format",
                                           "compressed-tensors"], "Conv1D layer with int8 inputs"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_w8a8_refusals_are_one_line(case, tmp_path):
    args, expected = REFUSALS[case]
    proc = run_in_process("run", *args, cwd=tmp_path)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln]  # (a refusal at run time follows progress)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(errors) == 1 and errors[0].startswith("Error: ") and expected in errors[0], proc.stderr
    assert not (tmp_path / "m").exists()
