"""User-facing errors: each becomes one line on stderr and exit code 2."""
import errno
import re

#: longest message a user error prints: input echoed back (a value, a path, a YAML snippet) is cut to fit
MAX_MESSAGE = 600


#: characters never echoed raw: C0/C1 controls and DEL (a terminal acts on ESC sequences: a title, a cleared screen),
#: Unicode format characters (bidirectional overrides that reorder a line, zero-width ones), line and paragraph
#: separators, and lone surrogates (an undecodable file name; printing one raises)
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(text, limit: int | None = None) -> str:
    """``text`` as it may be shown on a terminal: every control character (ESC, BEL, CR, NUL, DEL, C1), Unicode
    format character (bidirectional overrides, zero-width), line separator and lone surrogate written as a
    ``\\xNN`` / ``\\uNNNN`` escape; everything else as it is. ``limit``: then cut as :func:`shorten` does.

    Every message that echoes something read from a file or given by a user goes through it (a
    :class:`GptoptError` applies it to its whole message), so a name in a plan, an imatrix or a recipe cannot
    set the terminal's title, clear the screen or hide part of the line."""
    import unicodedata

    text = str(text)
    if text.isprintable() and text.isascii():  # the common case: nothing to look at
        out = text
    else:
        out = "".join(_escape(ch) if (ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F or (
            ord(ch) > 0x9F and unicodedata.category(ch) in _UNSAFE_CATEGORIES)) else ch for ch in text)
    return out if limit is None else shorten(out, limit)


def error_text(exc, limit: int = 400) -> str:
    """A library's exception as one line that keeps its cause: its non-empty lines joined with a space, without
    "For further information visit" links, cut to ``limit`` as :func:`shorten` does; the type's name where the text
    alone says nothing (empty, or a ``KeyError``'s bare key).

    Libraries put the cause on a later line: huggingface_hub's strict dataclasses (transformers' configs) raise
    ``Class validation error for validator 'validate_architecture':`` with the ``ValueError`` naming the field on
    the next line, so a message cut at its first line said neither field nor problem (issue 38)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith("For further information visit"))
    if not text or isinstance(exc, KeyError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return shorten(text, limit)


def shorten(text, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters with a marker saying how much was left out (never echo unbounded input)."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}...(+{len(text) - limit} chars)"


class GptoptError(Exception):
    """Something the user can fix (bad input, impossible chain). One line, exit 2, no traceback."""

    exit_code = 2

    def __init__(self, message=""):
        # always one line, never a raw control character: user-supplied names may carry newlines or ESC sequences
        super().__init__(shorten(safe_text(message), MAX_MESSAGE))


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
