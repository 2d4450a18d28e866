"""Tiny mixture-of-experts models for tests, built here from transformers configs (hidden 64, 2 layers, 8 experts,
top-2) with the byte tokenizer, saved with ``save_pretrained`` so a test passes the directory as ``--model``.

Routing is peaked on purpose: router rows get very different norms and a shared direction that the hidden states
carry, so a few experts see most tokens and some almost none; expert weights get different scales, so their
outputs differ in size too. Same ``seed``, same model.
"""
from __future__ import annotations

from pathlib import Path

#: family → (config class name, experts-count key, extra config keys)
FAMILIES = {
    "mixtral": ("MixtralConfig", "num_local_experts", {}),
    "qwen2_moe": ("Qwen2MoeConfig", "num_experts", {"shared_expert_intermediate_size": 96,
                                                     "moe_intermediate_size": 32, "norm_topk_prob": False}),
    "qwen3_moe": ("Qwen3MoeConfig", "num_experts", {"moe_intermediate_size": 32, "norm_topk_prob": True,
                                                     "head_dim": 16}),
    "olmoe": ("OlmoeConfig", "num_experts", {"norm_topk_prob": False}),
}


def tiny_moe_config(family: str, vocab: int, experts: int = 8, top_k: int = 2):
    import transformers

    cls_name, count_key, extra = FAMILIES[family]
    kwargs = dict(vocab_size=vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  num_experts_per_tok=top_k, tie_word_embeddings=False, bos_token_id=vocab - 1,
                  eos_token_id=vocab - 1, pad_token_id=None)
    kwargs[count_key] = experts
    kwargs.update(extra)
    return getattr(transformers, cls_name)(**kwargs)


def peak_routing(model, seed: int = 0) -> None:
    """Make expert use uneven and expert outputs differ in size (in place)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            moe = layer.mlp
            if not hasattr(moe, "experts"):
                continue
            w = moe.gate.weight
            n = w.shape[0]
            norms = torch.logspace(-1, 0.7, n)[torch.randperm(n, generator=gen)]
            w.copy_(torch.randn(w.shape, generator=gen) * norms[:, None])
            ex = moe.experts
            scale = torch.logspace(-0.5, 0.5, n)[torch.randperm(n, generator=gen)]
            ex.gate_up_proj.mul_(scale[:, None, None])
            ex.down_proj.mul_(scale[:, None, None])


def save_tiny_moe(directory, family: str = "mixtral", seed: int = 0, experts: int = 8, top_k: int = 2) -> Path:
    """Build, peak and save a tiny ``family`` MoE model with the byte tokenizer into ``directory``."""
    import torch
    from transformers import AutoModelForCausalLM

    from gptopt_core.kit.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(family, len(tokenizer), experts, top_k))
    peak_routing(model, seed)
    directory = Path(directory)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
