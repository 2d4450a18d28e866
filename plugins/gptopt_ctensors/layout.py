"""What a model holds, in compressed-tensors' terms: config groups (one per integer-grid scheme and layer kind), the
ignore list, the sparsity config; validated by compressed-tensors' own pydantic models.

Conventions (compressed-tensors 0.20.1; see docs/save-formats.md for why each layout is the one it is):

* codes are signed, ``q in [-2**(b-1), 2**(b-1) - 1]``; ``w = (q - zero_point) * scale`` with a signed
  ``zero_point`` (absent when symmetric). gptopt's asymmetric grids keep unsigned codes ``u`` and zero ``z`` in
  ``[0, 2**b - 1]``: ``q = u - 2**(b-1)``, ``zero_point = z - 2**(b-1)`` gives the same ``(q - zero_point) * scale``;
* ``nn.Linear`` layers (kind ``pack``): ``pack-quantized`` with ``group`` / ``channel`` strategy, codes packed
  ``32 / b`` per int32 along the input dimension, zero points packed along the output dimension, as llm-compressor
  writes W4A16 / W8A16 (what vLLM serves);
* token embedding and an 8-bit output head (kind ``naive``): ``naive-quantized``, the codes as an int8 ``weight``
  (same bytes as packed int8; transformers' weight initialisation needs an ``nn.Embedding`` to keep a ``weight``). A head tied
  to the embedding is a target of the same group with its own ``weight_scale``: the int8 weight is written once;
* GPT-2 ``Conv1D`` layers (kind ``block``): in their own ``(in, out)`` orientation, ``pack-quantized`` with the
  ``block`` strategy, blocks ``[group, 1]`` (``[rows, 1]`` per channel), zero points unpacked int8 (compressed-tensors
  packs zero points only for ``group`` / ``channel``), so that a decompressed weight is the ``Conv1D`` weight itself;
* W8A8 ``nn.Linear`` layers (kind ``int``: int8 per-channel symmetric weights whose inputs are quantized,
  :mod:`gptopt_core.kit.activations`): ``int-quantized``, the codes as an int8 ``weight``, fp16 ``weight_scale``
  ``(out, 1)``, and ``input_activations`` int8 / token / symmetric / dynamic (no tensor: the scales are computed at
  run time), as llm-compressor writes its W8A8 preset and vLLM's ``CompressedTensorsW8A8Int8`` reads it.
"""
from __future__ import annotations

from gptopt_core.kit.activations import input_quant_of
from gptopt_core.kit.layertypes import is_conv1d
from gptopt_core.kit.modules import weight_matrix

FORMAT = "pack-quantized"
NAIVE = "naive-quantized"
INT = "int-quantized"
FORMATS = {"pack": FORMAT, "naive": NAIVE, "block": FORMAT, "int": INT}


def kind_of(model, module, grid=None) -> str:
    """``"naive"`` (token embedding, or an 8-bit output head: one group with the embedding), ``"block"`` (GPT-2
    Conv1D), ``"int"`` (a W8A8 nn.Linear: its inputs quantized too) or ``"pack"`` (nn.Linear)."""
    import torch.nn as nn


    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(module, nn.Embedding) or (module is head and grid is not None and grid.bits == 8):
        return "naive"
    if is_conv1d(module):
        return "block"
    return "int" if input_quant_of(module) is not None else "pack"


def scheme_key(grid, kind: str = "pack") -> tuple:
    return (kind, grid.bits, grid.group_size, grid.symmetric)


def weight_args(grid, kind: str = "pack", rows: int | None = None) -> dict:
    """The ``weights`` entry of a config group for ``grid`` (compressed-tensors ``QuantizationArgs`` fields);
    ``rows``: for ``block`` per-channel grids, the largest input width of the group's layers (one block per column)."""
    args = {"num_bits": grid.bits, "type": "int", "symmetric": bool(grid.symmetric), "dynamic": False}
    if kind == "block":
        args.update(strategy="block", block_structure=[grid.group_size or int(rows), 1])
    else:
        args["strategy"] = "group" if grid.group_size else "channel"
        if grid.group_size:
            args["group_size"] = grid.group_size
    return args


def targets_for(model, names: set) -> tuple[list, list]:
    """``(targets, ignore)`` naming exactly the modules ``names``: ``["Linear"]`` minus an ignore list when they
    are all ``nn.Linear`` and cover most of them (llm-compressor's layout, e.g. ``ignore: ["lm_head"]``),
    else the module names themselves."""
    import torch.nn as nn

    linears = {n for n, m in model.named_modules() if type(m) is nn.Linear}
    if names and names <= linears:
        ignore = sorted(linears - names)
        if len(ignore) < len(names):
            return ["Linear"], ignore
    return sorted(names), []


