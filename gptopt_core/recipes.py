"""Recipes: YAML files (or a run.json manifest) that replay a chain."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import GptoptError, shorten
from .version import installed_version

TOP_KEYS = {"gptopt", "model", "data", "eval_data", "seed", "device", "steps"}


#: a recipe or run.json larger than this is refused before it is parsed
MAX_RECIPE_BYTES = 4 * 1024 * 1024
#: deepest nesting of lists/mappings a recipe may have (a real one has 4: top, steps, step, params)
MAX_DEPTH = 32
#: most YAML/JSON nodes (scalars, lists, mappings) in one recipe
MAX_NODES = 100_000


#: YAML 1.1's int and float patterns without their base-60 forms: ``pattern: 2:4`` is the string "2:4", not 124
SEXAGESIMAL_FREE = {
    "tag:yaml.org,2002:int": re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
        |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    "tag:yaml.org,2002:float": re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
}


def _recipe_loader(what: str = "a recipe"):
    """A yaml SafeLoader that builds plain data only: str, int, float, bool, null, lists and mappings.

    Refused: every explicit tag (``!!binary``, ``!!python/...``, ``!!set``, even ``!!str``), anchors and aliases
    (no expansion bombs), duplicate keys (no silent "last one wins"), nesting deeper than :data:`MAX_DEPTH` and
    more than :data:`MAX_NODES` nodes. Dates stay strings (no implicit timestamps), and ``<<`` merge keys are
    plain keys.
    """
    import yaml
    from yaml.events import CollectionStartEvent

    plain = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq", "map")}

    class RecipeLoader(yaml.SafeLoader):
        yaml_implicit_resolvers = {
            first: [(tag, SEXAGESIMAL_FREE.get(tag, rx)) for tag, rx in resolvers if tag in plain]
            for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
        yaml_constructors = {tag: fn for tag, fn in yaml.SafeLoader.yaml_constructors.items() if tag in plain}

        def __init__(self, stream):
            super().__init__(stream)
            self._depth = 0
            self._nodes = 0

        def compose_node(self, parent, index):
            event = self.peek_event()
            mark = getattr(event, "start_mark", None)
            _refuse_aliases_anchors_tags(event, mark, what)
            self._nodes += 1
            if self._nodes > MAX_NODES:
                raise yaml.composer.ComposerError(None, None, f"more than {MAX_NODES} values", mark)
            nested = isinstance(event, CollectionStartEvent)
            if nested:
                self._depth += 1
                if self._depth > MAX_DEPTH:
                    raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
            try:
                return super().compose_node(parent, index)
            finally:
                if nested:
                    self._depth -= 1

        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                except TypeError:
                    raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                            key_node.start_mark) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {shorten(key, 40)!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return RecipeLoader


def _refuse_aliases_anchors_tags(event, mark, what: str = "a recipe") -> None:
    """A recipe is plain data: an alias, an anchor or an explicit tag is a yaml error at ``mark``."""
    import yaml
    from yaml.events import AliasEvent, NodeEvent

    if isinstance(event, AliasEvent):
        raise yaml.composer.ComposerError(None, None, f"aliases (*name) are not allowed in {what}", mark)
    if isinstance(event, NodeEvent) and event.anchor is not None:
        raise yaml.composer.ComposerError(None, None, f"anchors (&name) are not allowed in {what}", mark)
    if isinstance(event, NodeEvent) and event.tag is not None:
        tag = shorten(event.tag.replace("tag:yaml.org,2002:", "!!"), 40)
        raise yaml.composer.ComposerError(
            None, None, f"tags such as {tag!r} are not allowed in {what}: plain strings, numbers, booleans, null, "
            "lists and mappings only", mark)


def load_recipe_text(text: str, kind: str = "YAML", where: str = "recipe", limit: int = MAX_RECIPE_BYTES,
                     what: str = "a recipe"):
    """Parse recipe text (``kind`` YAML or JSON) into plain data with the limits of :func:`_recipe_loader`;
    raises a one-line :class:`GptoptError` that never echoes more than a few characters of the input. Every
    YAML or JSON file gptopt reads from a user goes through here (plan files and configs through
    :func:`gptopt_core.kit.inputs.load_structured_file`); ``what`` names the kind of file in messages."""
    import json

    import yaml

    if len(text) > limit:
        raise GptoptError(f"{where} is larger than {limit // 2**20} MiB; {what} is a few lines")
    try:
        if kind == "JSON":
            def no_duplicates(pairs):
                keys = [k for k, _ in pairs]
                if len(set(keys)) != len(keys):
                    dup = next(k for k in keys if keys.count(k) > 1)
                    raise ValueError(f"duplicate key {shorten(dup, 40)!r}")
                return dict(pairs)

            doc = json.loads(text, object_pairs_hook=no_duplicates)
            _check_shape(doc)
        else:
            doc = yaml.load(text, Loader=_recipe_loader(what))  # noqa: S506 -- the loader only builds plain types
    except RecursionError:
        raise GptoptError(f"{where} is not valid {kind}: nested deeper than {MAX_DEPTH} levels") from None
    except (yaml.YAMLError, ValueError) as exc:
        where_mark = getattr(exc, "problem_mark", None)
        at = f" at line {where_mark.line + 1}" if where_mark is not None else ""
        problem = getattr(exc, "problem", None) or exc
        raise GptoptError(f"{where} is not valid {kind}{at}: {shorten(problem, 240)}") from None
    return doc


def _check_shape(doc) -> None:
    """JSON counterpart of the YAML loader's limits: depth and node count."""
    stack, nodes = [(doc, 1)], 0
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise ValueError(f"more than {MAX_NODES} values")
        if isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


