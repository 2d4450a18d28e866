"""The built-in mixture-of-experts rows of the architecture table: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE.

transformers 5 holds their experts fused as 3-D parameters (``mlp.experts.gate_up_proj`` / ``down_proj``) and the
router as a ``weight (E, H)`` module that is no ``nn.Linear``: the rows' ``groups`` name the linear layers a block
really has (attention; Qwen2-MoE's shared expert and its gate), and ``moe`` (:class:`gptopt_core.MoeLayout`) says
where the experts and the router are; :func:`gptopt_core.expert_linears` shows each expert as two linear layers
(``mlp.experts.<e>.gate_up_proj``, ``mlp.experts.<e>.down_proj``).

llama.cpp (0.3.36, ``convert_hf_to_gguf.py`` and ``src/models/*.cpp``) writes Mixtral as its ``llama`` architecture
with ``ffn_gate_inp`` and merged ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps``; Qwen2-MoE as
``qwen2moe`` (plus ``ffn_*_shexp`` and ``ffn_gate_inp_shexp``), Qwen3-MoE as ``qwen3moe``, OLMoE as ``olmoe``. Its
graphs fix whether the top-k router weights are renormalized (Mixtral and Qwen3-MoE: yes; Qwen2-MoE and OLMoE:
no) and that every block is a MoE block: a config that asks otherwise is refused in one line.

Tiny models (2 blocks, hidden 64, 4 experts of width 64, 2 per token) get peaked routing
(:func:`gptopt_core.kit.experts.peak_routers`, applied by ``tiny_model``): router logits of standard deviation ~4, so
each token strongly prefers its top 2 and the experts' order matters to the predictions.
"""
from __future__ import annotations

from ..architectures import Architecture, GgufLayout
from .experts import MoeLayout
from .families import LLAMA_GROUPS, _act_refusal, _head_dim, _ids

ATTENTION = LLAMA_GROUPS[:2]
MOE_TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, num_experts_per_tok=2)


def _mixtral_tiny(vocab):
    from transformers import MixtralConfig

    return MixtralConfig(**MOE_TINY, **_ids(vocab), intermediate_size=64, num_local_experts=4,
                         tie_word_embeddings=False, sliding_window=None)


def _qwen2_moe_tiny(vocab):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**MOE_TINY, **_ids(vocab), intermediate_size=128, moe_intermediate_size=64,
                          shared_expert_intermediate_size=64, num_experts=4, norm_topk_prob=False,
                          tie_word_embeddings=False)


def _qwen3_moe_tiny(vocab):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**MOE_TINY, **_ids(vocab), head_dim=16, intermediate_size=128, moe_intermediate_size=64,
                          num_experts=4, norm_topk_prob=True, tie_word_embeddings=False)


def _olmoe_tiny(vocab):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**MOE_TINY, "num_key_value_heads": 4}, **_ids(vocab), pad_token_id=vocab - 1,
                       intermediate_size=64, num_experts=4, norm_topk_prob=False, tie_word_embeddings=False)


def _olmoe_refusal(cfg):
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    if kv != heads:  # llama.cpp's olmoe: attn_k_norm is {n_embd}
        return (f"OLMoE with {kv} key-value heads for {heads} query heads: llama.cpp's olmoe graph norms k over the "
                f"whole hidden size (no grouped-query attention)")
    return _moe_refusal("OLMoE", False, "num_experts")(cfg)


def _moe_refusal(family: str, renormalizes: bool, count: str):
    """What llama.cpp's graph for ``family`` fixes: SiLU experts, the top-k renormalization, every block MoE."""
    def check(cfg):
        if bool(getattr(cfg, "norm_topk_prob", renormalizes)) != renormalizes:
            return (f"{family} with norm_topk_prob={not renormalizes}: llama.cpp's graph "
                    f"{'always' if renormalizes else 'never'} renormalizes the top-k router weights")
        if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
            return f"{family} with dense blocks between the MoE blocks (mlp_only_layers / decoder_sparse_step)"
        if getattr(cfg, "clip_qkv", None):
            return f"{family} with clip_qkv: llama.cpp's graph does not clip q/k/v"
        if getattr(cfg, "use_sliding_window", False) or (getattr(cfg, "sliding_window", None) and
                                                          cfg.sliding_window < cfg.max_position_embeddings):
            return f"{family} with a sliding window shorter than its positions: llama.cpp's graph has none"
        if getattr(cfg, count, 0) < 2 or getattr(cfg, "num_experts_per_tok", 0) < 1:
            return f"{family} with fewer than 2 experts"
        return _act_refusal(cfg, "hidden_act", ("silu",), family)
    return check


def _expert_keys(count: str, expert_width: bool = True, shared: bool = False):
    def keys(cfg):
        out = [("add_expert_count", int(getattr(cfg, count))), ("add_expert_used_count", int(cfg.num_experts_per_tok))]
        if expert_width:
            out.append(("add_expert_feed_forward_length", int(cfg.moe_intermediate_size)))
        if shared:
            out.append(("add_expert_shared_feed_forward_length", int(cfg.shared_expert_intermediate_size)))
        return out
    return keys


def _mixtral_keys(cfg):
    return [("add_vocab_size", cfg.vocab_size), ("add_rope_dimension_count", _head_dim(cfg))] + \
        _expert_keys("num_local_experts", expert_width=False)(cfg)


MOE_FAMILIES = (
    Architecture("mixtral", "mixtral", "model.layers", ATTENTION, "model.embed_tokens", "model.norm",
                 tiny=_mixtral_tiny, moe=MoeLayout(count="num_local_experts"),
                 notes="experts fused as 3-D parameters; llama.cpp runs it as its llama architecture",
                 gguf=GgufLayout("llama", permute_qk=("self_attn.q_proj", "self_attn.k_proj"), hparams=_mixtral_keys,
                                 refusal=_moe_refusal("Mixtral", True, "num_local_experts"))),
    Architecture("qwen2_moe", "qwen2-moe", "model.layers",
                 ATTENTION + (("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj", "mlp.shared_expert_gate"),
                              ("mlp.shared_expert.down_proj",)),
                 "model.embed_tokens", "model.norm", tiny=_qwen2_moe_tiny,
                 moe=MoeLayout(shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate"),
                 notes="biases on q/k/v; a shared expert beside the routed ones, behind a sigmoid gate",
                 gguf=GgufLayout("qwen2moe", hparams=_expert_keys("num_experts", shared=True),
                                 refusal=_moe_refusal("Qwen2-MoE", False, "num_experts"))),
    Architecture("qwen3_moe", "qwen3-moe", "model.layers", ATTENTION, "model.embed_tokens", "model.norm",
                 extra_norms=("self_attn.q_norm", "self_attn.k_norm"), tiny=_qwen3_moe_tiny, moe=MoeLayout(),
                 gguf=GgufLayout("qwen3moe", hparams=_expert_keys("num_experts"),
                                 refusal=_moe_refusal("Qwen3-MoE", True, "num_experts"))),
    Architecture("olmoe", "olmoe", "model.layers", ATTENTION, "model.embed_tokens", "model.norm",
                 extra_norms=("self_attn.q_norm", "self_attn.k_norm"), tiny=_olmoe_tiny, moe=MoeLayout(),
                 notes="q/k norms over the whole projection",
                 gguf=GgufLayout("olmoe", hparams=_expert_keys("num_experts", expert_width=False),
                                 refusal=_olmoe_refusal)),
)
