"""The installed gptopt version (recorded in run.json and recipes, compared when one is replayed)."""
from __future__ import annotations

import importlib.metadata


def installed_version() -> str:
    """The version of the installed ``gptopt`` distribution (``"0.0.0"`` when it is not installed)."""
    try:
        return importlib.metadata.version("gptopt")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"
