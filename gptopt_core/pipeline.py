"""Pipeline: validate the whole chain first (params and ordering), then run it and record every step."""
from __future__ import annotations

import copy
import json
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .kit.checkpoints import chain_of, check_resumable, write_chain
from .context import RunContext, main_process
from .kit.data import TextData
from .errors import GptoptError, PlanError, StepFailed, user_error
from .kit.models import content_hash, max_positions
from .kit.paths import LOCK_NAME, RunLock, check_output_path, check_path_lengths
from .plugins import get_plugins
from .recipes import chain_recipe, check_recipe_path, normalize_recipe, parse_recipe
from .report import finish_run, step_line
from .steps import find_fact
from .version import installed_version


@dataclass
class RunResult:
    model: Any
    tokenizer: Any
    records: list
    ctx: Any
    manifest: dict


class Pipeline:
    """A chain of steps over one model.

    >>> Pipeline(model="tiny-random-gpt2", seed=0).add("eval").add("save", to="out/m").run()

    The same chain can come from the CLI (``gptopt run ...``) or a recipe (:meth:`from_recipe`); all three
    validate through the same step schemas.
    """

    def __init__(self, model: str = "smollm2-135m", data: str = "builtin:pydoc", seed: int = 0,
                 device: str = "auto", out: str | Path | None = None, eval_data: str | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False, quiet: bool = False,
                 resume: bool = False, plugins=None):
        if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda:"):
            raise GptoptError(f"--device must be auto, cpu or cuda, got '{device}'")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise GptoptError(f"--seed must be an integer from 0 to {MAX_SEED} (2**32-1), got {seed!r}"[:200])
        self.model_spec, self.data_spec, self.seed, self.device = model, data, seed, device
        self.eval_data_spec = eval_data
        self.out = Path(out) if out else None
        self.allow_pickle, self.trust_remote_code, self.quiet = allow_pickle, trust_remote_code, quiet
        self.resume = bool(resume)
        self.plugins = plugins or get_plugins()
        self.steps: list = []
        self.expect: dict = {}  # hashes recorded by a replayed run.json
        #: a directory every output path must resolve into (set for recipes and replayed run.json files)
        self.confine_to: Path | None = None

    # -- building -------------------------------------------------------------------------------------
    def add(self, name: str, /, **params) -> "Pipeline":
        """Append a step by name; its params are validated now (raises :class:`gptopt_core.ParamsError`)."""
        step = self.plugins.step_class(name)(**params)
        step.plugins = self.plugins
        self.steps.append(step)
        return self

    @classmethod
    def from_recipe(cls, path, **overrides) -> "Pipeline":
        return cls.from_dict(parse_recipe(path), where=str(path), **overrides)

    @classmethod
    def from_dict(cls, recipe: dict, where: str = "recipe", **overrides) -> "Pipeline":
        """A pipeline from a parsed recipe (see :func:`gptopt_core.recipes.normalize_recipe`)."""
        if "steps" not in recipe or (recipe["steps"] and not isinstance(recipe["steps"][0], tuple)):
            recipe = {**normalize_recipe(recipe, where), "expect": recipe.get("expect", {})}
        kwargs = {k: recipe[k] for k in ("model", "data", "seed", "device", "eval_data") if k in recipe}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        pipe = cls(**kwargs)
        pipe.expect = dict(recipe.get("expect") or {})
        pipe.confine_to = Path.cwd()  # checked on the validated, resolved values in validate()
        for i, (name, params) in enumerate(recipe["steps"], 1):
            pipe.add(name, **params)
            for key in pipe.steps[-1].path_params:
                if params.get(key) is not None:
                    check_recipe_path(params[key], f"{where}: step {i} '{name}' {key}")
        return pipe

    def recipe(self) -> dict:
        """The resolved recipe (every param explicit): replaying it gives the same chain."""
        return chain_recipe(self.recipe_head(), self.steps)

    def recipe_head(self) -> dict:
        """The recipe's keys other than ``steps``: the run's inputs as given."""
        head = {"gptopt": installed_version(), "model": self.model_spec, "data": self.data_spec, "seed": self.seed,
                "device": self.device}
        return {**head, "eval_data": self.eval_data_spec} if self.eval_data_spec else head

    # -- validation -----------------------------------------------------------------------------------
    def validate(self, facts: set | None = None) -> None:
        """Walk the plan with fact sets alone; raises :class:`PlanError` naming the step and a working order."""
        if not self.steps:
            raise PlanError("no steps given; e.g. `gptopt run eval` (see `gptopt steps`)")
        self.check_outputs()
        facts = set(facts or ())
        for i, step in enumerate(self.steps):
            where = f"step {i + 1} '{step.name}'"
            step.plugins = self.plugins  # the registry a step's check_plan consults (e.g. save's formats)
            for pattern, reason in step.forbidden_facts().items():
                fact = find_fact(pattern, facts)
                if fact:
                    by = next((s.name for s in reversed(self.steps[:i]) if fact in s.next_facts(set())), "the model")
                    raise PlanError(f"{where} cannot run after {by}: the model is {fact} ({reason})")
            for pattern, hint in step.required_facts().items():
                if not find_fact(pattern, facts):
                    raise PlanError(f"{where} needs {pattern}: {hint}")
            try:
                step.check_plan(self.steps[:i], self.steps[i + 1:], facts)
            except PlanError:
                raise
            except GptoptError as exc:  # the contract says PlanError; a plugin's plain GptoptError reads the same
                raise PlanError(str(exc)) from exc
            facts = step.next_facts(facts)
            if getattr(step.params, "checkpoint_every", 0) and self.out is None:
                raise PlanError(f"{where}: --checkpoint-every needs `gptopt run --out DIR` (checkpoints go to "
                                "DIR/checkpoints)")

    def resolve_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise GptoptError("--device cuda asked for, but no CUDA GPU is available here; use --device cpu or auto")
        return torch.device(self.device)

    def output_paths(self):
        """``(where, value, step)`` for ``--out`` and every path param of every step (as validated)."""
        if self.out is not None:
            yield "--out", self.out, None
        for i, step in enumerate(self.steps, 1):
            for key in step.path_params:
                value = getattr(step.params, key, None)
                for v in (value if isinstance(value, (list, tuple)) else [value]):
                    if v is not None:
                        yield f"step {i} '{step.name}' --{key.replace('_', '-')}", v, step

    def check_outputs(self) -> None:
        """Every output location, resolved (symlinks followed), checked by :func:`gptopt_core.kit.paths.check_output_path`
        before anything loads: writable, not a file or a dangling symlink, inside the working directory for
        recipes, not written by two steps, not the run's own ``--out``."""
        seen = {}
        for where, value, step in self.output_paths():
            overwrite = step is not None and bool(getattr(step.params, "overwrite", False)
                                                  or getattr(step, "replace_on_resume", False))
            protect = [self.out] if step is not None else []
            # a step's ``file_params`` (a subset of its ``path_params``) name one file each, not a directory
            is_file = step is not None and any(value == getattr(step.params, key, None)
                                               for key in getattr(step, "file_params", ()))
            resolved = check_output_path(value, where, confine_to=self.confine_to if step is not None else None,
                                         overwrite=overwrite, protect=protect, file=is_file,
                                         temporary=step is not None)
            if resolved in seen:
                raise PlanError(f"{where} writes {resolved}, as {seen[resolved]} does; give each its own path")
            seen[resolved] = where

    def check_inputs(self) -> None:
        """Input specs that are paths: a component too long for the file system is named before any loading."""
        for where, spec in (("--model", self.model_spec), ("--data", self.data_spec),
                            ("--eval-data", self.eval_data_spec)):
            if isinstance(spec, str):
                check_path_lengths(spec, where)

    def check_out_dir(self) -> None:
        if self.resume:
            check_resumable(self.out, self.recipe())
            self.mark_resumed_outputs()
            return
        if self.out is not None and self.out.exists() and (  # a lock counts as empty only as a regular file
                not self.out.is_dir() or any(p.name != LOCK_NAME or p.is_symlink() or not p.is_file()
                                             for p in self.out.iterdir())):
            raise GptoptError(f"--out {self.out} exists and is not empty; choose a new directory or remove it")

    def mark_resumed_outputs(self) -> None:
        """On ``--resume``, a step's output directory that the interrupted run already wrote (its run.json
        records this same chain) may be replaced: the replayed chain writes it again."""
        now = json.loads(json.dumps(chain_of(self.recipe())))
        for _, value, step in self.output_paths():
            manifest = Path(value).expanduser() / "run.json"
            if step is None or not manifest.is_file():
                continue
            try:
                recorded = json.loads(manifest.read_text())["recipe"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if isinstance(recorded, dict) and chain_of(recorded) == now:
                step.replace_on_resume = True

    # -- running --------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        """Validate the chain and every output location, lock ``--out``, load, run each step, record."""
        if self.resume:
            self.check_out_dir()  # marks outputs the interrupted run wrote, before validate() checks them
        self.validate()
        self.check_out_dir()
        self.check_inputs()
        lock = None
        if self.out is not None and _is_main_process():
            lock = RunLock(self.out).acquire()
        try:
            self.check_out_dir()  # again, under the lock: a run that started meanwhile has written here
            return self._run()
        finally:
            if lock is not None:
                lock.release()

    def prepare(self) -> RunContext:
        """Load the data and the model and return the run's context as the first step finds it (no step runs):
        the chain validated against the loaded model's facts, positions checked, seeds set, the manifest's inputs
        recorded. :meth:`run` starts with it; :func:`gptopt_core.make_context` is it with no steps."""
        from rich.console import Console

        data = TextData.load(self.data_spec)
        eval_data = TextData.load(self.eval_data_spec) if self.eval_data_spec else None
        device = self.resolve_device()
        console = Console(stderr=True, quiet=self.quiet)
        loaded = self.load_model(device)
        for d in (data, eval_data):
            if d is not None:
                d.tokenizer = loaded.tokenizer
        if self.steps:
            self.validate(loaded.facts)
        self.check_positions(loaded.model)
        seed_everything(self.seed)
        original = copy.deepcopy(loaded.model) if any(s.wants_original_model() for s in self.steps) else None
        manifest = {"model": {"spec": self.model_spec, "source": loaded.source, "hash": content_hash(loaded.model)},
                    "data": {"spec": self.data_spec, "hash": data.content_hash(),
                             "train_tokens": int(data.train_ids.numel()), "valid_tokens": int(data.valid_ids.numel())},
                    "device": str(device)}
        ctx = RunContext(model=loaded.model, tokenizer=loaded.tokenizer, device=device, data=data, seed=self.seed,
                         facts=set(loaded.facts), out_dir=self.out, plugins=self.plugins, console=console,
                         model_spec=self.model_spec, data_spec=self.data_spec, eval_data=eval_data,
                         quiet=self.quiet, resume=self.resume, steps=tuple(self.steps), recipe_head=self.recipe_head(),
                         manifest=manifest, _original_state=original)
        manifest["loaded"] = self.collect_metrics(ctx)
        self.warn_on_changed_inputs(ctx)
        return ctx

    def _run(self) -> RunResult:
        ctx = self.prepare()
        for step in self.steps:
            step.preflight(ctx)
        if self.out is not None and not self.resume and any(getattr(s.params, "checkpoint_every", 0)
                                                            for s in self.steps):
            write_chain(self.out, self.recipe())
        ctx.log(f"[bold]gptopt[/] {self.model_spec} on {ctx.device}: {len(self.steps)} step(s)")
        error = None
        try:
            for i, step in enumerate(self.steps):
                ctx.step_index = i
                record = self.run_step(ctx, step)
                ctx.log(step_line(i, len(self.steps), record, ctx))
        except BaseException as exc:
            error = exc
            raise
        finally:
            manifest = finish_run(ctx, error)
        return RunResult(ctx.model, ctx.tokenizer, ctx.records, ctx, manifest)

    def check_positions(self, model) -> None:
        """Token lengths a step feeds the model at once (its :attr:`~gptopt_core.Step.position_params`) must fit
        the model's positions; checked once the model is known, before the first step runs."""
        limit = max_positions(model)
        if limit is None:
            return
        for i, step in enumerate(self.steps, 1):
            for key in step.position_params:
                value = getattr(step.params, key, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > limit:
                    raise GptoptError(f"step {i} '{step.name}': --{key.replace('_', '-')} {value} is longer than the "
                                      f"model's {limit} positions; use at most {limit}")

    def warn_on_changed_inputs(self, ctx) -> None:
        for key in ("model", "data"):
            recorded, now = self.expect.get(key), ctx.manifest[key]["hash"]
            if recorded and recorded != now:
                warnings.warn(f"REPLAY MISMATCH: the {key} '{ctx.manifest[key]['spec']}' has hash {now[:12]}, but the "
                              f"replayed run.json recorded {recorded[:12]}: results will differ from that run",
                              UserWarning, stacklevel=2)
                ctx.manifest[key]["recorded_hash"] = recorded

    def load_model(self, device):
        options = {"device": str(device), "allow_pickle": self.allow_pickle,
                   "trust_remote_code": self.trust_remote_code}
        loaded = self.plugins.hook.gptopt_resolve_model(spec=self.model_spec, options=options)
        if loaded is None:
            raise GptoptError(f"no model source understands '{self.model_spec}'")
        from .kit.model_files import check_finite

        check_finite(loaded.model, f"--model {str(self.model_spec)[:160]}")  # every source: NaN/inf is exit 2
        if not loaded.facts:
            loaded.model.to(device)
        return loaded

    def collect_metrics(self, ctx) -> dict:
        metrics = {}
        for part in self.plugins.hook.gptopt_collect_metrics(ctx=ctx):
            if part:
                metrics.update(part)
        return metrics

    def run_step(self, ctx, step) -> dict:
        record = {"name": step.name, "plugin": step.plugin, "params": step.params_dict(), "status": "running"}
        ctx.records.append(record)
        self.plugins.hook.gptopt_step_started(ctx=ctx, step=step)
        start = time.perf_counter()
        try:
            metrics = step.apply(ctx) or {}
        except GptoptError as exc:
            record.update(status="failed", error=str(exc), seconds=round(time.perf_counter() - start, 3))
            raise
        except KeyboardInterrupt:
            record.update(status="interrupted", seconds=round(time.perf_counter() - start, 3))
            raise
        except Exception as exc:
            mapped = user_error(exc)  # e.g. a disk that filled up or turned read-only mid-run: exit 2
            record.update(status="failed", error=str(mapped) if mapped else f"{type(exc).__name__}: {exc}",
                          seconds=round(time.perf_counter() - start, 3))
            if mapped is not None:
                raise GptoptError(f"step '{step.name}': {mapped}") from exc
            raise StepFailed(step.name, step.plugin, exc) from exc
        record["seconds"] = round(time.perf_counter() - start, 3)
        ctx.facts = step.next_facts(ctx.facts)
        record["metrics"] = {**metrics, **self.collect_metrics(ctx)}
        record["facts"] = sorted(ctx.facts)
        record["status"] = "ok"
        self.plugins.hook.gptopt_step_finished(ctx=ctx, step=step, record=record)
        return record


MAX_SEED = 2**32 - 1  # numpy's and torch's seeding limit


def _is_main_process() -> bool:
    return main_process()


def seed_everything(seed: int) -> None:
    """Seed Python's, torch's and (when installed) numpy's random generators."""
    import torch

    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:
        pass


