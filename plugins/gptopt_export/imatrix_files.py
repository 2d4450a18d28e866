"""Reading an importance matrix someone else wrote (``export --imatrix-in FILE``), as hostile input.

Both formats llama.cpp reads (``tools/quantize/quantize.cpp``: ``load_imatrix`` for GGUF, ``load_legacy_imatrix``
for the older binary layout; see :mod:`.imatrix` for the layouts) are checked in full before any value is used:

* every count and size the file declares against the bytes it has, before any loop runs over them (a 20-byte
  legacy file claiming 2**31 entries is refused at once instead of looping for an hour);
* values finite, non-negative and at most :data:`MAX_VALUE` (a mean squared activation; larger ones overflow the
  quantizer's float32 sums into NaN block scales), counts (GGUF ``NAME.counts``, legacy ``ncall``) positive;
* GGUF: only ``NAME.in_sum2`` / ``NAME.counts`` pairs of f32 tensors, shapes ``(n_mat, n_cols)`` / ``(n_mat, 1)``,
  llama.cpp's metadata keys present; a model GGUF given as an importance matrix is named as one;
* legacy: names UTF-8 and unique, what follows the last entry exactly a chunk count and a dataset name.

:func:`load` does the file-only checks (``export`` calls it while the chain is validated, before the model loads);
:func:`match_model` matches every entry's name and width to the model's tensors (right after the load).
Every problem is one :class:`gptopt_core.GptoptError` line, names escaped.
"""
from __future__ import annotations

import os
import struct

from gptopt_core import GptoptError, safe_text

#: largest mean squared activation accepted (float32 sums of ``importance * x^2`` over a block stay finite below it)
MAX_VALUE = 1e30
#: the largest importance matrix read (a 70B model's is tens of MiB; a mixture of experts' a few hundred)
MAX_BYTES = 2 * 2**30
#: smallest legacy entry: name length, a one-byte name, ncall, nval (a value would add 4 more)
_MIN_LEGACY_ENTRY = 13
_SUMS, _COUNTS = ".in_sum2", ".counts"
_META = ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size")


def _name(name: str) -> str:
    return safe_text(name, 80)


def load(path, where: str | None = None) -> dict:
    """``{tensor name: mean x^2 per input column}`` (float32, ``n_mat * n_cols`` values) from a ``.dat`` (legacy)
    or any other name (GGUF) importance matrix, every file-only check passed (see the module docstring)."""
    from gptopt_core.kit.inputs import check_input_file

    shown = safe_text(os.fspath(path), 160)
    where = where or f"importance matrix {shown}"
    check_input_file(path, where)
    if os.fspath(path).endswith(".dat"):
        from gptopt_core.kit.inputs import read_input_file

        return _legacy(read_input_file(path, where, MAX_BYTES), where)
    return _gguf(path, where)


def check_values(values, name: str, where: str, what: str = "values") -> None:
    """Finite, non-negative and at most :data:`MAX_VALUE`, or one line naming the entry and the first bad column."""
    import numpy as np

    for bad, why in ((~np.isfinite(values), "NaN or infinite"), (values < 0, "negative"),
                     (values > MAX_VALUE, f"larger than {MAX_VALUE:g}")):
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise GptoptError(f"{where}: entry '{_name(name)}' has {int(bad.sum())} {why} {what} (first at "
                              f"column {first}: {float(values.reshape(-1)[first])!r}); mean squared activations "
                              "are finite and non-negative")


def _legacy(raw: bytes, where: str) -> dict:
    import numpy as np

    size = len(raw)

    def ints(pos, n, what):
        if pos + 4 * n > size:
            raise GptoptError(f"{where} ends at byte {size} inside {what}; the file is truncated or not a legacy "
                              "importance matrix")
        return struct.unpack_from(f"<{n}i", raw, pos)

    (n_entries,) = ints(0, 1, "the entry count")
    most = (size - 4) // _MIN_LEGACY_ENTRY
    if n_entries < 1 or n_entries > most:
        raise GptoptError(f"{where} claims {n_entries} entries but its {size} bytes hold at most {most}; it is "
                          "truncated or not a legacy importance matrix")
    out, pos = {}, 4
    for i in range(1, n_entries + 1):
        (length,) = ints(pos, 1, f"entry {i}'s name length")
        pos += 4
        if not 1 <= length <= size - pos:
            raise GptoptError(f"{where}: entry {i} claims a name of {length} bytes but {size - pos} bytes are left")
        try:
            name = raw[pos:pos + length].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GptoptError(f"{where}: entry {i}'s name is not UTF-8 (byte {exc.start}); a tensor name is "
                              "ASCII") from None
        pos += length
        ncall, nval = ints(pos, 2, f"entry {i}'s counts")
        pos += 8
        if not 1 <= nval <= (size - pos) // 4:
            raise GptoptError(f"{where}: entry '{_name(name)}' claims {nval} values but {size - pos} bytes are left")
        if ncall < 1:
            raise GptoptError(f"{where}: entry '{_name(name)}' was summed over {ncall} chunks (ncall); counts must "
                              "be positive")
        if name in out:
            raise GptoptError(f"{where}: entry '{_name(name)}' appears twice")
        values = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float64) / ncall
        pos += 4 * nval
        check_values(values, name, where)
        out[name] = values.astype(np.float32)
    rest = size - pos
    if rest and (rest < 8 or struct.unpack_from("<i", raw, pos + 4)[0] != rest - 8):
        raise GptoptError(f"{where} has {rest} bytes after its last entry that are not a chunk count and a dataset "
                          "name; it is damaged or not a legacy importance matrix")
    return out


