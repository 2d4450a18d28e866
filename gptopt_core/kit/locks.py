"""Output locks and atomic publishing of one output (``save --to DIR``, ``export --to FILE``): a second writer of
the same path is refused at once, and a file that appeared while gptopt wrote it is never replaced silently."""
from __future__ import annotations

import errno
import os
from pathlib import Path

from ..errors import GptoptError, shorten

class OutputLock:
    """An exclusive lock on one output (``save --to DIR``, ``export --to FILE``): ``.NAME.gptopt-lock`` beside it,
    held with ``flock`` while the step writes. A second writer of the same output fails at once with the first
    one's PID instead of both finishing with one result silently replaced; a lock of a killed process is free
    again. The lock file is opened like ``--out``'s (no link followed, a regular file only) and removed after."""

    def __init__(self, target, where: str = "output"):
        self.target = Path(target)
        self.where = where
        self.path = self.target.parent / f".{self.target.name}.gptopt-lock"
        self.fd = None

    def acquire(self) -> "OutputLock":
        import fcntl

        for _ in range(5):  # the file may be removed by its last holder between our open and our flock: reopen
            fd = _open_lock(self.path, f"{self.where} {shorten(self.target, 120)}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
                os.close(fd)
                raise GptoptError(f"{self.where} {shorten(self.target, 120)} is being written by another gptopt run "
                                  f"(PID {holder}); wait for it to finish or choose another path") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                _write_pid(fd, self.path, f"{self.where} {shorten(self.target, 120)}")
                self.fd = fd
                _HELD.add(os.path.abspath(self.path))
                return self
            os.close(fd)
        raise GptoptError(f"{self.where} {shorten(self.target, 120)}: its lock file keeps changing; retry")

    def check(self) -> None:
        """Before anything loads: refuse now if another run holds the lock, or its file is a link or not a regular
        file (nothing is created; :meth:`acquire` takes the lock when the step writes)."""
        import fcntl

        if not os.path.lexists(self.path) or os.path.abspath(self.path) in _HELD:  # ours: checked again under it
            return
        fd = _open_lock(self.path, f"{self.where} {shorten(self.target, 120)}", create=False)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            raise GptoptError(f"{self.where} {shorten(self.target, 120)} is being written by another gptopt run "
                              f"(PID {holder}); wait for it to finish or choose another path") from None
        finally:
            os.close(fd)  # drops the probe's shared lock with it

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.discard(os.path.abspath(self.path))
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def _write_pid(fd: int, path: Path, where: str) -> None:
    """Write this process's PID into the lock file it holds; on failure (a full disk) the file is removed and
    closed, and the one-line error names it."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError as exc:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        raise GptoptError(f"{where}: cannot write the lock file {shorten(path, 160)} ({exc.strerror})") from None


#: the output locks this process holds (their files' absolute paths)
_HELD: set = set()


def _open_lock(path: Path, where: str, create: bool = True) -> int:
    """A lock file opened read-write, created when missing, never through a link, only a regular file."""
    import stat

    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
            raise GptoptError(f"{where}: {path.name} is a symlink; remove it") from None
        if exc.errno == errno.EISDIR:
            raise GptoptError(f"{where}: {path.name} is not a regular file (a directory); remove it") from None
        raise GptoptError(f"{where}: cannot create the lock file {shorten(path, 120)} ({exc.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise GptoptError(f"{where}: {path.name} is not a regular file; remove it")
    return fd


def publish_file(tmp, target, overwrite: bool, where: str = "output") -> None:
    """Move the finished temporary file ``tmp`` to ``target`` atomically. Without ``overwrite`` an existing
    ``target`` is never replaced, even one that appeared a moment ago (``link`` fails where ``rename`` would
    silently replace): a one-line error, ``tmp`` removed."""
    tmp, target = Path(tmp), Path(target)
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise GptoptError(f"{where} {shorten(target, 120)} appeared while gptopt was writing it (another program "
                          "wrote it); pass --overwrite or choose another path") from None
    except OSError:  # a file system without hard links: the check and the rename are separate steps there
        if os.path.lexists(target):
            tmp.unlink(missing_ok=True)
            raise GptoptError(f"{where} {shorten(target, 120)} appeared while gptopt was writing it; pass "
                              "--overwrite or choose another path") from None
        os.replace(tmp, target)
        return
    tmp.unlink(missing_ok=True)
