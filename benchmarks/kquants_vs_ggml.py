"""gptopt's K-quant encoders (``export --type q2_k|q3_k|q4_k``) against ggml's own quantizer on real weights.

SmolLM2-135M's 30 ``ffn_down`` weights (576 x 1536: the only ones whose rows are whole 256-weight super-blocks;
the others fall back to iq4_nl / q5_0 as in llama.cpp): the share of block bytes equal to ``ggml_quantize_chunk``'s
(llama.cpp's library, no importance matrix), the relative rms error of both after gguf-py's de-quantization, and
the encoder's CPU seconds.

    python benchmarks/kquants_vs_ggml.py
"""
import ctypes
import os
import time

import numpy as np


def ggml_lib():
    """llama.cpp's ggml library as llama-cpp-python ships it, with ``ggml_quantize_chunk`` declared."""
    import llama_cpp

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def main():
    import gguf
    import llama_cpp
    from safetensors.numpy import load_file

    from gptopt_core.kit.models import smollm2_dir
    from gptopt_export.ggml_types import get

    weights = load_file(str(smollm2_dir() / "model.safetensors"))
    mats = [np.ascontiguousarray(weights[k].astype(np.float32)) for k in sorted(weights)
            if k.endswith("mlp.down_proj.weight")]
    lib = ggml_lib()
    print(f"{len(mats)} x {mats[0].shape}, llama-cpp-python {llama_cpp.__version__}, numpy {np.__version__}")
    for name in ("q2_k", "q3_k", "q4_k"):
        t = get(name)
        equal = total = 0
        err_ours = err_ggml = norm = cpu = 0.0
        for x in mats:
            started = time.process_time()
            ours = t.quantize(x)
            cpu += time.process_time() - started
            ref = np.zeros_like(ours)
            lib.ggml_quantize_chunk(t.ggml_id, x.ctypes.data, ref.ctypes.data, 0, x.shape[0], x.shape[1], None)
            equal, total = equal + int((ours == ref).sum()), total + ours.size
            a, b = (gguf.quants.dequantize(v, t.qtype()).reshape(x.shape) for v in (ours, ref))
            err_ours += float(((a - x) ** 2).sum())
            err_ggml += float(((b - x) ** 2).sum())
            norm += float((x ** 2).sum())
        print(f"{name}: bytes equal to ggml {equal / total:.4%}, relative rms error gptopt {np.sqrt(err_ours / norm):.5f}"
              f" ggml {np.sqrt(err_ggml / norm):.5f}, encoder {cpu:.2f} CPU s for {sum(m.size for m in mats) / 1e6:.1f}"
              " M weights")


if __name__ == "__main__":
    main()
