"""Text data: documents from a source, a deterministic train/validation split by document, token blocks."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError, shorten
from .models import cache_dir

VALID_EVERY = 10  # every 10th document (by position) is held out for validation


#: local file kinds read by the core itself (no `datasets` cache is written for them); suffixes compare lower-case
LOCAL_KINDS = (".txt", ".jsonl", ".json", ".csv", ".parquet")


#: the largest local data file read (a corpus to calibrate or fine-tune on; far beyond what a run tokenizes)
MAX_DATA_BYTES = 16 * 2**30


def load_documents(spec: str) -> list[str]:
    """Documents (strings) of a data spec: ``builtin:pydoc``, a local .txt/.jsonl/.json/.csv/.parquet (any case
    of the suffix), or a hub dataset id (read with `datasets`, cached under ``GPTOPT_CACHE``)."""
    if spec == "builtin:pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return [topics[k] for k in sorted(topics)]
    if spec == "builtin:stdlib-docs":
        return stdlib_docstrings()
    if spec.startswith("builtin:"):
        raise SourceError(f"unknown built-in data '{shorten(spec, 60)}'; the built-in corpora are builtin:pydoc and "
                          "builtin:stdlib-docs")
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in LOCAL_KINDS or path.is_file() or (path.exists() and not path.is_dir()):  # a FIFO, a device
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise SourceError(f"data file {shorten(spec, 200)} {what}")
        reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}.get(suffix)
        if reader is None:
            return [d.strip() for d in _read_utf8(path, spec).split("\n\n\n") if d.strip()]
        return _text_column(reader(path, spec), spec)
    if spec.count("/") == 1 and not path.exists():
        return _hub_documents(spec)
    raise SourceError(f"data '{shorten(spec, 200)}' not found: give builtin:pydoc, a .txt/.jsonl/.csv/.parquet file "
                      "or a hub dataset id")


#: stdlib folders left out of ``builtin:stdlib-docs``: tests, GUI / tooling, vendored or generated text
STDLIB_SKIP = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "ensurepip",
                         "turtledemo", "__pycache__", "pydoc_data", "tkinter", "unittest"})


def stdlib_docstrings() -> list[str]:
    """``builtin:stdlib-docs``: one document per module of this Python's standard library (sorted by path, tests
    and the folders of :data:`STDLIB_SKIP` left out): its module, class and function docstrings in source order,
    read with ``ast`` (nothing is imported). Python 3.11's gives ~480 documents, 1.5 M characters; the text depends
    on the Python version (the run manifest's data hash tells)."""
    import ast
    import sysconfig

    def docstrings(node, out):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
        for child in ast.iter_child_nodes(node):
            docstrings(child, out)
        return out

    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in STDLIB_SKIP or part.startswith("test") for part in parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        found = docstrings(tree, [])
        if found:
            docs.append("\n\n".join(found))
    return docs


def _read_utf8(path: Path, spec: str) -> str:
    from .inputs import read_input_file

    # non-blocking open, checked on the descriptor: a file swapped for a FIFO after the check is refused, not waited on
    data = read_input_file(path, f"data file {shorten(spec, 200)}", MAX_DATA_BYTES)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SourceError(f"data file {shorten(spec, 200)} is not UTF-8 text (line {line}, byte {exc.start}); "
                          "re-encode it as UTF-8") from None


def _jsonl_rows(path: Path, spec: str):
    import json

    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SourceError(f"data file {shorten(spec, 200)} is not UTF-8 text (line {n}, byte {exc.start} "
                                  "of the line); re-encode it as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as exc:
                raise SourceError(f"data file {shorten(spec, 200)}: line {n} is not valid JSON "
                                  f"({shorten(exc, 80)})") from None
            yield n, row


def _json_rows(path: Path, spec: str):
    import json

    text = _read_utf8(path, spec)
    try:
        doc = json.loads(text)
    except ValueError as exc:
        if "Extra data" in str(exc):  # JSON lines under a .json name
            yield from _jsonl_rows(path, spec)
            return
        raise SourceError(f"data file {shorten(spec, 200)} is not valid JSON ({shorten(exc, 80)})") from None
    except RecursionError:
        raise SourceError(f"data file {shorten(spec, 200)} is nested too deeply") from None
    if isinstance(doc, dict) and isinstance(doc.get("text"), list):
        doc = [{"text": t} for t in doc["text"]]
    if not isinstance(doc, list):
        raise SourceError(f"data file {shorten(spec, 200)}: give a list of {{\"text\": ...}} objects or JSON lines")
    yield from enumerate(doc, 1)


def _csv_rows(path: Path, spec: str):
    import csv
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    text = _read_utf8(path, spec)
    try:
        for n, row in enumerate(csv.DictReader(text.splitlines(keepends=True)), 2):
            yield n, row
    except csv.Error as exc:
        raise SourceError(f"data file {shorten(spec, 200)} is not valid CSV ({shorten(exc, 80)})") from None


def _parquet_rows(path: Path, spec: str):
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(str(path))
    except Exception as exc:  # pyarrow raises its own error types on damaged files
        raise SourceError(f"cannot read data '{shorten(spec, 200)}': {shorten(exc, 120)}") from None
    if "text" not in table.column_names:
        raise SourceError(f"data '{shorten(spec, 200)}' has no 'text' column (columns: "
                          f"{shorten(', '.join(table.column_names), 120)})")
    yield from enumerate(({"text": t} for t in table.column("text").to_pylist()), 1)


def _text_column(rows, spec: str) -> list[str]:
    """The non-empty ``text`` of every row; rows whose ``text`` is missing or not a string are an error that
    counts them (they were dropped without a word before), never skipped silently."""
    docs, bad, total, first, keys, has_text = [], 0, 0, None, None, False
    for n, row in rows:
        total += 1
        if keys is None and isinstance(row, dict):
            keys = list(row)
        has_text = has_text or (isinstance(row, dict) and "text" in row)
        text = row.get("text") if isinstance(row, dict) else None
        if isinstance(text, str):
            if text.strip():
                docs.append(text)
            continue
        bad += 1
        if first is None:
            first = (n, "no 'text' key" if not isinstance(row, dict) or "text" not in row else type(text).__name__)
    if total and not has_text:
        raise SourceError(f"data '{shorten(spec, 200)}' has no 'text' column (columns: "
                          f"{shorten(', '.join(map(str, keys or [])), 120)})")
    if bad:
        raise SourceError(f"data '{shorten(spec, 200)}': {bad} of {total} rows have no string 'text' (first: row "
                          f"{first[0]}, {first[1]}); fix or remove them")
    return docs


def _hub_documents(spec: str) -> list[str]:
    """A hub dataset through `datasets`, its download cache under ``GPTOPT_CACHE`` (not ~/.cache/huggingface)."""
    import datasets

    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(spec, split="train", cache_dir=str(cache_dir() / "datasets"))
    except Exception as exc:  # datasets raises many types on bad files / unreachable hub
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"cannot read data '{shorten(spec, 200)}': {shorten(first, 200)}") from None
    if "text" not in ds.column_names:
        raise SourceError(f"data '{spec}' has no 'text' column (columns: {shorten(', '.join(ds.column_names), 120)})")
    return _text_column(enumerate(({"text": t} for t in ds["text"]), 1), spec)


#: texts longer than this are tokenized in pieces of :data:`TOKENIZE_PIECE` characters cut at line breaks or
#: spaces: a fast tokenizer keeps ~100-200 bytes per token while it works, so one 20 MB line took 3.8 GB
TOKENIZE_WHOLE = 4_000_000
TOKENIZE_PIECE = 256_000


def tokenize_bounded(tokenizer, text: str):
    """1-D LongTensor of ``text``'s token ids, in memory bounded by the result plus one piece's working set.
    Texts up to :data:`TOKENIZE_WHOLE` characters are tokenized whole (exactly as before)."""
    import torch

    def ids_of(piece):
        ids = tokenizer(piece, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)

    if len(text) <= TOKENIZE_WHOLE:
        return ids_of(text)
    parts, start = [], 0
    while start < len(text):
        end = min(start + TOKENIZE_PIECE, len(text))
        if end < len(text):  # cut before a newline or a space so words are not split across pieces
            half = start + TOKENIZE_PIECE // 2
            cut = max(text.rfind("\n", half, end), text.rfind(" ", half, end))
            end = cut if cut > start else end
        parts.append(ids_of(text[start:end]))
        start = end
    return torch.cat(parts)


def split_documents(docs: list[str]) -> tuple[list[str], list[str]]:
    """Every 10th document is validation; with fewer than 10, each document's last 10% (at a line break)."""
    if len(docs) >= VALID_EVERY:
        valid = [d for i, d in enumerate(docs) if i % VALID_EVERY == VALID_EVERY - 1]
        train = [d for i, d in enumerate(docs) if i % VALID_EVERY != VALID_EVERY - 1]
        return train, valid
    train, valid = [], []
    for d in docs:
        cut = int(len(d) * 0.9)
        nl = d.rfind("\n", 0, cut)
        cut = nl if nl > len(d) * 0.5 else cut
        train.append(d[:cut])
        valid.append(d[cut:])
    return train, valid


@dataclass
class TextData:
    """Tokenized train and validation splits; the validation split is never used to train or calibrate."""

    spec: str
    tokenizer: object
    train_docs: list[str]
    valid_docs: list[str]
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, spec: str, tokenizer=None) -> "TextData":
        """Read and split the documents (no tokenizer needed yet: bad data fails before a model loads)."""
        docs = load_documents(spec)
        if not docs or not any(d.strip() for d in docs):
            raise SourceError(f"data '{spec}' is empty; give a file with text in it")
        train, valid = split_documents(docs)
        return cls(spec, tokenizer, train, valid)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for d in self.train_docs + ["\x00valid\x00"] + self.valid_docs:
            h.update(d.encode("utf-8"))
            h.update(b"\x00")
        return h.hexdigest()

    def _ids(self, split: str):
        import torch

        if split not in self._cache:
            docs = self.train_docs if split == "train" else self.valid_docs
            eos = self.tokenizer.eos_token or ""
            self._cache[split] = tokenize_bounded(self.tokenizer, eos.join(docs))
        return self._cache[split]

    @property
    def train_ids(self):
        """1-D LongTensor of the train split's tokens (documents joined by EOS)."""
        return self._ids("train")

    @property
    def valid_ids(self):
        """1-D LongTensor of the validation split's tokens."""
        return self._ids("valid")

    def train_blocks(self, n: int, seq_len: int, seed: int):
        """``n`` blocks [1, seq_len] from the train split at seeded random offsets (calibration / training)."""
        import torch

        ids = self.train_ids
        if ids.numel() < seq_len + 1:
            raise SourceError(
                f"train split has {ids.numel()} tokens, fewer than one block of {seq_len}; give more data or a "
                "shorter --seq-len/--calib-seq-len"
            )
        gen = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, ids.numel() - seq_len, (n,), generator=gen)
        return [ids[s : s + seq_len].unsqueeze(0) for s in starts.tolist()]
