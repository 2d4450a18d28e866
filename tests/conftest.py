import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
#: a script whose save hangs (tests that interrupt a save run it: see its docstring)
SLOW_SAVE = str(ROOT / "tests" / "slow_save.py")


def gptopt_exe():
    exe = Path(sys.executable).with_name("gptopt")
    return str(exe) if exe.exists() else shutil.which("gptopt")


def run_gptopt(*args, cwd=None, env=None, timeout=600):
    """Run the real `gptopt` console script as a user would."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run([gptopt_exe(), *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def error_lines(stderr: str):
    """stderr lines other than progress/warning noise."""
    return [l for l in stderr.splitlines() if l.strip() and not l.startswith("Warning:")]


@pytest.fixture
def cli():
    return run_gptopt


@pytest.fixture(scope="session")
def example_plugins(tmp_path_factory):
    """The example third-party plugins from docs/examples, really pip-installed into a target dir."""
    target = tmp_path_factory.mktemp("plugins")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(ROOT / "docs/examples/gptopt-hello"), str(ROOT / "docs/examples/gptopt-broken")],
                   check=True, capture_output=True)
    return target


def reset_peak_memory() -> float:
    """Reset this process's peak-RSS mark to its current RSS (Linux ``/proc/self/clear_refs`` 5) and return that
    RSS in MB: :func:`peak_memory_mb` after a case is then the case's own peak, whatever earlier tests used (the
    process-lifetime ``ru_maxrss`` measures nothing once an earlier test raised it)."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def peak_memory_mb() -> float:
    """This process's peak RSS (``VmHWM``) since the last :func:`reset_peak_memory`, in MB."""
    return _status_mb("VmHWM")


def _status_mb(key: str) -> float:
    import re

    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024

