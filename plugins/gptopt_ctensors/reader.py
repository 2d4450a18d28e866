"""Load a compressed-tensors directory as a plain float model with its integer grids re-attached.

transformers' own compressed-tensors quantizer (plain ``from_pretrained``) reads the grid layouts the writer
produces (some only de-quantized, see :func:`.layout.plain_transformers`), but - since compressed-tensors 0.15
dropped its sparse compressors - not the bitmask formats. This reader decodes every tensor the writer
(:mod:`.writer`) produces, and what llm-compressor writes in the same formats, into the model's own layers; grid
layers get their :class:`gptopt_core.kit.grids.WeightGrid` back, so ``model_bytes`` counts them packed again.
"""
from __future__ import annotations

from pathlib import Path

from gptopt_core import GptoptError, SourceError, error_text
from gptopt_core.kit.activations import InputQuant, attach_input_quant
from gptopt_core.kit.grids import WeightGrid, attach_grid
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.models import LoadedModel, check_local_dir


def read_config(path: Path) -> dict:
    """config.json through the core's safe loader (regular file, size-capped, plain JSON)."""
    from gptopt_core.kit.inputs import load_structured_file

    return load_structured_file(Path(path) / "config.json", "--model", kind="JSON")


def is_compressed_dir(path: Path) -> bool:
    from gptopt_core import GptoptError

    try:  # a FIFO or device named config.json is refused here, not read (the core's loader then says why)
        cfg = read_config(path)
    except GptoptError:
        return False
    qc = cfg.get("quantization_config") if isinstance(cfg, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


def _scheme_for(name, module, qconfig):
    from compressed_tensors.utils.match import is_match

    groups = list(qconfig.config_groups.values())
    for scheme in groups:
        if is_match(name, module, scheme.targets, qconfig.ignore or []):
            return scheme
    if len(groups) == 1:
        return groups[0]
    raise ValueError(f"no config group of quantization_config targets {name}")


def _grid_from(tensors, name, args):
    """(WeightGrid, codes (out, in) int32) of one grid layer in any of the writer's layouts (:mod:`.layout`:
    ``pack-quantized`` group / channel, ``naive-quantized``, ``pack-quantized`` block for Conv1D), popping its
    tensors."""
    import torch
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32


    if args.type != "int" or args.strategy not in ("group", "channel", "block"):
        raise ValueError(f"{name}: only integer group / channel / block weights are read, not {args.type} "
                         f"{args.strategy}")
    packed = f"{name}.weight_packed" in tensors
    if packed:
        shape = torch.Size(tensors.pop(f"{name}.weight_shape").flatten().tolist())
        held = tuple(tensors[f"{name}.weight_packed"].shape)
        if args.num_bits not in (2, 4, 8) or len(shape) != 2 or held != (shape[0], -(-shape[1] * args.num_bits // 32)):
            raise ValueError(f"{name}: weight_packed is {list(held)}, not {args.num_bits}-bit codes of "
                             f"weight_shape {list(shape)} (num_bits contradicts the packed data)")
        q = unpack_from_int32(tensors.pop(f"{name}.weight_packed"), args.num_bits, shape).to(torch.int32)
    else:  # naive-quantized: the codes as an int8 weight
        q = tensors.pop(f"{name}.weight").to(torch.int32)
    scale = tensors.pop(f"{name}.weight_scale").float()
    zp = tensors.pop(f"{name}.weight_zero_point", None)
    if args.strategy == "block":  # Conv1D, written (in, out) in blocks [group, 1]
        if list(args.block_structure)[1] != 1:
            raise ValueError(f"{name}: only column blocks [rows, 1] are read, not {args.block_structure}")
        q, scale = q.t(), scale.t()
        zp = None if zp is None else zp.t()
        rows = args.block_structure[0]
        group = rows if rows < q.shape[1] else None
    else:
        scale = scale.reshape(q.shape[0], -1)
        group = args.group_size if args.strategy == "group" else None
        if zp is not None and packed:
            zp = unpack_from_int32(zp, args.num_bits, torch.Size((q.shape[0], scale.shape[1])), packed_dim=0)
    if args.symmetric:
        return WeightGrid(args.num_bits, group, True, scale.contiguous(), None), q.contiguous()
    offset = 2 ** (args.num_bits - 1)
    zp = zp.to(torch.int32).reshape(scale.shape) + offset
    return WeightGrid(args.num_bits, group, False, scale.contiguous(), zp.contiguous()), (q + offset).contiguous()


def _dense_from_bitmask(tensors, name):
    import torch
    from compressed_tensors.utils.helpers import unpack_bitmasks

    shape = tensors.pop(f"{name}.shape").flatten().tolist()
    values = tensors.pop(f"{name}.compressed").flatten()
    mask = unpack_bitmasks(tensors.pop(f"{name}.bitmask"), shape)
    tensors.pop(f"{name}.row_offsets", None)
    dense = torch.zeros(shape, dtype=values.dtype)
    dense[mask] = values
    return dense


def _validated(qc: dict, path: Path):
    """compressed-tensors' ``QuantizationConfig`` of ``qc`` (``None`` without config groups); one-line errors."""
    import pydantic
    from compressed_tensors.quantization import QuantizationConfig

    from gptopt_core import GptoptError

    from .config_check import validation_message

    try:
        return QuantizationConfig.model_validate(qc) if qc.get("config_groups") else None
    except pydantic.ValidationError as exc:  # "2 validation errors for ...": the first one, located
        raise GptoptError(f"--model {str(path)[:160]}: quantization_config.{validation_message(exc)}") from None
    except NotImplementedError as exc:  # compressed-tensors' own limits: "Only num_bits in (8) are supported"
        raise GptoptError(f"--model {str(path)[:160]}: quantization_config.config_groups asks for what "
                          f"compressed-tensors does not implement ({str(exc)[:120]})") from None
    except (TypeError, ValueError) as exc:  # a validator comparing a wrong-typed value ('<' between str and int)
        raise GptoptError(f"--model {str(path)[:160]}: quantization_config.config_groups holds a value of the wrong "
                          f"type ({type(exc).__name__}: {str(exc)[:120]}); compare it with a config gptopt "
                          "save wrote") from None


def load(path, trust_remote_code: bool = False):
    """``(model, tokenizer, info)`` from a compressed-tensors directory; ``info`` has ``grids`` (number of layers
    on a grid), ``sparse`` (layers read from a bitmask) and the ``quantization_config`` dict."""
    import torch
    from safetensors.torch import load_file

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .config_check import check_quantization_config

    path = Path(path)
    qc = read_config(path)["quantization_config"]
    check_quantization_config(qc, f"--model {str(path)[:160]}")
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    tensors: dict = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    qconfig = _validated(qc, path)
    from .moe import fuse_experts

    experts = fuse_experts(model, tensors, qconfig, _grid_from)
    modules = dict(model.named_modules())
    grids, sparse, inputs = {}, [], {}
    for key in [k for k in tensors if k.endswith(".weight_scale")]:
        name = key[: -len(".weight_scale")]
        module = modules.get(name)
        if module is None:
            raise ValueError(f"tensors the model has no place for: {key}")
        if qconfig is None:
            raise ValueError(f"{key} is quantized but quantization_config has no config_groups")
        if f"{name}.weight_packed" not in tensors and f"{name}.weight" not in tensors:
            tensors.pop(key)  # a head tied to the embedding: its weight (and grid) are the embedding's
            tensors.pop(f"{name}.weight_zero_point", None)
            continue
        scheme = _scheme_for(name, module, qconfig)
        grid, codes = _grid_from(tensors, name, scheme.weights)
        if scheme.input_activations is not None:
            inputs[name] = attach_input_quant(module, _input_quant(name, scheme.input_activations))
        weight = grid.dequantize(codes)
        tensors[f"{name}.weight"] = weight.t().contiguous() if is_conv1d(module) else weight
        grids[name] = grid
    for key in [k for k in tensors if k.endswith(".bitmask")]:
        name = key[: -len(".bitmask")]
        dense = _dense_from_bitmask(tensors, name).float()
        tensors[f"{name}.weight"] = dense.t().contiguous() if is_conv1d(modules[name]) else dense
        sparse.append(name)
    _load_strictly(model, config, tensors)
    for name, grid in grids.items():
        attach_grid(modules[name], grid)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return model, tokenizer, {"grids": len(grids), "sparse": len(sparse), "input_quantized": len(inputs),
                              "experts": experts, "quantization_config": qc}


def _input_quant(name, args):
    """The :class:`gptopt_core.InputQuant` of a config group's ``input_activations`` (int, per token, symmetric,
    dynamic: what W8A8 holds); any other input scheme is refused, not run as float."""
    if (args.type, args.strategy, args.symmetric, args.dynamic) != ("int", "token", True, True) or args.num_bits != 8:
        raise ValueError(f"{name}: only dynamic symmetric per-token int8 input activations are read, not "
                         f"{args.num_bits}-bit {args.type} {args.strategy} (symmetric {args.symmetric}, dynamic "
                         f"{args.dynamic})")
    return InputQuant(bits=8, strategy="token", symmetric=True, dynamic=True)


def _load_strictly(model, config, tensors: dict) -> None:
    """Every parameter from the file (a head tied to the embedding aside), no tensor the model has no place for."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected:
        raise ValueError(f"tensors the model has no place for: {', '.join(sorted(unexpected)[:3])}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    head = model.get_output_embeddings()
    tied = {n for n, m in model.named_modules() if m is head and head.weight is model.get_input_embeddings().weight}
    left = [k for k in missing if k.rsplit(".", 1)[0] not in tied and not k.endswith(("inv_freq", "masked_bias"))]
    if left:
        raise ValueError(f"missing tensors: {', '.join(sorted(left)[:3])}")


def load_model(path, trust_remote_code: bool = False):
    """``(model, tokenizer, info)`` from a compressed-tensors directory (grids re-attached): :func:`load`."""
    return load(path, trust_remote_code=trust_remote_code)


def resolve(spec: str, options: dict):
    """A :class:`gptopt_core.LoadedModel` for a directory whose config.json says ``quant_method:
    compressed-tensors``, or ``None`` for any other spec (the plugin's ``gptopt_resolve_model``)."""
    path = Path(spec).expanduser()
    if not path.is_dir() or not is_compressed_dir(path):
        return None
    check_local_dir(path, allow_pickle=bool(options.get("allow_pickle")))
    if not any(path.glob("*.safetensors")):
        raise SourceError(f"{spec}: a compressed-tensors model is read from *.safetensors files only; pickle "
                          "weights are not read (with or without --allow-pickle)")
    try:
        model, tokenizer, info = load_model(path, trust_remote_code=bool(options.get("trust_remote_code")))
    except GptoptError:
        raise
    except Exception as exc:  # safetensors / compressed_tensors / transformers raise many types for bad files
        first = error_text(exc)
        raise SourceError(f"cannot load the compressed-tensors model in {spec}: {first}") from None
    facts = ({"quantized:grid"} if info["grids"] else set()) | ({"quantized:w8a8"} if info["input_quantized"] else set())
    return LoadedModel(model, tokenizer, "compressed-tensors", facts)
