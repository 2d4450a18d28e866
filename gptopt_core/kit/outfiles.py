"""Files a run reads, writes and deletes under its own ``--out``, never through a link and never outside it.

``--out`` is the user's, but what lies below it may have been planted since the run that wrote it: a
``checkpoints`` directory that is a symlink to someone else's data, a step's checkpoint directory linked
elsewhere, a checkpoint file that is a FIFO. ``gptopt run --resume`` trusts none of it:

* :func:`check_run_tree` walks ``--out`` with ``lstat`` (links are never followed) before the model loads: every
  entry is a real directory or a regular file, no symlink, FIFO, socket or device anywhere, at most
  :data:`MAX_ENTRIES` entries; the first offender is named in one line.
* :func:`real_dir` is checked again right before each directory below ``--out`` is written to or cleaned
  (a link planted after the walk is refused, not followed); :func:`open_regular` opens a file with
  ``O_NOFOLLOW | O_NONBLOCK`` and checks the open descriptor, so a FIFO never blocks and a link is never read.
* :func:`write_file` writes a file below ``--out`` through an exclusive temporary name (``O_EXCL |
  O_NOFOLLOW``) and renames it into place: a link planted at the name is replaced, what it points to is untouched.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from ..errors import GptoptError, shorten
from .inputs import _kind

#: entries ``--out`` may hold for ``--resume`` to walk it (a run writes a few dozen)
MAX_ENTRIES = 20_000
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def _show(path, root=None) -> str:
    if root is not None:
        try:
            return shorten(os.fspath(Path(path).relative_to(Path(root).parent)), 120)
        except ValueError:
            pass
    return shorten(os.fspath(path), 120)


def _what(mode: int) -> str:
    return "a symbolic link" if stat.S_ISLNK(mode) else _kind(mode)


def check_run_tree(out_dir, where: str = "--resume") -> None:
    """Raise a one-line :class:`GptoptError` unless every entry below ``out_dir`` (itself included, as given on
    the command line after resolving) is a real directory or a regular file: no symlink, FIFO, socket or device,
    nothing that resolves outside ``out_dir``. Nothing is opened or followed."""
    root = Path(out_dir)
    real_root = Path(os.path.realpath(root))
    count = 0
    stack = [real_root]
    while stack:
        directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise GptoptError(f"{where}: {_show(directory)} cannot be listed ({exc.strerror})") from None
        for entry in entries:
            count += 1
            if count > MAX_ENTRIES:
                raise GptoptError(f"{where}: {_show(root)} holds more than {MAX_ENTRIES} entries; it is not a "
                                  "directory gptopt wrote (start a new run without --resume)")
            mode = entry.stat(follow_symlinks=False).st_mode
            path = Path(entry.path)
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif not stat.S_ISREG(mode):
                raise GptoptError(f"{where}: {_show(path, real_root)} is {_what(mode)}; gptopt writes only regular "
                                  "files and directories under --out and follows no links there (remove it)")


def within(path, out_dir) -> bool:
    """Whether ``path`` resolves (links followed) to ``out_dir`` or below it."""
    real, root = os.path.realpath(path), os.path.realpath(out_dir)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def real_dir(path, out_dir, where: str, create: bool = False) -> Path:
    """``path`` (below ``out_dir``) as a real directory: each component from ``out_dir`` down is checked with
    ``lstat`` (a symlink or a non-directory is a one-line error) and, with ``create``, made when missing."""
    path, root = Path(path), Path(out_dir)
    parts = path.relative_to(root).parts
    current = root
    for part in parts:
        current = current / part
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            if not create:
                return current
            try:
                os.mkdir(current)
            except FileExistsError:
                pass  # made meanwhile: checked below
            mode = os.lstat(current).st_mode
        if not stat.S_ISDIR(mode):
            raise GptoptError(f"{where}: {_show(current, root)} is {_what(mode)}, not a directory; gptopt follows no "
                              "links under --out (remove it)")
    if not within(path, root):
        raise GptoptError(f"{where}: {_show(path)} resolves outside --out {_show(root)}")
    return path


def open_regular(path, where: str) -> int:
    """A read-only descriptor of the regular file ``path``: a symlink is refused (``O_NOFOLLOW``), a FIFO or device
    is refused without blocking (``O_NONBLOCK``, then ``fstat`` of the open descriptor); blocking mode restored."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            raise GptoptError(f"{where}: {_show(path)} is a symbolic link; gptopt follows no links under --out "
                              "(remove it)") from None
        raise GptoptError(f"{where}: {_show(path)} cannot be read ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise GptoptError(f"{where}: {_show(path)} is {_kind(mode)}, not a regular file (remove it)")
    os.set_blocking(fd, True)
    return fd


def read_regular(path, where: str, max_bytes: int) -> bytes:
    """The bytes of the regular file ``path`` (see :func:`open_regular`), at most ``max_bytes``."""
    fd = open_regular(path, where)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise GptoptError(f"{where}: {_show(path)} is larger than the {max_bytes} bytes such a file may have")
    return data


def write_file(path, data: bytes | str) -> None:
    """Write ``path`` atomically through ``.NAME.tmp-PID`` created exclusively (``O_EXCL | O_NOFOLLOW``: never
    through a link planted at either name); a link at ``path`` itself is replaced by the file, its target untouched."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        os.unlink(tmp)  # a leftover of this PID (a name, never followed)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
