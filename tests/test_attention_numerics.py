"""Numerics where attention matters: llama.cpp's f32 logits against torch's, per position, for every family that
exports to GGUF.

On tiny random models attention is almost uniform, so a wrong rope layout, a dropped soft-cap or a dropped window
still gives torch's predictions. Here each family's tiny model is made to depend on them: q/k (or Qwen 3 / Gemma 3's
q/k norms) scaled until attention is peaked (entropy under 0.3 of uniform, asserted), the final norm scaled so the
logits are large (standard deviation 3), sliding windows of 16 tokens crossed by 128-token inputs, Gemma 2's
soft-caps small enough that its attention scores and logits pass them, partial rotary for GPT-NeoX (0.25) and Phi-3
(0.5), Llama 3.1's rope scaling. The model is exported as f32 GGUF and llama.cpp (f32 KV cache) must give torch's
logits at every position (max |difference| and KL within the tolerances below). Each planted fault, put into the
exporter by a monkeypatch, must make the same check fail. Sliding windows llama.cpp does not apply are refused.
"""
from unittest import mock

import numpy as np
import pytest
import torch

from gptopt_core import GptoptError, architecture_table
from gptopt_core.kit.families import rope_parameters

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'gptopt[llamacpp]')")

SEQ, WINDOW = 128, 16
#: llama.cpp and torch both compute in f32 (weights, activations, KV cache), in other orders. Measured on these
#: models (logits up to +-26): SiLU families max |logit difference| 1.2e-4, KL under 1e-9 nats. ggml's GELU rounds
#: its input to fp16 (a lookup table), which torch does not: GELU families (Gemma, GPT-2, GPT-NeoX) measured up to
#: 0.016 and KL 1.4e-5, and the same fp16 rounding put into torch's GELU alone moves torch's own logits by 0.002-0.010.
#: The tolerances leave 3x (GELU) to 15x (SiLU) room; the smallest planted fault moves logits by 0.59 (Gemma 2's
#: attention soft-cap) and no fault moves them by less than 3x the GELU bound.
MAX_DIFF = {"silu": 2e-3, "gelu": 0.05}
MAX_KL = 1e-4
FAMILIES = [a for a in architecture_table().values() if a.gguf is not None and a.tiny is not None
            and a.moe is None]  # MoE families: tests/test_moe.py (peaked routing)


def _tokenizer():
    from gptopt_core.kit.models import byte_tokenizer

    return byte_tokenizer()


def features(arch, cfg):
    """The config changes that make the family's attention features matter within 128 tokens."""
    if getattr(cfg, "sliding_window", None) and arch.gguf.window_ignored is None:
        cfg.sliding_window = WINDOW  # Gemma 2 / 3: windows llama.cpp applies
    if arch.model_type == "gemma2":
        cfg.attn_logit_softcapping, cfg.final_logit_softcapping = 35.0, 3.0  # not llama.cpp's defaults (50, 30)
    if arch.model_type == "phi3":
        cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.5}
    return cfg


def _scale_norm(weight, factor, one_plus: bool):
    with torch.no_grad():
        weight.copy_((1 + weight) * factor - 1 if one_plus else weight * factor)


def sharpen(model, arch, factor: float) -> None:
    """Scale every block's attention scores by about ``factor ** 2``: q and k rows (or Qwen 3 / Gemma 3's q/k norms,
    which undo a scaled projection)."""
    cfg, one_plus = model.config, arch.norm == "rmsnorm(1+w)"
    heads, head_dim = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // \
        cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    first = arch.groups[0][0]
    with torch.no_grad():
        for block in model.get_submodule(arch.blocks):
            if "self_attn.q_norm" in arch.extra_norms:
                for rel in ("self_attn.q_norm", "self_attn.k_norm"):
                    _scale_norm(block.get_submodule(rel).weight, factor, one_plus)
            elif first == "self_attn.q_proj":
                for rel in ("self_attn.q_proj", "self_attn.k_proj"):
                    for p in block.get_submodule(rel).parameters():
                        p.mul_(factor)
            elif first == "self_attn.qkv_proj":  # Phi-3: [q; k; v] rows
                block.get_submodule(first).weight[:(heads + kv) * head_dim].mul_(factor)
            elif first == "attention.query_key_value":  # GPT-NeoX: [head, (q, k, v), dim] rows
                layer = block.get_submodule(first)
                layer.weight.view(heads, 3, head_dim, -1)[:, :2].mul_(factor)
                layer.bias.view(heads, 3, head_dim)[:, :2].mul_(factor)
            elif first == "attn.c_attn":  # GPT-2 Conv1D: (in, [q; k; v])
                layer = block.get_submodule(first)
                layer.weight[:, :2 * cfg.hidden_size].mul_(factor)
                layer.bias[:2 * cfg.hidden_size].mul_(factor)
            else:
                raise AssertionError(f"no q/k layout for {arch.model_type}")


