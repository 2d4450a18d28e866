"""gptopt core: the pipeline, the plugin contract and the CLI.

``__all__`` is exactly what a plugin, a benchmark or a user script may use; everything else in ``gptopt_core``
is private, whatever its name (a test fails when a plugin, benchmark or docs example imports anything else).
The contract's core names import at once; the helpers (torch-backed) load on first use, so ``gptopt --help``
stays fast. ``docs/python-api.md`` documents every public name with its signature (generated and checked).
"""
import sys

from .context import RunContext
from .errors import GptoptError, ParamsError, PlanError, SourceError, StepFailed, error_text, safe_text
from .hookspecs import hookimpl
from .kit.paths import check_output_path
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
    "MoeLayout": "kit.experts", "expert_linears": "kit.experts", "expert_layers": "kit.experts",
    "moe_blocks": "kit.experts",
    "MIN_EXPERT_TOKENS": "kit.experts", "with_experts": "kit.experts", "MoeBlock": "kit.experts",
    "moe_layers": "kit.experts",
    "moe_effect": "kit.experts",
    # llama.cpp's byte-level BPE pre-tokenizer names
    "PreTokenizer": "kit.pretokenizers", "pre_tokenizer_table": "kit.pretokenizers",
    # models and data
    "LoadedModel": "kit.models", "tiny_model": "kit.models", "load_local_dir": "kit.models",
    "check_local_dir": "kit.models",
    "smollm2_dir": "kit.models", "TextData": "kit.data",
    # input files someone else wrote: regular files only, size-capped, one safe JSON/YAML loader, GGUF headers
    "check_input_file": "kit.inputs", "read_input_file": "kit.inputs", "load_structured_file": "kit.inputs",
    "check_gguf_file": "kit.gguf_files", "remove_stale_temporaries": "kit.paths",
    "OutputLock": "kit.locks", "publish_file": "kit.locks",
    # measuring: one perplexity, one size, one sparsity for everyone
    "perplexity": "kit.evaluate", "perplexity_of": "kit.evaluate", "eval_windows": "kit.evaluate",
    "generate_sample": "kit.evaluate",
    "model_device": "kit.evaluate",
    # KL from a base model (llama-perplexity --kl-divergence semantics), its cached base, bootstrap intervals
    "BaseLogits": "kit.divergence", "paired_bootstrap": "kit.divergence", "token_divergence": "kit.divergence",
    "percentile": "kit.divergence", "ppl_ratio": "kit.divergence",
    "mean_interval": "kit.divergence", "kl_plan": "kit.klbase", "kl_metrics": "kit.klbase",
    "cached_kl_base": "kit.klbase",
    "model_bytes": "kit.metrics", "num_params": "kit.metrics", "sparsity": "kit.metrics",
    # weight layers
    "weight_modules": "kit.modules", "weight_matrix": "kit.modules", "is_conv1d": "kit.layertypes",
    "is_weight_layer": "kit.layertypes",
    "matches": "kit.modules", "apply_masks": "kit.modules", "dequantized_weight": "kit.modules",
    "get_module": "kit.sensitivity",
    "replace_module": "kit.sensitivity",
    # training
    "TrainParams": "kit.train_options", "Trainer": "kit.training", "train": "kit.training",
    "train_blocks": "kit.train_options",
    "resolve_precision": "kit.train_options", "mask_targets": "kit.modules",
    # calibration, sensitivity and integer grids
    "calibration_nll": "kit.sensitivity", "module_sensitivity": "kit.sensitivity",
    "swapped_modules": "kit.precision_search", "nll_with_modules": "kit.precision_search",
    "smallest_within": "kit.precision_search",
    "calibration_batches": "kit.calibration", "run_blockwise": "kit.calibration", "split_by_block": "kit.calibration",
    "BlockInfo": "kit.calibration", "LayerStats": "kit.calibration", "Observer": "kit.observers",
    "get_observer": "kit.observers",
    "resident_param_bytes": "kit.offload", "inverse_hessian_cholesky": "kit.calibration",
    "torch_threads": "kit.calibration", "find_blocks": "kit.calibration",
    "WeightGrid": "kit.grids", "attach_grid": "kit.grids", "fake_quantize": "kit.grids", "fit_grid": "kit.grids",
    "parse_group_size": "kit.grids", "fit_group": "kit.grids",
    "grid_codes": "kit.grids", "grid_from_groups": "kit.grids", "grid_layers": "kit.grids", "grid_of": "kit.grids",
    "on_grid": "kit.grids",
    "round_to_grid": "kit.grids", "GroupSize": "kit.groupsize",
    # the one OBS solver (GPTQ, SparseGPT): the column loop and the rules its callers give it
    "obs_solve": "kit.obs", "ColumnRule": "kit.obs", "GroupScales": "kit.obs", "prepare_obs": "kit.obs",
    "lazy_batch": "kit.obs",
    "InputQuant": "kit.activations", "attach_input_quant": "kit.activations", "detach_input_quant": "kit.activations",
    "input_quant_of": "kit.activations", "input_quant_layers": "kit.activations", "quantize_tokens": "kit.activations",
    # decode timing (bench, cpu-fast)
    "PerfCounterTimer": "kit.decode", "GenerateTiming": "kit.decode", "generation_kwargs": "kit.decode",
    "time_generate": "kit.decode",
    # writers: one registry of directories (save --format) and files (export --format); SaveFormat is Writer
    "Writer": "writers", "registered_writers": "writers", "SaveFormat": "saveformats", "save_formats": "saveformats",
    "write_model_file": "saveformats",
    # testing plugins
    "make_context": "kit.testing", "register_plugin": "kit.testing",
}

#: public name → (submodule, name there), where the public name says more than the module's own
_ALIASES = {"choose_save_format": ("saveformats", "choose"), "check_save_format": ("saveformats", "check_plan"),
            "choose_writer": ("writers", "choose"), "plan_writer": ("writers", "plan_choice"),
            "unsupported_architecture": ("architectures", "unsupported"),
            "identify_pre_tokenizer": ("kit.pretokenizers", "identify"),
            "pre_tokenizer_hash": ("kit.pretokenizers", "check_hash"),
            "pre_tokenizer_signature": ("kit.pretokenizers", "signature_of"),
            "encode_logits": ("kit.divergence", "encode")}

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


class _MovedModules:
    """Old dotted paths of the modules that moved into ``gptopt_core.kit`` / ``gptopt_core.tools``
    (``gptopt_core.grids`` is ``gptopt_core.kit.grids``): private paths, kept resolving for code written before."""

    @staticmethod
    def _moved(fullname):
        head, _, leaf = fullname.rpartition(".")
        if head == __name__ and leaf.isidentifier():
            from pathlib import Path

            here = Path(__file__).parent
            return next((f"{__name__}.{sub}.{leaf}" for sub in ("kit", "tools")
                         if (here / sub / f"{leaf}.py").is_file()), None)
        return None

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if cls._moved(fullname) is None:
            return None
        import importlib.util

        return importlib.util.spec_from_loader(fullname, cls)

    @classmethod
    def create_module(cls, spec):
        import importlib

        return importlib.import_module(cls._moved(spec.name))

    @staticmethod
    def exec_module(module):
        pass


sys.meta_path.insert(0, _MovedModules)  # before the path finders: the old file may linger in an old install


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_ALIASES))