def tied_head(model):
    """``(head name, embedding name)`` when the output head shares the token embedding's weight, else ``None``."""
    if not (hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings")):
        return None
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or emb is None or head.weight is not emb.weight:
        return None
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return names[id(head)], names[id(emb)]


def quantization_config(model, grid_layers):
    """compressed-tensors ``QuantizationConfig`` for ``[(name, module, grid)]`` (``None`` when empty): one config
    group per (kind, scheme), see the module docstring."""
    import torch.nn as nn
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus

    if not grid_layers:
        return None
    modules = dict(model.named_modules())
    by_scheme: dict = {}
    for name, module, grid in grid_layers:
        by_scheme.setdefault(scheme_key(grid, kind_of(model, module, grid)), []).append((name, grid))
    tied = tied_head(model)
    groups, ignore, targeted = {}, [], set()
    for i, (key, members) in enumerate(sorted(by_scheme.items(), key=lambda kv: -len(kv[1]))):
        kind, names = key[0], {n for n, _ in members}
        if tied and tied[1] in names:
            names.add(tied[0])  # the tied head: its own weight_scale, the embedding's int8 weight
        targeted |= names
        if len(by_scheme) == 1 and kind in ("pack", "int"):
            targets, ignore = targets_for(model, names)
        else:
            targets = sorted(names)
        rows = max(_in_features(modules[n]) for n in names) if kind == "block" else None
        act = input_quant_of(modules[members[0][0]]) if kind == "int" else None
        groups[f"group_{i}"] = {"targets": targets, "weights": weight_args(members[0][1], kind, rows),
                                "input_activations": act.args() if act is not None else None, "output_activations": None, "format": FORMATS[kind]}
    if len(by_scheme) > 1 or targeted - {n for n, m in modules.items() if type(m) is nn.Linear}:
        # named targets: every other Linear is named in ignore, as llm-compressor does for mixed schemes
        ignore = sorted(n for n, m in modules.items() if type(m) is nn.Linear and n not in targeted)
    formats = {g["format"] for g in groups.values()}
    return QuantizationConfig.model_validate({
        "config_groups": groups, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": QuantizationStatus.COMPRESSED, "ignore": sorted(set(ignore)), "kv_cache_scheme": None})


def _in_features(module) -> int:

    return int(weight_matrix(module).shape[1])


def plain_transformers(qconfig, sparse_layers: int) -> dict:
    """How plain ``AutoModelForCausalLM.from_pretrained`` (transformers 5.24, compressed-tensors 0.20.1) reads this
    layout: ``{"dequantize": bool, "unread": [what it cannot read, ...]}``.

    Its default route (``CompressedTensorsHfQuantizer._process_model_before_weight_loading``) builds the compressed
    modules on the meta device and loads the checkpoint into them: it reads symmetric ``group`` / ``channel``
    ``pack-quantized`` Linear layers and ``naive-quantized`` ones, but builds an asymmetric zero point unpacked
    (``PackedQuantizationCompressor.compress`` on meta) where the checkpoint holds it packed, and quantizes only
    ``nn.Linear`` / ``nn.Embedding`` (``apply_quantization_config``), so Conv1D targets stay uninitialised. Its
    ``dequantize`` route (``CompressedTensorsDequantize``) decompresses every checkpoint layer into the dense model
    with compressed-tensors' own decompressors, which handle both - but with one scheme for every layer
    (``get_dense_scheme``: the first config group), so it is used only for a single config group.
    """
    unread = []
    if sparse_layers:
        unread.append(f"bitmask sparsity ({sparse_layers} sparse layers would load randomly initialised)")
    dequantize = False
    if qconfig is not None:
        groups = list(qconfig.config_groups.values())
        hard = [g for g in groups if g.weights.strategy == "block" or
                (g.format == FORMAT and not g.weights.symmetric)]
        if hard and len(groups) == 1:
            dequantize = True
        elif hard:
            what = sorted({"GPT-2 Conv1D grids" if g.weights.strategy == "block" else "asymmetric packed zero points"
                           for g in hard})
            unread.append(f"{' and '.join(what)} beside another scheme (one config group is read at load only "
                          "de-quantized, and it decompresses every layer with the first group's scheme)")
    return {"dequantize": dequantize, "unread": unread}


def sparsity_config(model, sparse: dict):
    """compressed-tensors ``SparsityCompressionConfig`` for ``{name: mask (out, in)}`` written as bitmasks:
    ``sparse-24-bitmask`` when every mask is 2:4 along the input dimension, else ``sparse-bitmask``."""
    from compressed_tensors.config import SparsityCompressionConfig

    if not sparse:
        return None
    two_four = all(is_two_four(mask) for mask in sparse.values())
    kept = sum(int(m.sum()) for m in sparse.values())
    total = sum(m.numel() for m in sparse.values())
    targets, ignore = targets_for(model, set(sparse))
    fmt = "sparse-24-bitmask" if two_four else "sparse-bitmask"
    return SparsityCompressionConfig.load_from_registry(
        fmt, targets=targets, ignore=ignore, global_sparsity=round(1 - kept / total, 6),
        sparsity_structure="2:4" if two_four else "unstructured")


def is_two_four(mask) -> bool:
    """Exactly 2 kept of every 4 consecutive inputs (``mask``: bool ``(out, in)``)."""
    if mask.shape[-1] % 4:
        return False
    return bool((mask.reshape(-1, 4).sum(dim=1) == 2).all())


def config_dict(qconfig, sconfig, dequantize: bool = False) -> dict:
    """The ``quantization_config`` entry of config.json, laid out as compressed-tensors' ``ModelCompressor``
    writes it (``version``, ``quant_method``, ``sparsity_config``, ``transform_config``, then the quantization
    config's own fields); ``dequantize: true`` (transformers' ``CompressedTensorsConfig`` loading attribute) where
    plain ``from_pretrained`` reads the layout only de-quantized (see :func:`plain_transformers`)."""
    import compressed_tensors

    out = {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
           "sparsity_config": sconfig.model_dump() if sconfig is not None else {}, "transform_config": {}}
    if qconfig is not None:
        out.update(qconfig.model_dump(exclude=["quant_method"]))
    if dequantize:
        out["dequantize"] = True
    return out
