"""gptopt core: the pipeline, the plugin contract and the CLI.

``__all__`` is exactly what a plugin, a benchmark or a user script may use; everything else in ``gptopt_core``
is private, whatever its name (a test fails when a plugin, benchmark or docs example imports anything else).
The contract's core names import at once; the helpers (torch-backed) load on first use, so ``gptopt --help``
stays fast. ``docs/python-api.md`` documents every public name with its signature (generated and checked).
"""
from .context import RunContext
from .errors import GptoptError, ParamsError, PlanError, SourceError, StepFailed, error_text, safe_text
from .hookspecs import hookimpl
from .paths import check_output_path
from .pipeline import Pipeline, RunResult
from .steps import Params, Step

#: public name → submodule it lives in (imported on first attribute access)
_LAZY = {
    # plugin contract
    "fact_matches": "steps", "find_fact": "steps", "parse_percent": "steps", "parse_choice": "steps",
    "as_percent": "options", "as_group_size": "options", "as_choice": "options",
    "group_columns": "options", "STATE_KEYS": "vocabulary", "FACTS": "vocabulary", "StateKey": "vocabulary",
    "Fact": "vocabulary", "MatrixCell": "vocabulary",
    "PluginHookError": "plugins", "get_plugins": "plugins",
    # the architecture table
    "Architecture": "architectures", "GgufLayout": "architectures", "architecture_table": "architectures",
    "architecture_of": "architectures", "check_architecture": "architectures",
    # mixture-of-experts: each expert seen as linear layers
    "MoeLayout": "experts", "expert_linears": "experts", "expert_layers": "experts", "moe_blocks": "experts",
    "MIN_EXPERT_TOKENS": "experts", "with_experts": "experts", "MoeBlock": "experts", "moe_layers": "experts",
    "moe_effect": "experts",
    # llama.cpp's byte-level BPE pre-tokenizer names
    "PreTokenizer": "pretokenizers", "pre_tokenizer_table": "pretokenizers",
    # models and data
    "LoadedModel": "models", "tiny_model": "models", "load_local_dir": "models", "check_local_dir": "models",
    "smollm2_dir": "models", "TextData": "data",
    # input files someone else wrote: regular files only, size-capped, one safe JSON/YAML loader, GGUF headers
    "check_input_file": "inputs", "read_input_file": "inputs", "load_structured_file": "inputs",
    "check_gguf_file": "gguf_files", "remove_stale_temporaries": "paths",
    "OutputLock": "locks", "publish_file": "locks",
    # measuring: one perplexity, one size, one sparsity for everyone
    "perplexity": "evaluate", "perplexity_of": "evaluate", "eval_windows": "evaluate", "generate_sample": "evaluate",
    "model_device": "evaluate",
    # KL from a base model (llama-perplexity --kl-divergence semantics), its cached base, bootstrap intervals
    "BaseLogits": "divergence", "paired_bootstrap": "divergence", "token_divergence": "divergence",
    "percentile": "divergence", "ppl_ratio": "divergence",
    "mean_interval": "divergence", "kl_plan": "klbase", "kl_metrics": "klbase", "cached_kl_base": "klbase",
    "model_bytes": "metrics", "num_params": "metrics", "sparsity": "metrics",
    # weight layers
    "weight_modules": "modules", "weight_matrix": "modules", "is_conv1d": "layertypes", "is_weight_layer": "layertypes",
    "matches": "modules", "apply_masks": "modules", "dequantized_weight": "modules", "get_module": "sensitivity",
    "replace_module": "sensitivity",
    # training
    "TrainParams": "train_options", "Trainer": "training", "train": "training", "train_blocks": "train_options",
    "resolve_precision": "train_options", "mask_targets": "modules",
    # calibration, sensitivity and integer grids
    "calibration_nll": "sensitivity", "module_sensitivity": "sensitivity",
    "swapped_modules": "precision_search", "nll_with_modules": "precision_search", "smallest_within": "precision_search",
    "calibration_batches": "calibration", "run_blockwise": "calibration", "split_by_block": "calibration",
    "BlockInfo": "calibration", "LayerStats": "calibration", "Observer": "observers", "get_observer": "observers",
    "resident_param_bytes": "offload", "inverse_hessian_cholesky": "calibration", "torch_threads": "calibration", "find_blocks": "calibration",
    "WeightGrid": "grids", "attach_grid": "grids", "fake_quantize": "grids", "fit_grid": "grids", "parse_group_size": "grids", "fit_group": "grids",
    "grid_codes": "grids", "grid_from_groups": "grids", "grid_layers": "grids", "grid_of": "grids", "on_grid": "grids",
    "round_to_grid": "grids", "GroupSize": "groupsize",
    # the one OBS solver (GPTQ, SparseGPT): the column loop and the rules its callers give it
    "obs_solve": "obs", "ColumnRule": "obs", "GroupScales": "obs", "prepare_obs": "obs", "lazy_batch": "obs",
    "InputQuant": "activations", "attach_input_quant": "activations", "detach_input_quant": "activations",
    "input_quant_of": "activations", "input_quant_layers": "activations", "quantize_tokens": "activations",
    # decode timing (bench, cpu-fast)
    "PerfCounterTimer": "decode", "GenerateTiming": "decode", "generation_kwargs": "decode", "time_generate": "decode",
    # writers: one registry of directories (save --format) and files (export --format); SaveFormat is Writer
    "Writer": "writers", "registered_writers": "writers", "SaveFormat": "saveformats", "save_formats": "saveformats",
    "write_model_file": "saveformats",
    # testing plugins
    "make_context": "testing", "register_plugin": "testing",
}

#: public name → (submodule, name there), where the public name says more than the module's own
_ALIASES = {"choose_save_format": ("saveformats", "choose"), "check_save_format": ("saveformats", "check_plan"),
            "choose_writer": ("writers", "choose"), "plan_writer": ("writers", "plan_choice"),
            "unsupported_architecture": ("architectures", "unsupported"),
            "identify_pre_tokenizer": ("pretokenizers", "identify"),
            "pre_tokenizer_hash": ("pretokenizers", "check_hash"),
            "pre_tokenizer_signature": ("pretokenizers", "signature_of"),
            "encode_logits": ("divergence", "encode")}

__all__ = sorted(["GptoptError", "Params", "ParamsError", "Pipeline", "PlanError", "RunContext", "RunResult",
                  "SourceError", "Step", "StepFailed", "check_output_path", "error_text", "hookimpl", "safe_text",
                  *_LAZY, *_ALIASES])


def __getattr__(name: str):
    if name in _LAZY or name in _ALIASES:
        import importlib

        module, attr = _ALIASES.get(name, (_LAZY.get(name), name))
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gptopt_core' has no attribute '{name}'")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))
