"""Text data: documents from a source, a deterministic train/validation split by document, token blocks."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SourceError

VALID_EVERY = 10  # every 10th document (by position) is held out for validation


def load_documents(spec: str) -> list[str]:
    """Documents (strings) of a data spec: ``builtin:pydoc``, a local .txt/.jsonl/.csv/.parquet, or a hub id."""
    if spec == "builtin:pydoc":
        import pydoc_data.topics

        topics = pydoc_data.topics.topics
        return [topics[k] for k in sorted(topics)]
    if spec.startswith("builtin:"):
        raise SourceError(f"unknown built-in data '{spec}'; the built-in corpus is builtin:pydoc")
    path = Path(spec).expanduser()
    if path.suffix == ".txt" or (path.is_file() and path.suffix not in (".jsonl", ".json", ".csv", ".parquet")):
        if not path.is_file():
            raise SourceError(f"data file {spec} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SourceError(f"data file {spec} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
        docs = [d.strip() for d in text.split("\n\n\n") if d.strip()]
        return docs
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        if not path.is_file():
            raise SourceError(f"data file {spec} does not exist")
        return _datasets_documents(str(path), path.suffix.lstrip("."))
    if spec.count("/") == 1 and not path.exists():
        return _datasets_documents(spec, None)
    raise SourceError(f"data '{spec}' not found: give builtin:pydoc, a .txt/.jsonl/.csv/.parquet file or a hub dataset id")


def _datasets_documents(spec: str, kind: str | None) -> list[str]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if kind is None:
            ds = datasets.load_dataset(spec, split="train")
        else:
            builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}[kind]
            ds = datasets.load_dataset(builder, data_files=spec, split="train")
    except Exception as exc:  # datasets raises many types on bad files / unreachable hub
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"cannot read data '{spec}': {first}"[:300]) from None
    if "text" not in ds.column_names:
        raise SourceError(f"data '{spec}' has no 'text' column (columns: {', '.join(ds.column_names)})")
    return [t for t in ds["text"] if isinstance(t, str) and t.strip()]


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
            text = eos.join(docs)
            ids = self.tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
            self._cache[split] = torch.tensor(ids, dtype=torch.long)
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
