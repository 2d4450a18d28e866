"""A compressed-tensors ``quantization_config`` as hostile input, checked before compressed-tensors sees it.

Targets and ignore entries may be regular expressions (``re:...``) that compressed-tensors matches against every
module name: one with nested or alternated repetition (``re:(a+)+$``) backtracks for minutes on a long name, so
only a safe subset is accepted (at most 256 characters, no repetition inside repetition, no alternation or
backreference inside repetition, at most three unbounded repeats). pydantic's "2 validation errors for
QuantizationConfig" becomes the first real error, located.
"""
from __future__ import annotations

import re

from gptopt_core import GptoptError

#: longest target / ignore entry accepted
MAX_TARGET = 256
#: most target / ignore entries in one config (a real one names at most every linear layer of a large model)
MAX_TARGETS = 100_000
#: most unbounded repeats (``*``, ``+``, ``{n,}``) in one regex target: polynomial, not exponential, backtracking
MAX_UNBOUNDED = 3


def _walk(items, inside_repeat: bool, counts: dict) -> None:
    import re._parser as sre  # the stdlib's own regex parser: what re.compile would build

    for op, arg in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = arg
            unbounded = high == sre.MAXREPEAT or high > 1000
            if unbounded:
                counts["unbounded"] += 1
            if inside_repeat and (unbounded or high > 1):
                raise ValueError("repetition inside repetition")
            _walk(sub, inside_repeat or unbounded or high > 1, counts)
        elif name == "BRANCH":
            if inside_repeat:
                raise ValueError("alternation inside repetition")
            for branch in arg[1]:
                _walk(branch, inside_repeat, counts)
        elif name == "SUBPATTERN":
            _walk(arg[-1], inside_repeat, counts)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise ValueError("a backreference")
        elif name in ("ASSERT", "ASSERT_NOT"):
            _walk(arg[1], inside_repeat, counts)


def check_target(value, where: str) -> None:
    """One ``targets`` / ``ignore`` entry: a string of at most :data:`MAX_TARGET` characters; a ``re:`` entry a
    regular expression in the safe subset."""
    if not isinstance(value, str):
        raise GptoptError(f"{where}: an entry is {type(value).__name__}, not a module name or 're:' pattern")
    if len(value) > MAX_TARGET:
        raise GptoptError(f"{where}: an entry is {len(value)} characters, more than {MAX_TARGET}")
    if not value.startswith("re:"):
        return
    import re
    import re._parser as sre

    try:
        parsed = sre.parse(value[3:])
        re.compile(value[3:])
    except (re.error, RecursionError, OverflowError) as exc:
        raise GptoptError(f"{where}: {value[:60]!r} is not a valid regular expression ({exc})") from None
    counts = {"unbounded": 0}
    try:
        _walk(parsed, False, counts)
        if counts["unbounded"] > MAX_UNBOUNDED:
            raise ValueError(f"more than {MAX_UNBOUNDED} unbounded repeats")
    except (ValueError, RecursionError) as exc:
        raise GptoptError(f"{where}: the pattern {value[:60]!r} has {exc}, which can take exponential time to "
                          "match; use a plain module name or a simpler pattern") from None


def check_targets(entries, where: str) -> None:
    if entries is None:
        return
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        raise GptoptError(f"{where} must be a list of module names or 're:' patterns, got {type(entries).__name__}")
    if len(entries) > MAX_TARGETS:
        raise GptoptError(f"{where} has {len(entries)} entries, more than {MAX_TARGETS}")
    for entry in entries:
        check_target(entry, where)


def check_quantization_config(qc: dict, where: str) -> None:
    """Every ``targets`` / ``ignore`` list of the quantization and sparsity configs (see :func:`check_target`)."""
    if not isinstance(qc, dict):
        raise GptoptError(f"{where}: quantization_config must be a mapping")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise GptoptError(f"{where}: quantization_config.config_groups must be a mapping")
    for name, group in groups.items():
        if isinstance(group, dict):
            check_targets(group.get("targets"), f"{where}: config_groups.{str(name)[:40]}.targets")
    check_targets(qc.get("ignore"), f"{where}: quantization_config.ignore")
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict):
        check_targets(sparsity.get("targets"), f"{where}: sparsity_config.targets")
        check_targets(sparsity.get("ignore"), f"{where}: sparsity_config.ignore")


def validation_message(exc) -> str:
    """The first error of a pydantic ``ValidationError``, located (``config_groups.group_0.weights.num_bits: Input
    should be ...``), with how many more there are."""
    errors = exc.errors() if hasattr(exc, "errors") else []
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    # pydantic names validators in the location ("function-after[validate_model_after(), ...]"): keep field names
    loc = ".".join(str(p) for p in first.get("loc", ()) if re.fullmatch(r"[\w.-]+", str(p))) or "quantization_config"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = " ".join(str(first.get("msg", "")).split())  # pydantic's text may span lines (a model's repr)
    return f"{loc}: {msg if len(msg) <= 240 else msg[:240] + '...'}{more}"
