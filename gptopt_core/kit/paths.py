"""Output locations: one check for every path a run writes, the run-directory lock, stale partial directories.

Every output path (``--out``, ``save --to``, any step's :attr:`~gptopt_core.Step.path_params`) goes through
:func:`check_output_path` after it has been validated into its final value and resolved (``~`` expanded,
symlinks followed), whichever door it came through: the CLI, a recipe, a replayed run.json or Python. The
pipeline calls it for every step's path params before the model loads; plugins writing other files call it too.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ..errors import GptoptError, shorten
from .locks import _write_pid

#: the lock file inside a locked ``--out`` directory
LOCK_NAME = ".gptopt.lock"


def _name_max(directory: Path) -> int:
    try:
        return os.pathconf(directory, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_path_lengths(value, where: str) -> None:
    """Raise a one-line error when a path (input or output) has a component or a length the file system
    cannot hold, before anything tries to open it."""
    text = os.fspath(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a name with undecodable bytes (surrogate-escaped): run.json/report.md are UTF-8
        byte = ord(text[exc.start]) - 0xDC00 if 0xDC80 <= ord(text[exc.start]) <= 0xDCFF else ord(text[exc.start])
        raise GptoptError(f"{where}: the path is not valid UTF-8 (byte 0x{byte:02x} at {exc.start}); rename it") from None
    limit = _name_max(Path("."))
    for part in expand_user(text, where).parts:
        size = len(os.fsencode(part))
        if size > limit:
            raise GptoptError(f"{where}: path component '{shorten(part, 40)}' is {size} bytes, longer than the "
                              f"file system allows ({limit})")
    if len(os.fsencode(text)) > 4096:
        raise GptoptError(f"{where}: the path is {len(os.fsencode(text))} bytes, longer than the file system allows")


def expand_user(text: str, where: str) -> Path:
    """``Path(text).expanduser()``, with an unknown ``~user`` as a one-line error."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise GptoptError(f"{where}: cannot expand '{shorten(text.split(os.sep)[0], 40)}' (no such user)") from None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def check_output_path(value, where: str = "output", *, confine_to=None, overwrite: bool = False,
                      protect=(), file: bool = False, temporary: bool = True) -> Path:
    """Check one output location and return it resolved; raise a one-line :class:`GptoptError` otherwise.

    :param value: the path as the step will use it (a ``str`` or ``os.PathLike``; bytes are refused).
    :param where: how the message names it, e.g. ``"step 3 'save' --to"``.
    :param confine_to: a directory the resolved path must lie in (recipes and replayed run.json files may
        only write below the directory they are run from).
    :param overwrite: the step will replace an existing directory here: refused for the working directory,
        its parents, the home directory, ``/`` and every path in ``protect`` or above it.
    :param protect: paths this output must neither be nor contain (e.g. the run's ``--out``).
    :param file: the output is one file (e.g. ``export --to FILE.gguf``), not a directory: an existing directory
        there is refused, an existing file is the step's to refuse or replace (its ``--overwrite``).
    :param temporary: the output is written through a temporary name beside it (a save, an export): its last
        component must leave room for that name (:data:`TEMP_NAME_ROOM` bytes).
    :returns: the resolved :class:`~pathlib.Path` (symlinks followed).

    Refused: a non-text value, an empty path, NUL bytes, components longer than the file system allows, a
    symlink loop, a dangling symlink, a path under a regular file, a location that cannot be written (read-only
    file system, no permission), anything outside ``confine_to``.
    """
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)):
        raise GptoptError(f"{where}: a path must be text, got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise GptoptError(f"{where}: the path is empty")
    if "\x00" in text:
        raise GptoptError(f"{where}: the path contains a NUL byte")
    check_path_lengths(text, where)
    last = os.fsencode(Path(text).name)
    if temporary and len(last) + TEMP_NAME_ROOM > _name_max(Path(".")):
        raise GptoptError(f"{where}: the name '{shorten(Path(text).name, 40)}' is {len(last)} bytes; gptopt writes it "
                          f"through a temporary name beside it, so it may have at most "
                          f"{_name_max(Path('.')) - TEMP_NAME_ROOM}")
    shown = shorten(text, 120)
    raw = expand_user(text, where)
    try:
        resolved = raw.resolve()
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        raise GptoptError(f"{where}: {shown} is a symlink loop") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise GptoptError(f"{where}: {shown} is a symlink loop") from None
        raise GptoptError(f"{where}: {shown} cannot be resolved ({exc.strerror})") from None
    if os.path.islink(raw) and not os.path.exists(raw):
        raise GptoptError(f"{where}: {shown} is a dangling symlink (it points to {shorten(os.readlink(raw), 80)}, "
                          "which does not exist); remove it or choose another path")
    if confine_to is not None:
        root = Path(confine_to).resolve()
        if not _within(resolved, root):
            raise GptoptError(f"{where}: '{shown}' escapes the working directory (it resolves to {resolved}); a "
                              "recipe may only write to relative paths below it (give absolute paths on the "
                              "command line instead)")
    # the nearest existing ancestor is where the directory (or its temporary sibling) will be created
    existing = resolved if resolved.exists() else next((p for p in resolved.parents if p.exists()), Path("/"))
    if file and existing == resolved and resolved.is_dir():
        raise GptoptError(f"{where}: {shown} is a directory; give a file name")
    if not file and existing == resolved and not resolved.is_dir():
        raise GptoptError(f"{where}: {shown} is a file, not a directory")
    if existing != resolved and not existing.is_dir():
        raise GptoptError(f"{where}: {shown} is under {existing}, which is a file, not a directory")
    parent_existing = existing if existing != resolved else (
        next((p for p in resolved.parents if p.exists()), Path("/")))
    for d in ({parent_existing} if file else {existing, parent_existing}):  # a file is replaced in its directory
        if not os.access(d, os.W_OK | os.X_OK):
            raise GptoptError(f"{where}: {shown} cannot be written ({d} is read-only or not writable by you)")
    if overwrite and not file:
        cwd = Path.cwd().resolve()
        danger = [cwd, *cwd.parents, Path.home().resolve()]
        if any(resolved == d for d in danger):
            raise GptoptError(f"{where}: --overwrite would replace {resolved}, the working directory, home or one of "
                              "their parents; choose a new directory below it")
    for other in protect:
        if other is None:
            continue
        other = Path(other).expanduser().resolve()
        if _within(other, resolved):
            raise GptoptError(f"{where}: {shown} is or contains {other}, which this run also writes; choose a "
                              "different path")
    return resolved


def clean_stale_partials(target: Path) -> list[Path]:
    """Remove ``.NAME.partial-PID`` directories beside ``target`` left by processes that no longer run (a save
    killed with -9); return what was removed. A live process's directory is left alone."""
    removed = []
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return removed
    for kind in ("partial", "old"):
        for d in parent.glob(f".{target.name}.{kind}-*"):
            pid = d.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                continue  # the only copy of the previous target (killed between the two renames): keep it
            _remove(d)
            removed.append(d)
    return removed


def _remove(path: Path) -> None:
    """A file, a symlink (never what it points to) or a directory tree."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(directory, prefix: str, suffix: str = "") -> list[Path]:
    """Remove the entries of ``directory`` named ``PREFIX<pid><anything>SUFFIX`` whose process ``pid`` no longer
    runs (temporaries of a run killed with -9: an export's ``.NAME.<pid>.*.part``, a ``--offload disk``
    directory); returns what was removed. Temporaries of live processes are left alone."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    for entry in directory.glob(f"{glob_escape(prefix)}*{glob_escape(suffix)}"):
        rest = entry.name[len(prefix):]
        pid = rest.split(".", 1)[0].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def glob_escape(text: str) -> str:
    import glob

    return glob.escape(text)


#: bytes a temporary name beside an output adds to its last component (``.NAME.partial-PID``, ``.NAME.PID.XXXXXXXX.part``)
TEMP_NAME_ROOM = 32


class RunLock:
    """An exclusive lock on a run directory (``--out``): ``OUT/.gptopt.lock`` held with ``flock`` while the run
    lasts. A second run on the same directory fails at once with the first one's PID; a lock left by a process
    that died (even by ``kill -9``) is free again, since the kernel drops ``flock`` locks with their process.
    Directories created to hold the lock are removed again when the run wrote nothing."""

    def __init__(self, out_dir):
        self.out = Path(out_dir)
        self.created: list[Path] = []
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        missing = [p for p in [self.out, *self.out.parents] if not p.exists()]
        self.out.mkdir(parents=True, exist_ok=True)
        self.created = missing  # innermost first
        fd = self._open_lock_file()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            self._remove_created()
            raise GptoptError(f"--out {self.out} is in use by another gptopt run (PID {holder}); wait for it to "
                              "finish or choose another --out") from None
        try:
            _write_pid(fd, self.out / LOCK_NAME, f"--out {shorten(self.out, 120)}")
        except GptoptError:
            self._remove_created()
            raise
        self.fd = fd
        return self

    def _open_lock_file(self) -> int:
        """The lock file, never through a symlink (``O_NOFOLLOW``: a planted ``.gptopt.lock`` link to a file
        outside ``--out`` is refused, not truncated) and only a regular file (a FIFO would block the open)."""
        import stat

        path = self.out / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            self._remove_created()
            if exc.errno in (errno.ELOOP, errno.EMLINK) or os.path.islink(path):
                raise GptoptError(f"--out {self.out}: {LOCK_NAME} is a symlink; gptopt writes its lock only as a "
                                  "regular file inside --out (remove the link)") from None
            raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            self._remove_created()
            raise GptoptError(f"--out {self.out}: {LOCK_NAME} is not a regular file; remove it")
        return fd

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            (self.out / LOCK_NAME).unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None
            self._remove_created()

    def _remove_created(self) -> None:
        for d in self.created:
            try:
                d.rmdir()  # only when empty: a run that wrote something keeps it
            except OSError:
                break

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False

