"""Input-activation quantization: "this layer's inputs are rounded to b-bit integers, one scale per token".

W8A8 (int8 weights on a per-channel symmetric grid, :mod:`gptopt_core.kit.grids`, and int8 inputs) is what vLLM's CPU
int8 kernels run: the weight codes are stored, the inputs are quantized at run time, per token, symmetric, with a
scale of their own (``dynamic``). A layer marked with :func:`attach_input_quant` keeps its float weight (on its
grid) and gets a forward pre-hook that rounds its input the same way, so ``eval`` / ``bench`` measure the model as
such a kernel computes it (up to float summation order):

* per token (each row of the last dimension): ``scale = max|x| / qmax`` (``qmax = 2**(bits-1) - 1``, 127 for int8,
  as vLLM's ``dynamic_scaled_int8_quant`` does), ``q = clamp(round(x / scale), -qmax - 1, qmax)``, input
  ``q * scale``; an all-zero token stays zero;
* rounding is torch's (half to even), the same as the kernels' ``nearbyint``.

Savers read :func:`input_quant_of` to write the input scheme (compressed-tensors: ``input_activations`` of the
config group), loaders call :func:`attach_input_quant` again.
"""
from __future__ import annotations

from dataclasses import dataclass

INPUT_QUANT_ATTR = "gptopt_input_quant"
_HANDLE_ATTR = "_gptopt_input_quant_handle"


@dataclass(frozen=True)
class InputQuant:
    """How a layer's inputs are quantized: ``bits``, ``strategy`` (``"token"``), ``symmetric``, ``dynamic``."""

    bits: int = 8
    strategy: str = "token"
    symmetric: bool = True
    dynamic: bool = True

    def describe(self) -> str:
        """Short name such as ``a8-token-sym``."""
        return f"a{self.bits}-{self.strategy}-{'sym' if self.symmetric else 'asym'}"

    def args(self) -> dict:
        """compressed-tensors ``QuantizationArgs`` fields of this input scheme."""
        return {"num_bits": self.bits, "type": "int", "strategy": self.strategy, "symmetric": self.symmetric,
                "dynamic": self.dynamic}


def quantize_tokens(x, bits: int = 8):
    """``x`` (``(..., features)``) fake-quantized per token (symmetric, dynamic): see the module docstring."""
    import torch

    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / scale).clamp_(-qmax - 1, qmax)
    return (q * scale).to(x.dtype)


def _pre_hook(module, args):
    spec = getattr(module, INPUT_QUANT_ATTR, None)
    if spec is None or not args:
        return None
    return (quantize_tokens(args[0], spec.bits), *args[1:])


def attach_input_quant(module, spec: InputQuant | None = None) -> InputQuant:
    """Quantize ``module``'s input on every forward as ``spec`` says (default: int8 per token, symmetric, dynamic).
    Attaching twice replaces the spec; one hook per module. Returns the spec."""
    spec = spec or InputQuant()
    if (spec.strategy, spec.symmetric, spec.dynamic) != ("token", True, True):
        raise ValueError("only dynamic symmetric per-token input quantization is implemented")
    setattr(module, INPUT_QUANT_ATTR, spec)
    if getattr(module, _HANDLE_ATTR, None) is None:
        setattr(module, _HANDLE_ATTR, module.register_forward_pre_hook(_pre_hook))
    return spec


def input_quant_of(module) -> InputQuant | None:
    """The :class:`InputQuant` attached to ``module``, or ``None``."""
    return getattr(module, INPUT_QUANT_ATTR, None)


def detach_input_quant(module) -> None:
    """Stop quantizing ``module``'s inputs."""
    handle = getattr(module, _HANDLE_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(module, _HANDLE_ATTR)
    if hasattr(module, INPUT_QUANT_ATTR):
        delattr(module, INPUT_QUANT_ATTR)


def input_quant_layers(model):
    """``[(qualified_name, module, InputQuant)]`` of every layer whose inputs are quantized, in model order."""
    return [(n, m, input_quant_of(m)) for n, m in model.named_modules() if input_quant_of(m) is not None]
