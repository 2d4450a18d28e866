"""gptopt-bnb: the ``quantize`` step (bitsandbytes int8 / nf4 / fp4; full, partial and sensitivity-planned).

Heavy imports (torch, bitsandbytes, transformers) happen inside the step body and the hooks, so importing
this module stays cheap.
"""
from gptopt_core import hookimpl

from .step import QuantizeStep

__all__ = ["QuantizeStep"]


@hookimpl
def gptopt_register_steps(register):
    register(QuantizeStep)


@hookimpl
def gptopt_save_model(ctx, model, path):
    """Save a model quantized by this plugin so plain ``AutoModelForCausalLM.from_pretrained(dir)`` loads it."""
    if getattr(model, "gptopt_bnb", None) is None:
        return None
    from .convert import save_quantized

    save_quantized(model, path)
    return True
