"""Generate docs/cli.md (from the step schemas) and docs/hooks.md (from the hookspec docstrings).

    python -m gptopt_core.docgen          # rewrite both files
    python -m gptopt_core.docgen --check  # exit 1 if they drifted from the code (the test suite does this)

Only the steps of the ``gptopt`` distribution itself are documented (third-party plugins document their own).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

from . import hookspecs

DOCS = Path(__file__).resolve().parents[1] / "docs"


def hook_names() -> list[str]:
    return [n for n, f in vars(hookspecs).items() if n.startswith("gptopt_") and callable(f)]


def _signature(fn) -> str:
    """``name(arg: Type, ...) -> Type`` from the hookspec's annotations, as written (they are strings)."""
    sig = inspect.signature(fn)
    args = ", ".join(p.name if p.annotation is p.empty else f"{p.name}: {p.annotation}"
                     for p in sig.parameters.values())
    ret = "" if sig.return_annotation is sig.empty else f" -> {sig.return_annotation}"
    return f"{fn.__name__}({args}){ret}"


def hooks_markdown() -> str:
    lines = ["# Hook reference", "",
             "Generated from `gptopt_core/hookspecs.py` by `python -m gptopt_core.docgen`; do not edit by hand.", "",
             inspect.cleandoc(hookspecs.__doc__ or ""), ""]
    for name in hook_names():
        fn = getattr(hookspecs, name)
        opts = getattr(fn, "gptopt_spec", {}) or {}
        sig = _signature(fn)
        kind = " (firstresult)" if opts.get("firstresult") else ""
        lines += [f"## `{sig}`{kind}", "", inspect.cleandoc(fn.__doc__ or ""), ""]
    return "\n".join(lines)


def cli_markdown() -> str:
    from .cli import option_specs, run
    from .plugins import get_plugins

    plugins = get_plugins()
    lines = ["# CLI reference", "",
             "Generated from the step params schemas by `python -m gptopt_core.docgen`; do not edit by hand. The same",
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


def generated() -> dict[Path, str]:
    return {DOCS / "hooks.md": hooks_markdown(), DOCS / "cli.md": cli_markdown()}


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
        print(f"stale: {', '.join(stale)}; run python -m gptopt_core.docgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