def _reader(path, where):
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))  # a FIFO swapped in: no wait
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GptoptError(f"{where} is not a regular file")
        magic = os.read(fd, 4)
    finally:
        os.close(fd)
    if magic != b"GGUF":
        raise GptoptError(f"{where} is not a GGUF file (bad magic); a legacy importance matrix is read from a name "
                          "ending in .dat")
    try:
        import gguf

        return gguf.GGUFReader(os.fspath(path))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # gguf-py raises assorted errors (and numpy's) on damaged files
        raise GptoptError(f"{where}: cannot read the GGUF file ({type(exc).__name__}: "
                          f"{safe_text(exc, 160)})") from None


def _gguf(path, where: str) -> dict:
    import gguf
    import numpy as np

    reader = _reader(path, where)
    sums = {t.name[:-len(_SUMS)]: t for t in reader.tensors if t.name.endswith(_SUMS)}
    counts = {t.name[:-len(_COUNTS)]: t for t in reader.tensors if t.name.endswith(_COUNTS)}
    if not sums:
        arch = reader.fields.get("general.architecture")
        what = (f"it is a model file (architecture '{_name(arch.contents())}'), not an importance matrix" if arch
                else "no NAME.in_sum2 tensors")
        raise GptoptError(f"{where} holds no importance matrix: {what}")
    other = [t.name for t in reader.tensors if not t.name.endswith((_SUMS, _COUNTS))]
    if other:
        raise GptoptError(f"{where} holds {len(other)} tensor(s) that are not NAME.in_sum2 / NAME.counts (first: "
                          f"'{_name(other[0])}')")
    kind = reader.fields.get("general.type")
    if kind is not None and kind.contents() != "imatrix":
        raise GptoptError(f"{where}: general.type is '{_name(kind.contents())}', not 'imatrix'")
    lacking = [k for k in _META if k not in reader.fields]
    if lacking:
        raise GptoptError(f"{where} lacks {', '.join(lacking)} (llama.cpp's quantizer refuses such a file)")
    out = {}
    for name in sorted(set(sums) | set(counts)):
        if name not in sums or name not in counts:
            have, lack = (_SUMS, _COUNTS) if name in sums else (_COUNTS, _SUMS)
            raise GptoptError(f"{where}: '{_name(name)}{have}' has no '{lack}' partner")
        s, c = sums[name], counts[name]
        f32 = gguf.GGMLQuantizationType.F32
        if s.tensor_type != f32 or c.tensor_type != f32:
            raise GptoptError(f"{where}: '{_name(name)}' is stored as {s.tensor_type.name} / {c.tensor_type.name}, "
                              "not f32")
        dims = [int(d) for d in s.shape]  # ggml order: (n_cols, n_mat)
        n_cols, n_mat = dims[0], (dims[1] if len(dims) > 1 else 1)
        if len(dims) > 2 or int(s.n_elements) != n_cols * n_mat or int(c.n_elements) != n_mat:
            raise GptoptError(f"{where}: '{_name(name)}' has sums of shape {dims[::-1]} and {int(c.n_elements)} "
                              f"count(s); give one count per matrix ({n_mat})")
        cnt = np.asarray(c.data, dtype=np.float64).reshape(n_mat, 1)
        if not (np.isfinite(cnt).all() and (cnt > 0).all()):
            shown = safe_text(cnt.reshape(-1)[:4].tolist(), 60)
            raise GptoptError(f"{where}: entry '{_name(name)}' has count(s) {shown}; counts (tokens summed) must be "
                              "positive")
        raw = np.asarray(s.data, dtype=np.float64).reshape(n_mat, n_cols)
        check_values(raw, name, where, "sums")
        values = (raw / cnt).reshape(-1)
        check_values(values, name, where)
        out[name] = values.astype(np.float32)
    return out


def match_model(entries: dict, srcs, where: str) -> dict:
    """Every entry names a tensor of the model (``tensors.Source`` list) and has its input width; returns
    ``{"used": n, "unused": [names of tensors no quantizer weights: not a 2-D weight], "missing": [block weights
    without an entry]}``. Another model's file (names or widths) is one line."""
    by_name = {s.name: s for s in srcs}
    foreign = [n for n in entries if n not in by_name]
    if foreign:
        raise GptoptError(f"{where}: {len(foreign)} of {len(entries)} entries name no tensor of this model (first: "
                          f"'{_name(foreign[0])}'); is it another model's importance matrix?")
    for name, values in entries.items():
        width = int(by_name[name].values.shape[-1])
        if values.size != width:
            raise GptoptError(f"{where}: entry '{_name(name)}' has {values.size} values but {name} has {width} input "
                              "columns; is it another model's importance matrix?")
    unused = sorted(n for n in entries if by_name[n].values.dim() < 2)
    missing = sorted(s.name for s in srcs if s.role == "weight" and s.values.dim() >= 2 and s.name not in entries)
    return {"used": len(entries) - len(unused), "unused": unused, "missing": missing}
