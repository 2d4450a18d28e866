"""Replace the measured block between two HTML-comment markers in a doc (appended when the markers are absent)."""
from __future__ import annotations

import re
from pathlib import Path


def write_block(doc: Path, start: str, end: str, block: str, before: str | None = None) -> None:
    """``block`` must begin with ``start`` and end with ``end``; ``before`` is an anchor to insert it ahead of."""
    text = doc.read_text() if doc.exists() else ""
    if start in text and end in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    elif before and before in text:
        text = text.replace(before, block + "\n\n" + before)
    else:
        text += "\n" + block + "\n"
    doc.write_text(text)
    print(f"wrote {doc}")