def attention_entropy(model, ids) -> float:
    """Mean attention entropy over layers, heads and positions 8.., as a fraction of uniform attention over the
    positions each row may see (its window on a sliding layer)."""
    cfg = model.config
    with torch.inference_mode():
        attentions = model(ids, output_attentions=True).attentions
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(attentions)
    fractions = []
    for kind, probs in zip(types, attentions):
        probs = probs[0].double()
        entropy = -(probs * torch.log(probs.clamp_min(1e-300))).sum(-1)  # [heads, positions]
        seen = torch.arange(1, probs.shape[-1] + 1, dtype=torch.float64)
        if kind == "sliding_attention":
            seen = seen.clamp(max=cfg.sliding_window)
        fractions.append((entropy[:, 8:] / torch.log(seen[8:])).mean())
    return float(torch.stack(fractions).mean())


_MODELS = {}


#: Llama 3.1's rope scaling with the original context shortened to 64 positions, so that the 8 rotary pairs of a
#: 16-wide head fall in all three regimes (unscaled, smoothed, divided by ``factor``) within 128 tokens
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def peaked_model(arch, rope=None):
    """``(model, ids, torch logits, entropy fraction)``: the family's tiny model with its features on (``rope``: a
    rope scaling), q/k scaled up until attention entropy is under 0.2 of uniform, the final norm scaled so logits
    have a standard deviation of 3 (before Gemma 2's final soft-cap)."""
    key = (arch.model_type, str(rope))
    if key in _MODELS:
        return _MODELS[key]
    from transformers import AutoModelForCausalLM

    tok = _tokenizer()
    cfg = features(arch, arch.tiny(len(tok)))
    if rope:
        cfg.rope_parameters = {**cfg.rope_parameters, **rope}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    ids = torch.randint(0, len(tok) - 1, (1, SEQ), generator=torch.Generator().manual_seed(1))
    entropy = attention_entropy(model, ids)
    for _ in range(40):
        if entropy < 0.2:
            break
        sharpen(model, arch, 1.5)
        entropy = attention_entropy(model, ids)
    cap, model.config.final_logit_softcapping = getattr(model.config, "final_logit_softcapping", None), None
    with torch.inference_mode():
        spread = float(model(ids).logits.std())  # before Gemma 2's final soft-cap: the raw logits pass it
    _scale_norm(model.get_submodule(arch.final_norm).weight, 3.0 / spread, arch.norm == "rmsnorm(1+w)")
    model.config.final_logit_softcapping = cap
    with torch.inference_mode():
        want = model(ids).logits[0].float().numpy()
    _MODELS[key] = (model, ids, want, entropy)
    return _MODELS[key]


def llamacpp_logits(model, path, ids, ignore_window=False):
    from gptopt_export.gguf_writer import write_gguf
    from gptopt_export.llamacpp import next_token_logits

    write_gguf(model, _tokenizer(), path, "f32", name="numerics", ignore_window=ignore_window)
    return next_token_logits(path, ids[0].tolist(), threads=2, f32_cache=True)


def differences(want, got) -> dict:
    """max |logit difference|, max per-position KL(torch || llama.cpp) in nats, top-1 agreement."""
    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(want), log_softmax(got)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"max_diff": float(np.abs(got - want).max()), "max_kl": float(kl.max()),
            "top1": float((got.argmax(-1) == want.argmax(-1)).mean())}


def activation(cfg) -> str:
    act = next(getattr(cfg, a) for a in ("hidden_act", "hidden_activation", "activation_function") if
               getattr(cfg, a, None))
    return "gelu" if "gelu" in act else "silu"


def within_tolerance(found: dict, cfg) -> bool:
    return found["max_diff"] <= MAX_DIFF[activation(cfg)] and found["max_kl"] <= MAX_KL


