"""Input files gptopt reads that someone else may have written: regular files only, bounded reads, one safe loader.

A FIFO, a device (``/dev/zero``), a socket or a directory where a file is meant is refused before it is read: the
file is opened non-blocking (a FIFO does not hang the open) and checked with ``fstat`` on the open descriptor, so a
file swapped after a check is still caught. Reads stop at a size cap. JSON and YAML go through the one loader
recipes use (:func:`gptopt_core.recipes.load_recipe_text`): plain data only, no tags, no anchors or aliases, no
duplicate keys, bounded depth and size.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import SourceError, shorten

#: the cap of :func:`read_input_file` when the caller gives none: a config, a plan, a recipe is a few KiB
MAX_SMALL_FILE = 4 * 2**20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "not a regular file"


def check_input_file(path, where: str, *, missing_ok: bool = False) -> bool:
    """Raise a one-line :class:`SourceError` unless ``path`` is a regular file (symlinks followed; a FIFO, a
    device, a socket, a directory or a dangling link is refused without being opened). Returns ``False`` for a
    missing file when ``missing_ok``."""
    shown = shorten(os.fspath(path), 160)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if missing_ok and not os.path.islink(path):
            return False
        what = "is a dangling symlink" if os.path.islink(path) else "does not exist"
        raise SourceError(f"{where}: {shown} {what}") from None
    except OSError as exc:
        raise SourceError(f"{where}: {shown} cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise SourceError(f"{where}: {shown} is {_kind(mode)}, not a regular file; give a file")
    return True


def read_input_file(path, where: str, max_bytes: int = MAX_SMALL_FILE) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; a FIFO, a device, a directory or a larger file is a
    one-line :class:`SourceError` (the open does not block and nothing past the cap is read)."""
    shown = shorten(os.fspath(path), 160)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SourceError(f"{where}: {shown} does not exist") from None
    except OSError as exc:
        raise SourceError(f"{where}: {shown} cannot be read ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SourceError(f"{where}: {shown} is {_kind(info.st_mode)}, not a regular file; give a file")
        if info.st_size > max_bytes:
            raise SourceError(f"{where}: {shown} is {info.st_size} bytes, more than the {_size(max_bytes)} such a "
                              "file may have")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise SourceError(f"{where}: {shown} is more than the {_size(max_bytes)} such a file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n} bytes"


def load_structured_file(path, where: str, max_bytes: int = MAX_SMALL_FILE, kind: str | None = None):
    """Plain data (dicts, lists, strings, numbers, booleans, null) from a JSON or YAML file (``kind``, or the
    suffix: ``.json`` is JSON, anything else YAML), read by :func:`read_input_file` and parsed by the recipe loader
    (no tags, anchors, aliases or duplicate keys; bounded depth and size). Every problem is one
    :class:`GptoptError` line that echoes at most a few characters of the file."""
    data = read_input_file(path, where, max_bytes)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: {shorten(os.fspath(path), 160)} is not UTF-8 text (byte {exc.start})") from None
    from ..recipes import load_recipe_text

    kind = kind or ("JSON" if Path(path).suffix.lower() == ".json" else "YAML")
    return load_recipe_text(text, kind, f"{where}: {shorten(os.fspath(path), 160)}", limit=max_bytes)


def check_no_special_files(directory: Path, where: str, depth: int = 2) -> None:
    """Every entry of a model directory that a loader may open (and of its subdirectories, e.g. a LoRA
    ``adapter/``, ``depth`` levels down) is a regular file or a directory: a FIFO, a device or a dangling link
    named like a tokenizer or weights file would hang or flood the reader."""
    for entry in sorted(Path(directory).iterdir()):
        try:
            mode = entry.stat().st_mode
        except OSError:
            raise SourceError(f"{where}: {shorten(entry, 160)} is a dangling symlink or cannot be read") from None
        if stat.S_ISDIR(mode):
            if depth > 1 and not entry.is_symlink():
                check_no_special_files(entry, where, depth - 1)
        elif not stat.S_ISREG(mode):
            raise SourceError(f"{where}: {shorten(entry, 160)} is {_kind(mode)}, not a regular file; remove it")

