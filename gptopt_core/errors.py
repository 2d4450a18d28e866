"""User-facing errors: each becomes one line on stderr and exit code 2."""
import errno
import re

#: longest message a user error prints: input echoed back (a value, a path, a YAML snippet) is cut to fit
MAX_MESSAGE = 600


def shorten(text, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how much was left out (never echo unbounded input)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


class GptoptError(Exception):
    """Something the user can fix (bad input, impossible chain). One line, exit 2, no traceback."""

    exit_code = 2

    def __init__(self, message=""):
        # always one line: user-supplied names may carry newlines
        super().__init__(shorten(str(message).replace("\r", "\\r").replace("\n", "\\n"), MAX_MESSAGE))


class ParamsError(GptoptError):
    """A step's parameters failed validation."""


class PlanError(GptoptError):
    """The chain of steps cannot run in this order."""


class SourceError(GptoptError):
    """A model or data source could not be resolved or read."""


class StepFailed(Exception):
    """A step raised something unexpected while running (a bug or an environment fault): exit 1."""

    def __init__(self, step_name, plugin, error):
        self.step_name, self.plugin, self.error = step_name, plugin, error
        super().__init__(
            f"step '{step_name}' (plugin {plugin}) failed: {type(error).__name__}: {error}"
        )


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP: the terminal went away), raised in the main thread so that it unwinds like Ctrl-C
    (partial output removed, run.json records the run as interrupted); exit code 128 + the signal's number."""

    def __init__(self, signum: int = 15):
        import signal

        self.signum = int(signum)
        self.signame = signal.Signals(self.signum).name if self.signum in set(signal.Signals) else str(signum)
        super().__init__(self.signame)


#: OS errors a user causes and can fix (a path too long, a read-only or full disk, a file where a directory goes)
USER_ERRNOS = {errno.ENAMETOOLONG: "a path component is longer than the file system allows",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied", errno.EPERM: "not permitted",
               errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.ELOOP: "symlink loop", errno.ENOTDIR: "a path component is not a directory",
               errno.EISDIR: "is a directory", errno.EMLINK: "too many links"}


#: how libraries that do not raise ``OSError`` (safetensors' Rust writer, torch.save, numpy's tofile) word a full
#: disk: the machine's fault, exit 2 as docs/trust-model.md says, not a bug
DISK_FULL = re.compile(r"No space left on device|os error 28\b|StorageFull|Disk quota exceeded|os error 122\b"
                       r"|\d+ requested and \d+ written|file write failed")


def _causes(exc: BaseException):
    """``exc`` and what it wraps: a step's or a plugin hook's error, ``__cause__`` and ``__context__``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = getattr(exc, "error", None) if isinstance(getattr(exc, "error", None), BaseException) else (
            exc.__cause__ or exc.__context__)


def user_error(exc: BaseException) -> "GptoptError | None":
    """The one place that decides whether an unexpected exception was caused by the user's input or machine
    (a path too long, a read-only or full disk, undecodable text, input nested too deeply) and words it as one
    line; ``None`` for anything else (a bug: exit 1). Looks through wrapped errors (a plugin hook's, a step's)."""
    if isinstance(exc, GptoptError):
        return exc
    for inner in _causes(exc):
        mapped = _user_error(inner)
        if mapped is not None:
            return mapped
    return None


def _user_error(exc: BaseException) -> "GptoptError | None":
    if isinstance(exc, GptoptError):
        return exc
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        where = f": {shorten(exc.filename, 120)}" if exc.filename else ""
        return GptoptError(f"{USER_ERRNOS[exc.errno]}{where}")
    if isinstance(exc, UnicodeDecodeError):
        return GptoptError(f"input is not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                           "re-encode it as UTF-8")
    if isinstance(exc, RecursionError):
        return GptoptError("input is nested too deeply")
    if DISK_FULL.search(str(exc)):
        return GptoptError(f"no space left on the device ({type(exc).__name__}: {shorten(str(exc), 160)})")
    return None
