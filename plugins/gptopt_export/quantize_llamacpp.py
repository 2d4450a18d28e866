"""llama.cpp's own quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) through llama-cpp-python,
with or without an importance matrix: the peers gptopt's files are measured against.

llama.cpp's library takes the importance matrix as an array of ``{name, data, size}`` (``llama_model_imatrix_data``,
ended by a null name); its ``llama-quantize`` tool fills it from the imatrix file with ``common_imatrix_load``,
dividing the GGUF format's ``in_sum2`` by ``counts`` (legacy: the values by ``ncall``). The Python package has no
file reader, so :func:`gptopt_export.imatrix.read` does that normalization and this module hands the result to
the library exactly as the tool does.
"""
from __future__ import annotations

from pathlib import Path

#: ``--type`` name -> llama.cpp ``LLAMA_FTYPE_MOSTLY_*`` (the mixes are llama.cpp's own per-tensor rules)
FTYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10, "q3_k_s": 11, "q3_k_m": 12,
          "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18, "iq4_nl": 25,
          "iq4_xs": 30}


def quantize(src, dst, ftype: str, imatrix=None, nthread: int = 0) -> dict:
    """Quantize the GGUF ``src`` (f32/f16) into ``dst`` with llama.cpp's rules for ``ftype``; ``imatrix``: a file
    :func:`gptopt_export.imatrix.read` reads (GGUF or legacy ``.dat``) or ``{name: mean x^2}``. Returns
    ``{"bytes", "imatrix_entries", "seconds"}``; raises ``RuntimeError`` when llama.cpp reports a failure."""
    import ctypes
    import time

    import llama_cpp
    import numpy as np

    if ftype not in FTYPES:
        raise ValueError(f"llama.cpp ftype '{ftype}' unknown here; use one of {', '.join(FTYPES)}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = int(nthread)
    keep = []  # the arrays must outlive the call
    entries = 0
    if imatrix is not None:
        if not isinstance(imatrix, dict):
            from .imatrix import read

            imatrix = read(imatrix)
        table = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            raw = name.encode()
            keep += [arr, raw]
            table[i].name = raw
            table[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            table[i].size = arr.size
        table[len(imatrix)].name = None
        keep.append(table)
        params.imatrix = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        entries = len(imatrix)
    started = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with {rc}")
    del keep
    return {"bytes": Path(dst).stat().st_size, "imatrix_entries": entries,
            "seconds": round(time.perf_counter() - started, 3)}


def tensor_types(path) -> dict:
    """``{GGML type name: count}`` of the tensors a GGUF file holds (what llama.cpp really wrote)."""
    from collections import Counter

    import gguf

    return dict(sorted(Counter(t.tensor_type.name.lower() for t in gguf.GGUFReader(str(path)).tensors).items()))


def weight_bits(path) -> float:
    """Bits per weight over the file's 2-D tensors (their bytes * 8 / their elements)."""
    import gguf

    nbytes = elems = 0
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) >= 2 and int(t.shape[1]) > 1:
            nbytes += int(t.n_bytes)
            elems += int(t.n_elements)
    return 8 * nbytes / max(elems, 1)