def _read_regular(path: Path) -> bytes:
    """The recipe's bytes, opened non-blocking and checked on the open descriptor: a recipe swapped for a FIFO or a
    device after :func:`parse_recipe`'s check is refused, not waited on (``inputs.read_input_file`` does the same
    for other files; it uses this module's loader, so it cannot be used here)."""
    import os
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise GptoptError(f"recipe {shorten(path, 200)} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_RECIPE_BYTES:
        raise GptoptError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a few lines")
    return data


def parse_recipe(path) -> dict:
    """Read a recipe YAML or a run.json; return ``{model, data, seed, ..., steps: [(name, params)]}``."""
    path = Path(path)
    try:
        if not path.is_file():
            what = "is not a regular file" if path.exists() else "does not exist"
            raise GptoptError(f"recipe {shorten(path, 200)} {what}")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise GptoptError(f"recipe {path} is larger than {MAX_RECIPE_BYTES // 2**20} MiB; a recipe is a few lines")
        text = _read_regular(path).decode("utf-8")
    except UnicodeDecodeError:
        raise GptoptError(f"recipe {path} is not UTF-8 text") from None
    except OSError as exc:
        raise GptoptError(f"recipe {shorten(path, 200)} cannot be read: {exc.strerror}") from None
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    doc = load_recipe_text(text, kind, f"recipe {path}")
    expect = {}
    if isinstance(doc, dict) and isinstance(doc.get("recipe"), dict) and "steps" in doc:
        # a run.json manifest replays its resolved recipe; its recorded hashes are checked after loading
        expect = {k: (doc.get(k) or {}).get("hash") for k in ("model", "data") if isinstance(doc.get(k), dict)}
        doc = doc["recipe"]
    recipe = normalize_recipe(doc, str(path))
    recipe["expect"] = {k: v for k, v in expect.items() if isinstance(v, str) and v}
    return recipe


def check_recipe_path(value, where: str) -> None:
    """Recipes may only write below the directory they are run from (no absolute paths, no '..'); the value is
    checked again, resolved, by :func:`gptopt_core.kit.paths.check_output_path` before anything runs."""
    p = Path(str(value))
    if not isinstance(value, str) or p.is_absolute() or ".." in p.parts or str(value).startswith("~"):
        raise GptoptError(f"{where}: '{shorten(value)}' escapes the working directory; a recipe may only write to "
                          "relative paths below it (give absolute paths on the command line instead)")


def normalize_recipe(doc, where: str = "recipe") -> dict:
    if not isinstance(doc, dict):
        raise GptoptError(f"{where}: a recipe is a mapping with keys {', '.join(sorted(TOP_KEYS))}")
    unknown = set(map(str, doc)) - TOP_KEYS
    if unknown:
        raise GptoptError(f"{where}: unknown key {shorten(sorted(unknown)[0], 40)!r}; "
                          f"allowed: {', '.join(sorted(TOP_KEYS))}")
    check_version(doc.get("gptopt"), where)
    steps_in = doc.get("steps") or []
    if not isinstance(steps_in, list):
        raise GptoptError(f"{where}: 'steps' must be a list like [{{eval: {{}}}}, {{save: {{to: out/m}}}}]")
    steps = []
    for i, item in enumerate(steps_in, 1):
        if isinstance(item, str):
            steps.append((item, {}))
        elif isinstance(item, dict) and len(item) == 1 and not isinstance(next(iter(item)), str):
            raise GptoptError(f"{where}: step {i}: step names are strings")
        elif isinstance(item, dict) and len(item) == 1:
            (name, params), = item.items()
            if params is None:
                params = {}
            if not isinstance(params, dict):
                raise GptoptError(f"{where}: step {i} '{shorten(name, 40)}' params must be a mapping, got "
                                  f"{type(params).__name__}")
            if not isinstance(name, str) or not all(isinstance(k, str) for k in params):
                raise GptoptError(f"{where}: step {i}: step names and option names are strings")
            steps.append((name, dict(params)))
        else:
            raise GptoptError(f"{where}: step {i} must be a step name or a one-key mapping {{name: {{params}}}}")
    out = {"steps": steps}
    for key, typ in (("model", str), ("data", str), ("eval_data", str), ("device", str), ("seed", int)):
        if key in doc and doc[key] is not None:
            value = doc[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise GptoptError(f"{where}: '{key}' must be an integer, got {shorten(repr(value), 40)}")
            if typ is str and not isinstance(value, str):
                raise GptoptError(f"{where}: '{key}' must be a string, got {shorten(repr(value), 40)}")
            out[key] = value
    return out


def check_version(version, where: str) -> None:
    if version is None:
        return
    def key(v):
        parts = []
        for p in str(v).split(".")[:3]:
            digits = "".join(ch for ch in p if ch.isdigit())
            parts.append(int(digits) if digits else 0)
        return tuple(parts + [0] * (3 - len(parts)))

    if key(version) > key(installed_version()):
        raise GptoptError(f"{where} was written by gptopt {version}, newer than this gptopt {installed_version()}; "
                          "upgrade gptopt to replay it")


def chain_recipe(head: dict, steps) -> dict:
    """The recipe that replays a chain: ``head`` (``gptopt``, ``model``, ``data``, ``seed``, ``device``, maybe
    ``eval_data``) and every step with every param explicit, as the steps hold them now (a step may resolve a
    param while it runs, e.g. ``quantize --plan auto`` records the plan it chose)."""
    return {**head, "steps": [{s.name: s.params_dict()} for s in steps]}
