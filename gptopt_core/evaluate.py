"""Held-out perplexity: one fixed method (block size, stride, max tokens) for every number gptopt reports."""
from __future__ import annotations

import math

from .errors import GptoptError


def model_device(model):
    import torch

    try:
        return next(p.device for p in model.parameters())
    except StopIteration:
        return torch.device("cpu")


def perplexity(model, ids, block_size: int = 512, stride: int = 512, max_tokens: int = 4096, progress=None) -> dict:
    """Perplexity of ``model`` on the first ``max_tokens`` of ``ids`` (1-D LongTensor).

    Windows of ``block_size`` tokens start every ``stride`` tokens; each window scores only the tokens not
    scored by an earlier window (the Hugging Face sliding-window method), so ``stride == block_size`` means
    disjoint blocks. Returns ``{"perplexity", "nll", "tokens"}``.
    """
    import torch

    ids = ids[:max_tokens]
    if ids.numel() < block_size + 1:
        raise GptoptError(
            f"validation split has {ids.numel()} tokens, fewer than one eval block of {block_size}+1; give more "
            "data or a smaller --block-size"
        )
    device = model_device(model)
    was_training = model.training
    model.eval()
    total_nll, total_tokens, prev_end = 0.0, 0, 0
    starts = list(range(0, ids.numel() - 1, stride))
    iterator = progress(starts, "eval") if progress else starts
    with torch.inference_mode():
        for begin in iterator:
            end = min(begin + block_size, ids.numel())
            if end - begin < 2:
                break
            input_ids = ids[begin:end].unsqueeze(0).to(device)
            logits = model(input_ids=input_ids).logits[0, :-1].float()
            targets = input_ids[0, 1:]
            scored_from = max(prev_end - begin - 1, 0)  # tokens already scored by an earlier window
            nll = torch.nn.functional.cross_entropy(logits[scored_from:], targets[scored_from:], reduction="sum")
            total_nll += float(nll)
            total_tokens += int(targets.numel() - scored_from)
            prev_end = end
            if end == ids.numel():
                break
    model.train(was_training)
    mean = total_nll / max(total_tokens, 1)
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens}


def generate_sample(model, tokenizer, prompt: str, max_new_tokens: int = 32) -> str:
    import torch

    device = model_device(model)
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
