"""StarCoder2 in gptopt's architecture table: every step, and GGUF export for llama.cpp's starcoder2."""
from gptopt_core import Architecture, GgufLayout, hookimpl


def tiny_config(vocab_size):
    """A tiny random StarCoder2 for tests: `--model tiny-random-starcoder2`."""
    from transformers import Starcoder2Config

    return Starcoder2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                            bos_token_id=vocab_size - 1, eos_token_id=vocab_size - 1, sliding_window=None)


STARCODER2 = Architecture(
    model_type="starcoder2",  # config.model_type
    name="starcoder2",  # tiny-random-starcoder2
    blocks="model.layers",
    # the block's linear layers in the order it computes them; layers reading one input share a group
    groups=(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
            ("mlp.c_fc",), ("mlp.c_proj",)),
    embedding="model.embed_tokens",
    final_norm="model.norm",
    norm="layernorm",
    tiny=tiny_config,
    # llama.cpp's starcoder2: names from gguf-py's tensor map, the common keys, nothing to reorder
    gguf=GgufLayout("starcoder2"),
    notes="biases everywhere; a sliding window is not written",
)


@hookimpl
def gptopt_register_architectures(register):
    register(STARCODER2)
