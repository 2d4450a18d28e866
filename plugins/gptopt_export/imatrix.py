"""Importance matrices for llama.cpp's quantizer (``llama-quantize --imatrix FILE``) from gptopt's calibration.

llama.cpp weights each input column of a weight matrix by the mean squared activation it saw (its ``imatrix``
tool runs the model over text and sums ``x^2`` per column of every ``blk.*`` matmul input). gptopt's layer-by-layer
calibration engine (``gptopt_core.run_blockwise``, statistic ``sq_norms``) collects exactly that sum, so the export
step writes it under llama.cpp's tensor names, on the model as the chain left it, from the train split (never the
held-out text). Two file formats, as llama.cpp's ``tools/imatrix/imatrix.cpp`` writes them and its
``common/imatrix-loader.cpp`` reads them:

* GGUF (any name but ``*.dat``; llama.cpp's current format): ``general.type = imatrix``, ``imatrix.datasets``
  (strings), ``imatrix.chunk_count`` / ``imatrix.chunk_size`` (u32), and per weight ``NAME.in_sum2`` (f32, the raw
  sums of ``x^2``, ``(n_mat, n_cols)``) and ``NAME.counts`` (f32, tokens summed, ``(n_mat, 1)``); the quantizer
  divides one by the other.
* legacy ``*.dat``: int32 entry count; per entry int32 name length, name, int32 ``ncall``, int32 ``nval``, then
  ``nval`` floats ``mean(x^2) * ncall`` (``ncall`` = chunks seen); then int32 chunk count, int32 length + dataset.

Layers outside the transformer blocks (an untied output head) are not in the file: llama.cpp's ``imatrix`` tool
leaves ``output.weight`` out by default too.
"""
from __future__ import annotations

import struct
from pathlib import Path


def collect(ctx, n_blocks: int, seq_len: int) -> dict:
    """``{module: (sum of x^2 per input column, float64 numpy; tokens)}`` for every weight layer inside the
    transformer blocks, from ``n_blocks`` train blocks of ``seq_len`` tokens through the model as it stands."""
    from gptopt_core.kit.calibration import calibration_batches, run_blockwise

    sums = {}

    def keep(block, stats):
        for st in stats.values():
            sums[st.module] = (st.sq_norms.detach().double().cpu().numpy(), int(st.samples))

    batches = calibration_batches(ctx, n_blocks, seq_len)
    report = run_blockwise(ctx.model, batches, keep, stats=("sq_norms",), sequential=False)
    return {"sums": sums, "tokens": report["calib_tokens"], "seconds": report["seconds"]}


def named(sums: dict, srcs) -> dict:
    """``{GGUF tensor name: (sums, tokens)}`` for the export's tensors (``tensors.Source`` list) that have them."""
    out = {}
    for src in srcs:
        if src.module is not None and src.module in sums and src.role == "weight":
            out[src.name] = sums[src.module]
    return out


def write(path, entries: dict, chunk_count: int, chunk_size: int, dataset: str) -> int:
    """Write ``entries`` (``{name: (sums, tokens)}``) to ``path``: legacy format for ``*.dat``, GGUF otherwise.
    Returns the bytes written."""
    path = Path(path)
    if path.suffix == ".dat":
        _write_legacy(path, entries, chunk_count, chunk_size, dataset)
    else:
        _write_gguf(path, entries, chunk_count, chunk_size, dataset)
    return path.stat().st_size


def _write_gguf(path, entries, chunk_count, chunk_size, dataset):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_string("general.type", "imatrix")
    writer.add_array("imatrix.datasets", [dataset])
    writer.add_uint32("imatrix.chunk_count", int(chunk_count))
    writer.add_uint32("imatrix.chunk_size", int(chunk_size))
    for name, (sums, tokens) in sorted(entries.items()):
        writer.add_tensor(f"{name}.in_sum2", np.asarray(sums, dtype=np.float32).reshape(1, -1))
        writer.add_tensor(f"{name}.counts", np.array([[float(tokens)]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _write_legacy(path, entries, chunk_count, chunk_size, dataset):
    import numpy as np

    with open(path, "wb") as out:
        out.write(struct.pack("<i", len(entries)))
        for name, (sums, tokens) in sorted(entries.items()):
            ncall = max(1, -(-int(tokens) // max(int(chunk_size), 1)))  # ceiling, as imatrix.cpp
            raw = name.encode()
            out.write(struct.pack("<i", len(raw)) + raw + struct.pack("<ii", ncall, len(sums)))
            mean = np.asarray(sums, dtype=np.float64) / max(int(tokens), 1)
            out.write((mean * ncall).astype("<f4").tobytes())
        data = dataset.encode()
        out.write(struct.pack("<i", int(chunk_count)) + struct.pack("<i", len(data)) + data)


def read(path) -> dict:
    """``{name: mean x^2 per column (float32 numpy)}`` from either format, normalized as llama.cpp's quantizer
    does (GGUF: ``in_sum2 / counts``; legacy: ``values / ncall``), every file-only check of
    :func:`.imatrix_files.load` passed."""
    from .imatrix_files import load

    return load(path)


def write_for_export(ctx, params, plan) -> tuple[dict, dict]:
    """``export --imatrix FILE``: calibrate (train split), write the importance matrix under llama.cpp's tensor
    names (``plan``'s); ``(metrics, {name: mean x^2 per column})``."""
    from gptopt_core import GptoptError

    path = Path(params.imatrix).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    got = collect(ctx, params.imatrix_blocks, params.imatrix_seq_len)
    entries = named(got["sums"], plan.sources)
    if not entries:
        raise GptoptError("export --imatrix: no weight of the transformer blocks was calibrated")
    size = write(path, entries, params.imatrix_blocks, params.imatrix_seq_len,
                 f"{ctx.data_spec or 'data'} (train split)")
    ctx.log(f"  wrote {path}: importance matrix of {len(entries)} weights, {got['tokens']} calibration tokens")
    means = {name: (sums / max(tokens, 1)).astype("float32") for name, (sums, tokens) in entries.items()}
    return {"imatrix_path": str(path), "imatrix_bytes": size, "imatrix_entries": len(entries),
            "imatrix_tokens": got["tokens"], "imatrix_seconds": got["seconds"]}, means
