"""The CPU conversions: bf16 weights, torch dynamic int8 (``quantize_dynamic``: int8 weights, activations quantized
per batch at run time), torchao int8.

Every int8 conversion works module by module on the model's linear layers (GPT-2 ``Conv1D`` layers are turned
into the equivalent ``nn.Linear`` first: ``quantize_dynamic(model, {nn.Linear})`` alone would skip them and
quantize only GPT-2's output head). Modules named in ``keep`` stay in float32.

Imported only inside the step and hooks (it imports torch).
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import torch
import torch.nn as nn

from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import matches
from gptopt_core.kit.sensitivity import replace_module

INT8_FORMATS = ("int8-dynamic", "ao-int8-weight", "ao-int8-weight-bf16", "ao-int8-dynamic")
AO_FORMATS = ("ao-int8-weight", "ao-int8-weight-bf16", "ao-int8-dynamic")
#: formats whose float parts (unconverted weights, kept layers, activations) are bfloat16
BF16_BASED = ("bf16", "ao-int8-weight-bf16")


def float_dtype(fmt: str):
    """The dtype of everything a format leaves in float (weights not converted, activations)."""
    return torch.bfloat16 if fmt in BF16_BASED else torch.float32


@contextlib.contextmanager
def quiet():
    """Silence torch's deprecation notes on eager-mode quantization (``quantize_dynamic`` still works in this
    torch; docs/cpu.md says what to do when it goes) so the run's output stays readable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*(deprecat|migrat|torchao)")
        yield


def torchao_problem() -> str | None:
    """``None`` when torchao's int8 configs import and run on this CPU; else a sentence saying why not."""
    try:
        import logging
        import warnings

        logging.getLogger("torchao").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception as exc:  # ImportError, or a torchao built for another torch
        return f"torchao is not usable here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); " \
               "install it with `pip install 'gptopt[cpu]'`"
    try:
        lin = nn.Linear(64, 32)
        x = torch.randn(2, 64)
        ref = lin(x)
        for config in _ao_configs().values():
            m = nn.Sequential(copy.deepcopy(lin))
            _ao_quantize(m, config)
            with torch.inference_mode():
                out = m(x)
            if not torch.allclose(out, ref, atol=0.1, rtol=0.1):
                return "torchao's int8 kernels give wrong results on this CPU"
    except Exception as exc:  # kernels missing for this CPU / torch build
        return f"torchao's int8 configs do not run on this CPU ({type(exc).__name__}: {exc})"
    return None


def _ao_configs() -> dict:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig

    return {"ao-int8-weight": Int8WeightOnlyConfig(), "ao-int8-weight-bf16": Int8WeightOnlyConfig(),
            "ao-int8-dynamic": Int8DynamicActivationInt8WeightConfig()}


def _ao_quantize(model, config, filter_fn=None) -> None:
    import warnings

    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model, config, filter_fn=filter_fn)


def linear_names(model) -> list[str]:
    """Qualified names of every ``nn.Linear`` / ``Conv1D`` layer, output head included, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


def as_linear(module) -> nn.Linear:
    """``module`` itself if it is an ``nn.Linear``; a ``Conv1D`` becomes the equivalent ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        return module
    weight = module.weight  # (in, out)
    lin = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None, device=weight.device,
                    dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight.t())
        if module.bias is not None:
            lin.bias.copy_(module.bias)
    return lin


# -- one module ---------------------------------------------------------------------------------------
def convert_module(module, fmt: str):
    """A converted copy of one linear / Conv1D layer (``module`` itself is left as it is)."""
    with quiet():
        return _convert_module(module, fmt)


def _convert_module(module, fmt: str):
    lin = as_linear(copy.deepcopy(module)).to(float_dtype(fmt))
    if fmt == "int8-dynamic":
        lin.qconfig = torch.ao.quantization.default_dynamic_qconfig
        return torch.ao.nn.quantized.dynamic.Linear.from_float(lin)
    if fmt in AO_FORMATS:
        holder = nn.Sequential(lin)
        _ao_quantize(holder, _ao_configs()[fmt])
        return holder[0]
    raise ValueError(f"no per-module conversion for {fmt}")


# -- the whole model ----------------------------------------------------------------------------------
def convert_model(model, fmt: str, keep=()) -> dict:
    """Convert ``model`` in place to ``fmt``; returns ``{module name: fmt}`` of the converted linear layers.

    ``keep``: qualified names (or globs) of linear layers that stay float (int8 formats only): float32, or
    bfloat16 for ``ao-int8-weight-bf16`` (whose whole float part is bfloat16).
    """
    with quiet():
        return _convert_model(model, fmt, keep)


def _convert_model(model, fmt: str, keep=()) -> dict:
    if fmt == "fp32":
        return {}
    if fmt == "bf16":
        model.to(torch.bfloat16)
        return {name: "bf16" for name in linear_names(model)}
    if fmt not in INT8_FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    model.to(float_dtype(fmt))
    keep = list(keep)
    chosen = [n for n in linear_names(model) if not matches(n, keep)]
    if fmt == "int8-dynamic":
        for name in chosen:  # quantize_dynamic sees only nn.Linear: turn Conv1D layers into Linear first
            module = model.get_submodule(name)
            if is_conv1d(module):
                replace_module(model, name, as_linear(module))
        spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in chosen}
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    else:
        for name in chosen:
            replace_module(model, name, convert_module(model.get_submodule(name), fmt))
    return {name: fmt for name in chosen}


def plain_quantize_dynamic(model):
    """Plain torch ``torch.quantization.quantize_dynamic(model, {nn.Linear})`` with nothing added (a converted
    copy; on GPT-2 this touches only the output head, as its blocks use ``Conv1D``)."""
    return torch.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def compile_model(model) -> None:
    """``torch.compile`` the model's forward in place (inductor, ``freezing``: weights become constants and
    linear layers use packed CPU kernels; shapes dynamic, so prompt and cache lengths do not recompile).
    Compilation happens at the first call; the model's weights and ``save`` are unchanged."""
    if getattr(model, "_gptopt_compiled", False):
        return
    model.forward = torch.compile(model.forward, dynamic=True, options={"freezing": True})
    model._gptopt_compiled = True


def compiler_problem() -> str | None:
    """``None`` when torch.compile's CPU backend can build code here; else why not (it needs a C++ compiler)."""
    import os
    import shutil

    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx) or any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return None
    return "torch.compile on CPU needs a C++ compiler (g++ or clang++) and none was found; install one " \
           "(e.g. apt-get install g++) or drop --compile"


def is_dynamic_int8(module) -> bool:
    return isinstance(module, torch.ao.nn.quantized.dynamic.Linear)
