"""Generate docs/cli.md (from the step schemas), docs/hooks.md (from the hookspec docstrings), the reference
part of docs/python-api.md (from ``gptopt_core.__all__``: signatures and docstrings) and docs/architectures.md (from
the architecture table and the family matrix).

    python -m gptopt_core.tools.docgen          # rewrite both files
    python -m gptopt_core.tools.docgen --check  # exit 1 if they drifted from the code (the test suite does this)

Only the steps of the ``gptopt`` distribution itself are documented (third-party plugins document their own).
"""
from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import gptopt_core

from .. import hookspecs
from ..cli import option_specs, run
from ..hookspecs import hook_names
from ..plugins import get_plugins
from .archdoc import architectures_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _signature(fn) -> str:
    """``name(arg: Type, ...) -> Type`` from the hookspec's annotations, as written (they are strings)."""
    sig = inspect.signature(fn)
    args = ", ".join(p.name if p.annotation is p.empty else f"{p.name}: {p.annotation}"
                     for p in sig.parameters.values())
    ret = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"{fn.__name__}({args}){ret}"


_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`~?([^`]+)`")
_FIELD = re.compile(r"^:(param (\w+)|returns?|raises? (\w+)):\s*", re.M)


def markdown_doc(doc: str) -> str:
    """A docstring (reStructuredText conventions) as Markdown: ``:class:`X``` → `` `X` ``, ``:param a:`` → a list
    item ``- `a`: ``, ``:returns:`` → ``- returns: ``, ``.. versionadded:: V`` → *New in V.*, ``.. deprecated:: V`` → *Deprecated in V:*, ``::`` → ``:``."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", inspect.cleandoc(doc or ""))

    def field(m):
        if m.group(2):
            return f"- `{m.group(2)}`: "
        return f"- raises `{m.group(3)}`: " if m.group(3) else "- returns: "

    text = _FIELD.sub(field, text)
    text = re.sub(r"^\.\. versionadded:: (\S+)$", r"*New in version \1.*", text, flags=re.M)
    text = re.sub(r"^\.\. versionchanged:: (\S+)(.*)$", r"*Changed in version \1:*\2", text, flags=re.M)
    text = re.sub(r"^\.\. deprecated:: (\S+)\n((?:    .*(?:\n|$))+)",  # the indented lines that follow: its text
                  lambda m: f"*Deprecated in version {m.group(1)}:* " + " ".join(
                      line.strip() for line in m.group(2).splitlines()) + "\n", text, flags=re.M)
    return re.sub(r"(\S)::$", r"\1:", text, flags=re.M)


def hooks_markdown() -> str:
    lines = ["# Hook reference", "",
             "Generated from `gptopt_core/hookspecs.py` by `python -m gptopt_core.tools.docgen`; do not edit by hand.", "",
             markdown_doc(hookspecs.__doc__), ""]
    for name in hook_names():
        fn = getattr(hookspecs, name)
        opts = getattr(fn, "gptopt_spec", {}) or {}
        sig = _signature(fn)
        kind = " (firstresult)" if opts.get("firstresult") else ""
        lines += [f"## `{sig}`{kind}", "", markdown_doc(fn.__doc__), ""]
    return "\n".join(lines)


def cli_markdown() -> str:
    plugins = get_plugins()
    lines = ["# CLI reference", "",
             "Generated from the step params schemas by `python -m gptopt_core.tools.docgen`; do not edit by hand. The same",
             "names are the recipe keys (with `_`) and the Python keyword arguments of `Pipeline.add`.", "",
             "## gptopt run", "", "```", "gptopt run [RUN OPTIONS] STEP [OPTIONS] [STEP [OPTIONS]]...", "```", ""]
    for param in run.params:
        if param.name == "help":
            continue
        flag = "/".join(param.opts)
        lines.append(f"- `{flag}`: {param.help}")
    lines.append("")
    for name in sorted(plugins.steps):
        cls = plugins.steps[name]
        info = plugins.info.get(cls.plugin)
        if info is None or info.distribution not in ("gptopt", None) and not info.builtin:
            continue
        lines += [f"## {name}", "", f"{inspect.cleandoc(cls.__doc__ or '')}", "", f"Plugin: `{cls.plugin}`.", ""]
        facts = []
        if cls.requires:
            facts.append("requires " + ", ".join(f"`{k}`" for k in cls.requires))
        if cls.forbids:
            facts.append("forbids " + ", ".join(f"`{k}`" for k in cls.forbids))
        if cls.provides:
            facts.append("provides " + ", ".join(f"`{k}`" for k in sorted(cls.provides)))
        if facts:
            lines += ["Facts: " + "; ".join(facts) + ".", ""]
        lines += ["| option | recipe key | description |", "|---|---|---|"]
        for spec in option_specs(cls):
            flag = f"{spec['flag']}/--no-{spec['flag'][2:]}" if spec["bool"] else spec["flag"]
            rep = " (repeatable)" if spec["multiple"] else ""
            lines.append(f"| `{flag}`{rep} | `{spec['name']}` | {spec['help'].replace('|', '&#124;')} |")
        lines.append("")
    return "\n".join(lines)


API_BEGIN = "<!-- public API: generated by python -m gptopt_core.tools.docgen from gptopt_core.__all__; do not edit below -->"
API_END = "<!-- end of generated public API -->"


def _api_entry(name: str, obj) -> list[str]:
    """One public name: heading with its signature, where it lives, its docstring (a table for the key tables)."""
    where = home_module(name)
    if isinstance(obj, Mapping):  # STATE_KEYS, FACTS: (owner, meaning) tables
        rows = [f"| `{key}` | {owner} | {meaning.replace('|', '&#124;')} |" for key, (owner, meaning) in obj.items()]
        return [f"### `{name}`", "", f"`{where}`; one row per key: name, owner, meaning.", "",
                "| key | owner | meaning |", "|---|---|---|", *rows, ""]
    target = obj
    try:
        if inspect.isclass(obj):
            fields = getattr(obj, "__dataclass_fields__", None)
            sig = inspect.signature(obj) if fields or "__init__" in vars(obj) else None
        else:
            sig = inspect.signature(target)
    except (TypeError, ValueError):
        sig = None
    kind = "class " if inspect.isclass(obj) else ""
    head = f"{kind}{name}{_plain_signature(sig) if sig is not None else ''}"
    if kind:
        head = head.removesuffix(" -> None")
    doc = markdown_doc(obj.__doc__) if (inspect.isclass(obj) or callable(obj)) else ""
    attr = gptopt_core._ALIASES.get(name, (None, name))[1]
    imp = f"from {where} import {attr}" + (f" as {name}" if attr != name else "")
    also = "" if where == "gptopt_core" else f" (also `from gptopt_core import {name}`)"
    return [f"### `{head}`", "", f"`{imp}`{also}", "", doc, ""]


def home_module(name: str) -> str:
    """The module a public name lives in, as plugins import it: ``gptopt_core`` for the names the front imports at
    once, else the submodule the lazy front loads it from (``gptopt_core.kit.calibration``)."""
    module = gptopt_core._ALIASES.get(name, (gptopt_core._LAZY.get(name),))[0]
    return f"gptopt_core.{module}" if module else "gptopt_core"


def _plain_signature(sig) -> str:
    """A signature as code reads it: string annotations without quotes, defaults as written."""
    parts, star_done = [], False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star_done:
            parts.append("*")
            star_done = True
        if p.kind is p.VAR_POSITIONAL:
            star_done = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.annotation is not p.empty:
            ann = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
            text += f": {ann}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        parts.append(text)
    ret = ""
    if sig.return_annotation is not sig.empty:
        ann = sig.return_annotation
        ret = f" -> {ann if isinstance(ann, str) else inspect.formatannotation(ann)}"
    return f"({', '.join(parts)}){ret}"


def api_markdown() -> str:
    """The generated reference of every public name, in ``__all__`` order."""
    lines = [API_BEGIN, "", "## Reference: every public name", "",
             "Everything a plugin, benchmark or script may import (`gptopt_core.__all__`), each with the module it "
             "lives in: the framework's names in `gptopt_core` itself, the kit's (engines and model I/O) in "
             "`gptopt_core.kit.<module>`. The repository's plugins import each name from that module, so a static "
             "import graph shows which core modules a plugin uses; `from gptopt_core import NAME` resolves every "
             "name too (the front third-party code may keep using, docs/contract.md). Anything else is private.", ""]
    for name in gptopt_core.__all__:
        lines += _api_entry(name, getattr(gptopt_core, name))
    return "\n".join(lines + [API_END, ""])


def python_api_markdown() -> str:
    """docs/python-api.md: the hand-written part as it is, then the generated reference."""
    text = (DOCS / "python-api.md").read_text()
    head = text.split(API_BEGIN)[0].rstrip("\n")
    return head + "\n\n" + api_markdown()


def generated() -> dict[Path, str]:
    return {DOCS / "hooks.md": hooks_markdown(), DOCS / "cli.md": cli_markdown(),
            DOCS / "python-api.md": python_api_markdown(), DOCS / "architectures.md": architectures_markdown()}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    stale = []
    for path, text in generated().items():
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)}; run python -m gptopt_core.tools.docgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