@pytest.mark.parametrize("arch", FAMILIES, ids=[a.model_type for a in FAMILIES])
def test_llamacpp_logits_match_torch_with_peaked_attention(arch, tmp_path):
    model, ids, want, entropy = peaked_model(arch)
    assert entropy < 0.3, entropy  # attention peaked: far from uniform, so positions and windows matter
    got = llamacpp_logits(model, tmp_path / "m.gguf", ids)
    found = differences(want, got)
    assert np.abs(want).max() > 2.5  # logits large enough that small relative errors would show
    assert within_tolerance(found, model.config), found
    assert found["top1"] >= 0.98, found  # a near-tie may flip within the tolerance


# -- planted faults: each must make the same check fail --------------------------------------------------------
def _qk_rows(src, cfg):
    """Row ranges of q and k in a written tensor (``attn_q``, ``attn_k`` or the fused ``attn_qkv``), with their head
    counts; empty for other tensors."""
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kind = src.name.split(".")[2] if src.name.startswith("blk.") else ""
    return {"attn_q": [(0, heads)], "attn_k": [(0, kv)],
            "attn_qkv": [(0, heads), (heads * dim, kv)]}.get(kind, []), dim


def _permute_qk(original):
    """The exporter with q/k rows in the other rope layout (llama.cpp's interleave applied once more)."""
    from gptopt_export.tensors import permute_rows

    def sources(model, plugins=None):
        out = original(model, plugins)
        for src in out:
            spans, dim = _qk_rows(src, model.config)
            if spans:
                src.values = src.values.clone()  # the exporter's values may share the model's storage
            for start, heads in spans:
                part = src.values[start:start + heads * dim]
                src.values[start:start + heads * dim] = part[permute_rows(heads * dim, heads)]
        return out
    return sources


def _edit_keys(original, edit):
    def hparams(model, arch, ignore_window=False):
        return edit(dict(original(model, arch, ignore_window)), model.config)
    return hparams


def _drop(key):
    return lambda keys, cfg: {k: v for k, v in keys.items() if k != key}


def _replace(key, value):
    return lambda keys, cfg: {**keys, key: value(cfg)} if key in keys else keys


