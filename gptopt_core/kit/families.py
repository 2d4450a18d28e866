"""The built-in rows of the architecture table: eleven dense families (the MoE rows: ``families_moe.py``), registered
by the core's own plugin.

Each row was read off ``transformers``' modeling code (names, norms, rotary, embedding scale) and llama.cpp's
``convert_hf_to_gguf.py`` / ``src/models/*.cpp`` (GGUF architecture, row layouts, keys, what llama.cpp computes).
A tiny config per family builds a random test model: 2 blocks, hidden 64, 4 heads (2 key-value heads where the
family has grouped-query attention), the byte tokenizer's vocabulary.
"""
from __future__ import annotations

from ..architectures import Architecture, GgufLayout

LLAMA_GROUPS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
                ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def _ids(vocab: int) -> dict:
    return dict(vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)


def rope_parameters(cfg, layer: str = "full_attention") -> dict:
    """A config's rotary parameters as one flat dict (transformers 5 ``rope_parameters``, nested per layer type
    for Gemma 3; older ``rope_theta`` / ``rope_scaling`` attributes folded in)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    if isinstance(rope.get(layer), dict):
        rope = dict(rope[layer])
    legacy = getattr(cfg, "rope_scaling", None)
    if isinstance(legacy, dict):
        rope.update(legacy)
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    return rope


def _rope_refusal(cfg, written: tuple = ("default",)):
    kind = rope_parameters(cfg).get("rope_type", rope_parameters(cfg).get("type", "default"))
    if kind not in written + (None,):
        return (f"rope scaling '{kind}' is not written by this exporter for this family; written: "
                f"{', '.join(written)}")
    return None


def _act_refusal(cfg, attr: str, allowed: tuple, family: str, ropes: tuple = ("default",)):
    act = getattr(cfg, attr, None)
    if act not in allowed:
        return f"{family} with {attr} '{act}' is not what llama.cpp computes ({' or '.join(allowed)})"
    return _rope_refusal(cfg, ropes)


def llama3_rope_factors(cfg) -> list:
    """``[("rope_freqs.weight", factors)]`` for a ``llama3`` rope scaling (Llama 3.1 / 3.2), as llama.cpp's
    converter computes them (``LlamaModel.generate_extra_tensors``): per rotary pair, what llama.cpp divides its
    frequency by (1 for short wavelengths, ``factor`` for long ones, smoothed between), which is transformers'
    ``_compute_llama3_parameters``; ``[]`` for other rotary embeddings."""
    import math

    rope = rope_parameters(cfg)
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return []
    dim, base = _head_dim(cfg), float(rope.get("rope_theta", 10000.0))
    factor, low, high = (float(rope.get(k, d)) for k, d in (("factor", 8.0), ("low_freq_factor", 1.0),
                                                            ("high_freq_factor", 4.0)))
    old = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", factors)]


def _window_ignored(family: str, arch: str):
    """A ``sliding_window`` shorter than the model's positions, which llama.cpp's ``arch`` does not apply: Mistral is
    written as ``llama`` (no window in that architecture), and llama.cpp 0.3.36 switches Phi-3's window off when it
    loads the file ("Phi SWA is currently disabled"). A window at least as long as every position is harmless."""
    def check(cfg):
        window, positions = getattr(cfg, "sliding_window", None), cfg.max_position_embeddings
        if not window or window >= positions:
            return None
        return (f"{family} with sliding_window {window} (shorter than its {positions} positions): llama.cpp's "
                f"'{arch}' attends to the whole context, so every token past {window} positions differs from "
                f"transformers; pass export --ignore-sliding-window to write it anyway (right only for inputs of at "
                f"most {window} tokens)")
    return check


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


# -- Llama and Mistral -----------------------------------------------------------------------------------------
def _llama_tiny(vocab):
    from transformers import LlamaConfig

    return LlamaConfig(**TINY, **_ids(vocab), tie_word_embeddings=False)


def _mistral_tiny(vocab):
    from transformers import MistralConfig

    return MistralConfig(**TINY, **_ids(vocab), tie_word_embeddings=False, sliding_window=None)


LLAMA_ROPES = ("default", "llama3")  # llama3: the rope_freqs tensor (llama3_rope_factors)


def _llama_keys(cfg):
    return [("add_vocab_size", cfg.vocab_size), ("add_rope_dimension_count", _head_dim(cfg))]


LLAMA_GGUF = GgufLayout("llama", permute_qk=("self_attn.q_proj", "self_attn.k_proj"), hparams=_llama_keys,
                        refusal=lambda cfg: _act_refusal(cfg, "hidden_act", ("silu",), "Llama", LLAMA_ROPES),
                        extra_tensors=llama3_rope_factors)
MISTRAL_GGUF = GgufLayout("llama", permute_qk=("self_attn.q_proj", "self_attn.k_proj"), hparams=_llama_keys,
                          refusal=lambda cfg: _act_refusal(cfg, "hidden_act", ("silu",), "Mistral", LLAMA_ROPES),
                          window_ignored=_window_ignored("Mistral", "llama"), extra_tensors=llama3_rope_factors)


# -- Qwen ------------------------------------------------------------------------------------------------------
def _qwen2_tiny(vocab):
    from transformers import Qwen2Config

    return Qwen2Config(**TINY, **_ids(vocab), tie_word_embeddings=True)


def _qwen3_tiny(vocab):
    from transformers import Qwen3Config

    return Qwen3Config(**TINY, **_ids(vocab), head_dim=16, tie_word_embeddings=True)


def _qwen_refusal(cfg):
    if getattr(cfg, "use_sliding_window", False):
        return "sliding-window attention (use_sliding_window) is not what llama.cpp's qwen architectures compute"
    return _act_refusal(cfg, "hidden_act", ("silu",), "Qwen")


# -- Gemma 2 and 3 ---------------------------------------------------------------------------------------------
GEMMA_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _gemma_tiny(vocab):
    from transformers import GemmaConfig

    return GemmaConfig(**TINY, **_ids(vocab), head_dim=16)


def _gemma_keys(cfg):
    return [("add_key_length", _head_dim(cfg)), ("add_value_length", _head_dim(cfg))]


def _gemma2_tiny(vocab):
    from transformers import Gemma2Config

    return Gemma2Config(**TINY, **_ids(vocab), head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                        attn_logit_softcapping=50.0, final_logit_softcapping=30.0)


def _gemma3_tiny(vocab):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**TINY, **_ids(vocab), head_dim=16, query_pre_attn_scalar=16, sliding_window=512)


def _gemma_refusal(cfg, layers_27b: int):
    # llama.cpp scales queries by 1/sqrt(head_dim), by 1/sqrt(hidden/heads) for the 27B models it recognises
    want = cfg.hidden_size // cfg.num_attention_heads if cfg.num_hidden_layers == layers_27b else _head_dim(cfg)
    scalar = getattr(cfg, "query_pre_attn_scalar", want)
    if scalar != want:
        return (f"query_pre_attn_scalar {scalar} is not the attention scale llama.cpp uses for this model "
                f"({want})")
    return _act_refusal(cfg, "hidden_activation", ("gelu_pytorch_tanh", "gelu"), "Gemma")


def _swa_pattern(cfg) -> list:
    types = getattr(cfg, "layer_types", None)
    return [("add_sliding_window_pattern", [t == "sliding_attention" for t in types])] if types else []


def _gemma2_keys(cfg):
    return [("add_key_length", _head_dim(cfg)), ("add_value_length", _head_dim(cfg)),
            ("add_attn_logit_softcapping", float(cfg.attn_logit_softcapping or 0.0)),
            ("add_final_logit_softcapping", float(cfg.final_logit_softcapping or 0.0)),
            ("add_sliding_window", int(cfg.sliding_window))] + _swa_pattern(cfg)


def _gemma3_keys(cfg):
    keys = [("add_key_length", _head_dim(cfg)), ("add_value_length", _head_dim(cfg))]
    if getattr(cfg, "final_logit_softcapping", None):
        keys.append(("add_final_logit_softcapping", float(cfg.final_logit_softcapping)))
    if getattr(cfg, "sliding_window", None):
        keys.append(("add_sliding_window", int(cfg.sliding_window)))
    local = rope_parameters(cfg, "sliding_attention").get("rope_theta")
    if local is None:
        local = getattr(cfg, "rope_local_base_freq", None)
    if local is not None:
        keys.append(("add_rope_freq_base_swa", float(local)))
    return keys + _swa_pattern(cfg)


# -- Phi-3 -----------------------------------------------------------------------------------------------------
def _phi3_tiny(vocab):
    from transformers import Phi3Config

    return Phi3Config(**TINY, **_ids(vocab), pad_token_id=vocab - 1, tie_word_embeddings=False)  # default 32000


def _phi3_keys(cfg):
    rope = rope_parameters(cfg)
    n_rot = int(rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", 1.0)) * cfg.hidden_size)
    orig = rope.get("original_max_position_embeddings",
                    getattr(cfg, "original_max_position_embeddings", None) or cfg.max_position_embeddings)
    return [("add_rope_dimension_count", n_rot // cfg.num_attention_heads), ("add_rope_scaling_orig_ctx_len", orig),
            ("add_sliding_window", int(getattr(cfg, "sliding_window", None) or 0))]


# -- GPT-NeoX and GPT-2 ----------------------------------------------------------------------------------------
def _neox_tiny(vocab):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=1024, bos_token_id=vocab - 1,
                         eos_token_id=vocab - 1, tie_word_embeddings=False)


def _neox_rot_fraction(cfg) -> float:
    rope = rope_parameters(cfg)
    return float(rope.get("partial_rotary_factor", getattr(cfg, "rotary_pct", 1.0)))


def _neox_keys(cfg):
    n_rot = int(_neox_rot_fraction(cfg) * (cfg.hidden_size // cfg.num_attention_heads))
    return [("add_rope_dimension_count", n_rot),
            ("add_parallel_residual", bool(getattr(cfg, "use_parallel_residual", True)))]


def _opt_tiny(vocab):
    from transformers import OPTConfig

    return OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=1024, word_embed_proj_dim=64, bos_token_id=vocab - 1,
                     eos_token_id=vocab - 1, pad_token_id=vocab - 1)


def _gpt2_tiny(vocab):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_positions=1024, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=vocab - 1, eos_token_id=vocab - 1)


def _gpt2_keys(cfg):
    return [("add_feed_forward_length", getattr(cfg, "n_inner", None) or 4 * cfg.n_embd)]


FAMILIES = (
    Architecture("llama", "llama", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 tiny=_llama_tiny, gguf=LLAMA_GGUF),
    Architecture("mistral", "mistral", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 tiny=_mistral_tiny, gguf=MISTRAL_GGUF,
                 notes="llama.cpp runs Mistral as its llama architecture (as its converter writes it), which has no "
                       "sliding window: a window shorter than the positions is refused (--ignore-sliding-window)"),
    Architecture("qwen2", "qwen2", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 tiny=_qwen2_tiny, notes="biases on q/k/v",
                 gguf=GgufLayout("qwen2", refusal=_qwen_refusal)),
    Architecture("qwen3", "qwen3", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 extra_norms=("self_attn.q_norm", "self_attn.k_norm"), tiny=_qwen3_tiny,
                 gguf=GgufLayout("qwen3", refusal=_qwen_refusal)),
    Architecture("gemma", "gemma", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 norm="rmsnorm(1+w)", embedding_scale="sqrt(hidden_size)", tiny=_gemma_tiny,
                 gguf=GgufLayout("gemma", norm_shift=1.0, hparams=_gemma_keys,
                                 refusal=lambda cfg: _act_refusal(cfg, "hidden_act",
                                                                  ("gelu_pytorch_tanh", "gelu"), "Gemma"))),
    Architecture("gemma2", "gemma2", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 norm="rmsnorm(1+w)", extra_norms=GEMMA_NORMS, embedding_scale="sqrt(hidden_size)",
                 tiny=_gemma2_tiny, notes="attention and final logit soft-capping; alternating sliding windows",
                 gguf=GgufLayout("gemma2", norm_shift=1.0, hparams=_gemma2_keys,
                                 refusal=lambda cfg: _gemma_refusal(cfg, 46))),
    Architecture("gemma3_text", "gemma3", "model.layers", LLAMA_GROUPS, "model.embed_tokens", "model.norm",
                 norm="rmsnorm(1+w)", extra_norms=GEMMA_NORMS + ("self_attn.q_norm", "self_attn.k_norm"),
                 embedding_scale="sqrt(hidden_size)", tiny=_gemma3_tiny,
                 notes="five sliding-window layers to one global, each with its own rotary base",
                 gguf=GgufLayout("gemma3", norm_shift=1.0, hparams=_gemma3_keys,
                                 refusal=lambda cfg: _gemma_refusal(cfg, 62))),
    Architecture("phi3", "phi3", "model.layers",
                 (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
                 "model.embed_tokens", "model.norm", tiny=_phi3_tiny,
                 notes="fused qkv and gate_up projections; llama.cpp switches Phi-3's sliding window off: a window "
                       "shorter than the positions is refused (--ignore-sliding-window)",
                 gguf=GgufLayout("phi3", hparams=_phi3_keys,
                                 refusal=lambda cfg: _act_refusal(cfg, "hidden_act", ("silu",), "Phi-3"),
                                 window_ignored=_window_ignored("Phi-3", "phi3"))),
    Architecture("gpt_neox", "gpt-neox", "gpt_neox.layers",
                 (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                  ("mlp.dense_4h_to_h",)),
                 "gpt_neox.embed_in", "gpt_neox.final_layer_norm", norm="layernorm",
                 rotary="partial rotate_half", tiny=_neox_tiny,
                 notes="parallel residual; fused qkv stored per head",
                 gguf=GgufLayout("gptneox", qkv_per_head="attention.query_key_value", hparams=_neox_keys,
                                 refusal=lambda cfg: _act_refusal(cfg, "hidden_act", ("gelu", "gelu_new",
                                                                                      "gelu_fast"), "GPT-NeoX"))),
    Architecture("opt", "opt", "model.decoder.layers",
                 (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",),
                  ("fc2",)),
                 "model.decoder.embed_tokens", "model.decoder.final_layer_norm", norm="layernorm",
                 rotary="learned positions", tiny=_opt_tiny,
                 notes="llama.cpp has no OPT architecture: every torch step runs, GGUF export does not"),
    Architecture("gpt2", "gpt2", "transformer.h",
                 (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
                 "transformer.wte", "transformer.ln_f", norm="layernorm", rotary="learned positions",
                 tiny=_gpt2_tiny, notes="Conv1D layers (weights stored transposed)",
                 gguf=GgufLayout("gpt2", head="always", hparams=_gpt2_keys,
                                 refusal=lambda cfg: _act_refusal(cfg, "activation_function",
                                                                  ("gelu_new", "gelu_pytorch_tanh", "gelu"),
                                                                  "GPT-2"))),
)
