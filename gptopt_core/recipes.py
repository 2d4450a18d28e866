"""Recipes: YAML files (or a run.json manifest) that replay a chain."""
from __future__ import annotations

from pathlib import Path

from .errors import GptoptError

TOP_KEYS = {"gptopt", "model", "data", "eval_data", "seed", "device", "steps"}


def parse_recipe(path) -> dict:
    """Read a recipe YAML or a run.json; return ``{model, data, seed, ..., steps: [(name, params)]}``."""
    import json

    import yaml

    path = Path(path)
    if not path.is_file():
        raise GptoptError(f"recipe {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise GptoptError(f"recipe {path} is not UTF-8 text") from None
    except (yaml.YAMLError, ValueError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise GptoptError(f"recipe {path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}{at}: "
                          f"{getattr(exc, 'problem', None) or exc}") from None
    expect = {}
    if isinstance(doc, dict) and isinstance(doc.get("recipe"), dict) and "steps" in doc:
        # a run.json manifest replays its resolved recipe; its recorded hashes are checked after loading
        expect = {k: (doc.get(k) or {}).get("hash") for k in ("model", "data") if isinstance(doc.get(k), dict)}
        doc = doc["recipe"]
    recipe = normalize_recipe(doc, str(path))
    recipe["expect"] = {k: v for k, v in expect.items() if v}
    return recipe


def check_recipe_path(value, where: str) -> None:
    """Recipes may only write below the directory they are run from (no absolute paths, no '..')."""
    p = Path(str(value))
    if p.is_absolute() or ".." in p.parts or str(value).startswith("~"):
        raise GptoptError(f"{where}: '{value}' escapes the working directory; a recipe may only write to relative "
                          "paths below it (give absolute paths on the command line instead)")


def normalize_recipe(doc, where: str = "recipe") -> dict:
    if not isinstance(doc, dict):
        raise GptoptError(f"{where}: a recipe is a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = set(map(str, doc)) - TOP_KEYS
    if unknown:
        raise GptoptError(f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(sorted(TOP_KEYS))}")
    check_version(doc.get("gptopt"), where)
    steps_in = doc.get("steps") or []
    if not isinstance(steps_in, list):
        raise GptoptError(f"{where}: 'steps' must be a list like [{{eval: {{}}}}, {{save: {{to: out/m}}}}]")
    steps = []
    for i, item in enumerate(steps_in, 1):
        if isinstance(item, str):
            steps.append((item, {}))
        elif isinstance(item, dict) and len(item) == 1:
            (name, params), = item.items()
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise GptoptError(f"{where}: step {i} '{name}' params must be a mapping, got {type(params).__name__}")
            steps.append((str(name), {str(k): v for k, v in params.items()}))
        else:
            raise GptoptError(f"{where}: step {i} must be a step name or a one-key mapping {{name: {{params}}}}")
    out = {"steps": steps}
    for key, typ in (("model", str), ("data", str), ("eval_data", str), ("device", str), ("seed", int)):
        if key in doc and doc[key] is not None:
            value = doc[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise GptoptError(f"{where}: '{key}' must be an integer, got {value!r}")
            if typ is str and not isinstance(value, str):
                raise GptoptError(f"{where}: '{key}' must be a string, got {value!r}")
            out[key] = value
    return out


def check_version(version, where: str) -> None:
    if version is None:
        return
    from .plugins import _version

    def key(v):
        parts = []
        for p in str(v).split(".")[:3]:
            digits = "".join(ch for ch in p if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts + [0] * (3 - len(parts)))

    if key(version) > key(_version()):
        raise GptoptError(f"{where} was written by gptopt {version}, newer than this gptopt {_version()}; "
                          "upgrade gptopt to replay it")
