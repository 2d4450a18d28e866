"""A wrong architecture row fails loudly: check_architecture on each kind of mistake, at registration (values
outside the documented vocabulary) and when a model is first matched to the row (paths, group coverage)."""
import dataclasses
import types

import pytest

from gptopt_core import (Architecture, GgufLayout, GptoptError, Pipeline, architecture_table, check_architecture,
                         grid_layers, hookimpl, tiny_model)
from gptopt_core.kit.testing import register_plugin

STARCODER2_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                     ("mlp.c_fc",), ("mlp.c_proj",))


def _starcoder2_config(vocab_size):
    from transformers import Starcoder2Config

    return Starcoder2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, sliding_window=None)


ROW = Architecture("starcoder2", "wrong-sc2", "model.layers", STARCODER2_GROUPS, "model.embed_tokens", "model.norm",
                   norm="layernorm", tiny=_starcoder2_config)


def test_every_built_in_row_matches_its_tiny_model():
    for arch in architecture_table().values():
        check_architecture(tiny_model(f"tiny-random-{arch.name}")[0], arch)


@pytest.mark.parametrize("change,message", [
    ({"blocks": "model.blocks"}, "blocks 'model.blocks' is not a ModuleList of the model (its lists: model.layers)"),
    ({"groups": STARCODER2_GROUPS[:3]}, "block 0's linear layer 'mlp.c_proj' is in no group"),
    ({"groups": STARCODER2_GROUPS + (("mlp.gate_proj",),)}, "groups name 'mlp.gate_proj', which block 0 "
                                                            "(model.layers.0) does not have"),
    ({"groups": STARCODER2_GROUPS + (("mlp.c_fc",),)}, "groups name mlp.c_fc more than once"),
    ({"extra_norms": ("self_attn.q_norm",)}, "extra_norms name 'self_attn.q_norm'"),
    ({"final_norm": "model.final_norm"}, "final_norm 'model.final_norm' is not a module of the model"),
    ({"norm": "RMSNorm"}, "norm is 'RMSNorm', not one of 'rmsnorm', 'rmsnorm(1+w)', 'layernorm'"),
    ({"rotary": "rope"}, "rotary is 'rope'"),
    ({"embedding_scale": "sqrt"}, "embedding_scale is 'sqrt'"),
    ({"tied_head": "yes"}, "tied_head is 'yes'"),
    ({"gguf": GgufLayout("starcoder2", head="never")}, "gguf.head is 'never'"),
    ({"gguf": GgufLayout("starcoder2", hparams=lambda cfg: [("rope_dims", 16)])},
     "gguf.hparams(config) gave ('rope_dims', 16), not a (\"add_...\", value) pair"),
    ({"gguf": GgufLayout("starcoder2", permute_qk=("self_attn.query",))}, "gguf name 'self_attn.query'"),
])
def test_check_architecture_names_what_is_wrong(change, message):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_starcoder2_config(64))
    check_architecture(model, ROW)  # the right row passes
    with pytest.raises(GptoptError, match=r"^architecture 'starcoder2': ") as exc:
        check_architecture(model, dataclasses.replace(ROW, **change))
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _plugin(row):
    return types.SimpleNamespace(gptopt_register_architectures=hookimpl(lambda register: register(row)))


def test_a_wrong_row_fails_loudly_when_a_model_is_matched():
    wrong = dataclasses.replace(ROW, groups=STARCODER2_GROUPS[:3])
    with register_plugin(_plugin(wrong), "test-wrong-row"):
        with pytest.raises(GptoptError, match=r"^architecture 'starcoder2' \(plugin test-wrong-row\): block 0's "
                                              r"linear layer 'mlp.c_proj' is in no group"):
            Pipeline(model="tiny-random-wrong-sc2", quiet=True).add(
                "quantize", method="gptq", bits=4, calib_blocks=1, calib_seq_len=16).run()
    with register_plugin(_plugin(ROW), "test-right-row"):  # the right row quantizes every linear layer
        result = Pipeline(model="tiny-random-wrong-sc2", quiet=True).add(
            "quantize", method="gptq", bits=4, calib_blocks=1, calib_seq_len=16).run()
        assert len(grid_layers(result.model)) == 2 * 6  # q, k, v, o, c_fc, c_proj in both blocks
    with pytest.raises(GptoptError, match="plugin test-bad-value: architecture 'starcoder2': norm is 'RMSNorm'"):
        with register_plugin(_plugin(dataclasses.replace(ROW, norm="RMSNorm")), "test-bad-value"):
            pass