def _head_dim(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


#: fault -> (which families it applies to, what it patches: (module attribute, wrapper))
FAULTS = {
    "rope layout permuted": (lambda a, cfg: a.rotary != "learned positions", ("tensors.sources", _permute_qk)),
    "attention soft-cap dropped": (lambda a, cfg: bool(getattr(cfg, "attn_logit_softcapping", None)),
                                   ("hparams", lambda o: _edit_keys(o, _drop("add_attn_logit_softcapping")))),
    "final soft-cap dropped": (lambda a, cfg: bool(getattr(cfg, "final_logit_softcapping", None)),
                               ("hparams", lambda o: _edit_keys(o, _drop("add_final_logit_softcapping")))),
    "window dropped": (lambda a, cfg: bool(getattr(cfg, "sliding_window", None)),
                       ("hparams", lambda o: _edit_keys(o, _replace("add_sliding_window",
                                                                    lambda cfg: cfg.max_position_embeddings)))),
    "partial rotary changed": (lambda a, cfg: rope_parameters(cfg).get("partial_rotary_factor", 1.0) < 1.0,
                               ("hparams", lambda o: _edit_keys(o, _replace("add_rope_dimension_count",
                                                                            _head_dim)))),
}


def _fault_cases():
    tok_size = 257
    for arch in FAMILIES:
        cfg = features(arch, arch.tiny(tok_size))
        for fault, (applies, _) in FAULTS.items():
            if applies(arch, cfg):
                yield pytest.param(arch, fault, id=f"{arch.model_type}-{fault}")


@pytest.mark.parametrize("arch, fault", list(_fault_cases()))
def test_planted_fault_fails_the_check(arch, fault, tmp_path):
    from gptopt_export import gguf_writer

    model, ids, want, _ = peaked_model(arch)
    target, wrap = FAULTS[fault][1]
    owner = gguf_writer.tensors if target.startswith("tensors.") else gguf_writer
    attribute = target.rsplit(".", 1)[-1]
    with mock.patch.object(owner, attribute, wrap(getattr(owner, attribute))):
        got = llamacpp_logits(model, tmp_path / "fault.gguf", ids)
    found = differences(want, got)
    assert not within_tolerance(found, model.config), f"{fault} not detected: {found}"


def test_the_faults_cover_every_feature_the_issue_names():
    cases = {c.id for c in _fault_cases()}
    assert {"gemma2-attention soft-cap dropped", "gemma2-final soft-cap dropped", "gemma2-window dropped",
            "gemma3_text-window dropped", "gpt_neox-partial rotary changed", "phi3-partial rotary changed"} <= cases
    rotary = {a.model_type for a in FAMILIES if a.rotary != "learned positions"}
    assert {c.split("-")[0] for c in cases if c.endswith("rope layout permuted")} == rotary


# -- sliding windows llama.cpp does not apply: refused unless asked for ------------------------------------------
def _windowed(model_type, window=WINDOW):
    from transformers import AutoModelForCausalLM

    arch = architecture_table()[model_type]
    cfg = arch.tiny(len(_tokenizer()))
    cfg.sliding_window = window
    if model_type == "qwen2":
        cfg.use_sliding_window = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    sharpen(model, arch, 4.0)
    return model


@pytest.mark.parametrize("model_type", ["mistral", "phi3", "qwen2"])
def test_a_window_llamacpp_ignores_is_refused_in_one_line(model_type, tmp_path):
    from gptopt_export.gguf_writer import write_gguf

    model = _windowed(model_type)
    with pytest.raises(GptoptError) as info:
        write_gguf(model, _tokenizer(), tmp_path / "w.gguf", "f32")
    message = str(info.value)
    assert "\n" not in message and "sliding" in message and not list(tmp_path.iterdir())
    if model_type != "qwen2":
        assert f"sliding_window {WINDOW}" in message and "--ignore-sliding-window" in message
    harmless = _windowed(model_type, window=model.config.max_position_embeddings)
    if model_type != "qwen2":  # a window as long as every position changes nothing: written
        write_gguf(harmless, _tokenizer(), tmp_path / "long.gguf", "f32")


@pytest.mark.parametrize("model_type", ["mistral", "phi3"])
def test_ignore_sliding_window_is_right_within_the_window_only(model_type, tmp_path):
    """What the refusal prevents: written anyway, llama.cpp attends past the window, so positions beyond it differ
    from torch by far more than the tolerance, while the first ``WINDOW`` positions agree."""
    model = _windowed(model_type)
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = model(ids).logits[0].float().numpy()
    got = llamacpp_logits(model, tmp_path / "w.gguf", ids, ignore_window=True)
    assert within_tolerance(differences(want[:WINDOW], got[:WINDOW]), model.config)
    beyond = differences(want[WINDOW:], got[WINDOW:])
    assert not within_tolerance(beyond, model.config) and beyond["top1"] < 0.9, beyond


def test_the_cli_refuses_a_mistral_window_and_writes_nothing(cli, tmp_path):
    from gptopt_core.kit.models import byte_tokenizer

    _windowed("mistral").save_pretrained(tmp_path / "mistral")
    byte_tokenizer().save_pretrained(tmp_path / "mistral")
    proc = cli("run", "--model", tmp_path / "mistral", "export", "--to", tmp_path / "m.gguf")
    lines = [l for l in proc.stderr.splitlines() if l.startswith("Error")]
    assert proc.returncode == 2 and len(lines) == 1 and "--ignore-sliding-window" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "m.gguf").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.gguf")]


@pytest.mark.parametrize("fault", [None, "rope factors dropped"])
def test_llama3_rope_scaling_matches_torch(fault, tmp_path):
    """Llama 3.1's rope scaling is written as llama.cpp's converter writes it (a ``rope_freqs`` tensor); without
    that tensor (the planted fault) llama.cpp rotates unscaled and the check fails."""
    from gptopt_export import gguf_writer

    arch = architecture_table()["llama"]
    model, ids, want, entropy = peaked_model(arch, LLAMA3)
    assert entropy < 0.3, entropy
    original = gguf_writer.tensors.sources

    def without_factors(model, plugins=None):
        return [s for s in original(model, plugins) if s.name != "rope_freqs.weight"]

    with mock.patch.object(gguf_writer.tensors, "sources", without_factors if fault else original):
        got = llamacpp_logits(model, tmp_path / "llama3.gguf", ids)
    assert within_tolerance(differences(want, got), model.config) is (fault is None), differences(want, got)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
     "original_max_position_embeddings": 256},
], ids=lambda s: s["rope_type"])
def test_rope_scalings_are_refused_in_one_line(scaling):
    from gptopt_export.gguf_writer import hparams

    family = "phi3" if scaling["rope_type"] == "longrope" else "llama"  # llama3 is written: see above
    arch = architecture_table()[family]
    cfg = arch.tiny(257)
    cfg.rope_parameters = {**cfg.rope_parameters, **scaling}
    model = mock.Mock(config=cfg)
    with pytest.raises(GptoptError) as info:
        hparams(model, arch)
    assert "\n" not in str(info.value) and scaling["rope_type"] in str(info.value)
