"""The figures behind tests/test_attention_numerics.py's tolerances: for every family that exports to GGUF (and
Llama with Llama 3.1's rope scaling), llama.cpp's f32 logits against torch's on the test's peaked-attention tiny
models, then each planted fault. Correctness figures, not timings.

    python benchmarks/attention_numerics.py

Prints one markdown row per case: attention entropy (fraction of uniform), max |logit|, max |logit difference|,
max per-position KL (nats), top-1 agreement; a fault row is the same check with the fault patched into the
exporter.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import test_attention_numerics as T  # noqa: E402  (the test's own models, exporter patches and comparison)


def row(label, entropy, want, found, ok):
    print(f"| {label} | {entropy:.3f} | {np.abs(want).max():.1f} | {found['max_diff']:.2g} | {found['max_kl']:.2g} | "
          f"{found['top1']:.3f} | {'within' if ok else 'outside'} |", flush=True)


def main() -> int:
    from gptopt_core import architecture_table
    from gptopt_export import gguf_writer

    work = Path(tempfile.mkdtemp(prefix="attention-numerics-"))
    print("| case | entropy | max logit | max diff | max KL | top-1 | tolerance |\n|---|---|---|---|---|---|---|")
    cases = [(a, None) for a in T.FAMILIES] + [(architecture_table()["llama"], T.LLAMA3)]
    for arch, rope in cases:
        model, ids, want, entropy = T.peaked_model(arch, rope)
        found = T.differences(want, T.llamacpp_logits(model, work / "m.gguf", ids))
        row(arch.model_type + (" llama3 rope" if rope else ""), entropy, want, found,
            T.within_tolerance(found, model.config))
    for case in T._fault_cases():
        arch, fault = case.values
        model, ids, want, entropy = T.peaked_model(arch)
        target, wrap = T.FAULTS[fault][1]
        owner = gguf_writer.tensors if target.startswith("tensors.") else gguf_writer
        attribute = target.rsplit(".", 1)[-1]
        with mock.patch.object(owner, attribute, wrap(getattr(owner, attribute))):
            found = T.differences(want, T.llamacpp_logits(model, work / "f.gguf", ids))
        row(f"fault: {case.id}", entropy, want, found, T.within_tolerance(found, model.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
