"""The ``gptopt`` command: ``run`` (a click chain built from the step schemas), ``steps``, ``plugins``."""
from __future__ import annotations

import json
import os
import sys
import typing
import warnings
from dataclasses import asdict

import click

from .errors import MAX_MESSAGE, GptoptError, StepFailed, Terminated, safe_text, shorten, user_error
from .kit.models import cache_dir
from .pipeline import Pipeline
from .plugins import PluginHookError, get_plugins

RUN_OPTIONS = ("model", "data", "eval_data", "seed", "device", "out")


def _annotation_info(annotation):
    """(is_bool, is_list, choices) for a pydantic field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and type(None) in args):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _annotation_info(non_none[0])
    if annotation is bool:
        return True, False, None
    if origin in (list, tuple, set, frozenset):
        return False, True, None
    if origin is typing.Literal:
        return False, False, [str(a) for a in args]
    return False, False, None


def option_specs(step_cls):
    """One dict per param: the single source for CLI options and the `steps` listing."""
    import pydantic_core

    specs = []
    for name, field in step_cls.Params.model_fields.items():
        is_bool, is_list, choices = _annotation_info(field.annotation)
        flag = "--" + name.replace("_", "-")
        if field.default_factory is not None:
            default = field.get_default(call_default_factory=True)
        else:
            default = None if field.default is pydantic_core.PydanticUndefined else field.default
        help_text = field.description or ""
        if choices:
            help_text += f" [{'|'.join(choices)}]"
        if field.is_required():
            help_text += " [required]"
        elif default not in (None, [], ()):
            shown = ", ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            help_text += f" [default: {shown}]"
        specs.append({"name": name, "flag": flag, "bool": is_bool, "multiple": is_list, "choices": choices,
                      "default": default, "required": field.is_required(), "help": help_text.strip()})
    return specs


def make_step_command(step_cls):
    params = []
    for spec in option_specs(step_cls):
        if spec["bool"]:
            decl = f"{spec['flag']}/--no-{spec['flag'][2:]}"
            params.append(click.Option([decl, spec["name"]], default=None, help=spec["help"]))
        else:
            params.append(click.Option([spec["flag"], spec["name"]], multiple=spec["multiple"], default=None,
                                       help=spec["help"], metavar="VALUE" if not spec["choices"] else
                                       "[" + "|".join(spec["choices"]) + "]"))

    def callback(**kwargs):
        given = {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()
                 if v is not None and v != ()}
        step_cls(**given)  # validate now: errors name the step before the rest of the chain parses
        return step_cls.name, given

    return click.Command(step_cls.name, params=params, callback=callback, help=step_cls.__doc__,
                         short_help=step_cls.summary())


class StepChain(click.Group):
    """Chain group whose commands are the registered steps, loaded only when needed (fast --help)."""

    def list_commands(self, ctx):
        return sorted(get_plugins().steps)

    def get_command(self, ctx, name):
        step_cls = get_plugins().steps.get(name)
        return make_step_command(step_cls) if step_cls else None

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if self.get_command(ctx, name) is None and not name.startswith("-"):
            known = ", ".join(sorted(get_plugins().steps))
            raise click.UsageError(f"unknown step '{name}'; known steps: {known} (see `gptopt steps`)")
        return super().resolve_command(ctx, args)


@click.group()
@click.version_option(package_name="gptopt")
def cli():
    """gptopt: make GPT-style language models smaller, faster and cheaper.

    Chain optimization steps over a Hugging Face causal LM:

        gptopt run --model smollm2-135m eval quantize --bits 4 eval save --to out/m
    """


@cli.group(cls=StepChain, chain=True, invoke_without_command=True,
           subcommand_metavar="STEP [OPTIONS] [STEP [OPTIONS]]...")
@click.option("--model", help="model: local dir, .gguf file, hub id, smollm2-135m, tiny-random-<family> "
              "(tiny-random-llama, -qwen3, -gemma3, -gpt2, ...: docs/architectures.md) [default: smollm2-135m]")
@click.option("--data", help="text: builtin:pydoc, builtin:stdlib-docs, a .txt/.jsonl/.csv/.parquet file, or a hub "
              "dataset [default: builtin:pydoc]")
@click.option("--eval-data", help="a second text whose held-out split `eval --split eval-data` scores")
@click.option("--device", help="auto, cpu or cuda [default: auto]")
@click.option("--seed", type=str, help="random seed [default: 0]")
@click.option("--out", help="directory for run.json, report.md and plots (must not exist or be empty)")
@click.option("--recipe", help="replay a recipe YAML or a run.json manifest")
@click.option("--resume", is_flag=True, help="continue an interrupted run in --out from its training checkpoints "
              "(the same command again, plus --resume)")
@click.option("--allow-pickle", is_flag=True, help="allow .bin/.pt pickle weights (loaded with weights_only=True)")
@click.option("--trust-remote-code", is_flag=True, help="allow model code from the hub (off by default)")
@click.option("--quiet", "-q", is_flag=True, help="no progress bars or summary")
def run(**options):
    """Run a chain of steps: each STEP takes its own options (`gptopt steps NAME`)."""


@run.result_callback()
def run_chain(steps, **options):
    seed = options.get("seed")
    if seed is not None:
        try:
            seed = int(seed)
        except ValueError:
            raise GptoptError(f"--seed must be an integer, got '{shorten(seed, 40)}'") from None
    if options["quiet"]:
        _quiet_libraries()
    common = {"model": options.get("model"), "data": options.get("data"), "eval_data": options.get("eval_data"),
              "seed": seed, "device": options.get("device"), "out": options.get("out"),
              "allow_pickle": options["allow_pickle"], "trust_remote_code": options["trust_remote_code"],
              "quiet": options["quiet"], "resume": options["resume"]}
    if options.get("recipe"):
        if steps:
            raise GptoptError("give steps either on the command line or in --recipe, not both")
        pipe = Pipeline.from_recipe(options["recipe"], **common)
    else:
        if not steps:
            raise GptoptError("no steps given; e.g. `gptopt run --model tiny-random-gpt2 eval` (see `gptopt steps`)")
        pipe = Pipeline(**{k: v for k, v in common.items() if v is not None})
        for name, params in steps:
            pipe.add(name, **params)
    pipe.run()


@cli.command()
@click.argument("name", required=False)
def steps(name):
    """List the steps, or show one step's options (the same schema as CLI, recipes and Python)."""
    plugins = get_plugins()
    if name is None:
        width = max((len(n) for n in plugins.steps), default=4)
        for step_name in sorted(plugins.steps):
            cls = plugins.steps[step_name]
            click.echo(f"{step_name.ljust(width)}  {cls.summary()}  ({cls.plugin})")
        return
    cls = plugins.step_class(name)
    click.echo(f"{name}: {(cls.__doc__ or '').strip()}\nplugin: {cls.plugin}\n")
    for spec in option_specs(cls):
        flag = f"{spec['flag']}/--no-{spec['flag'][2:]}" if spec["bool"] else spec["flag"]
        click.echo(f"  {flag}{' (repeatable)' if spec['multiple'] else ''}\n      {spec['help']}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def plugins(as_json):
    """List installed plugins: distribution, version, steps, save formats, hooks and load errors."""
    infos = get_plugins().listing()
    if as_json:
        click.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    for i in infos:
        head = f"{i.name}  ({i.distribution or '?'} {i.version or ''})".rstrip()
        head += f"  (renamed: now {i.renamed_to})" if i.renamed_to else ""
        click.echo(head)
        if i.error:
            click.echo(f"    ERROR: {i.error}")
        if i.warning:
            click.echo(f"    WARNING: {i.warning}")
        if i.steps:
            click.echo(f"    steps: {', '.join(i.steps)}")
        if i.save_formats:
            click.echo(f"    save formats: {', '.join(i.save_formats)}")
        if set(i.writers) - set(i.save_formats):  # file writers: export --format values
            click.echo(f"    export formats: {', '.join(n for n in i.writers if n not in i.save_formats)}")
        if i.columns:
            click.echo(f"    columns: {', '.join(i.columns)}")
        if i.observers:
            click.echo(f"    observers: {', '.join(i.observers)}")
        if i.vocabulary:
            click.echo(f"    vocabulary: {', '.join(i.vocabulary)}")
        if i.hooks:
            click.echo(f"    hooks: {', '.join(i.hooks)}")


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"Warning: {safe_text(message)}", file=sys.stderr)


def _quiet_import_noise() -> None:
    """transformers imports torchao when it is installed (the `cpu` extra); torchao 0.18 then logs warnings
    about its CUDA-only kernels and torch about its Enum registrations on every command. Neither is actionable."""
    import logging

    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # bitsandbytes logs "MatMul8bitLt: inputs will be cast ... to float16" on every int8 layer call (~100 lines for
    # one eval of a reloaded int8 model): not actionable
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def _quiet_libraries() -> None:
    """``-q``: no library progress bars (transformers' "Loading weights", "Writing model shards") and only errors
    from the libraries' loggers. Environment first (read when the libraries import), then the loaded ones."""
    import logging

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars (transformers' GGUF conversion); read at its import
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("bitsandbytes", "transformers", "accelerate", "peft", "huggingface_hub", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def _caches_under_gptopt_cache() -> None:
    """torch's inductor (imported with torchao by transformers, used by cpu-fast --compile) keeps its cache in
    $TMPDIR/torchinductor_USER by default; a run writes only to --out, --to and GPTOPT_CACHE, so it goes there
    (unless TORCHINDUCTOR_CACHE_DIR is set)."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "torchinductor")


#: signals that unwind like Ctrl-C (SIGHUP: the terminal or ssh session went away)
TERMINATING = ("SIGTERM", "SIGHUP")


def _terminate_like_ctrl_c() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C: temporary directories are removed, run.json says "interrupted" and
    one line is printed. A second such signal during that cleanup kills at once."""
    import signal

    def handler(signum, frame):
        for name in TERMINATING:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
        raise Terminated(signum)

    for name in TERMINATING:
        if hasattr(signal, name):
            try:
                signal.signal(getattr(signal, name), handler)
            except ValueError:  # not the main thread (main() called from a worker thread): leave the default
                pass


def _terminated(exc) -> None:
    print(f"Error: terminated ({exc.signame}); partial output was removed", file=sys.stderr)
    sys.exit(128 + exc.signum)


def main(argv=None):
    """Console entry point: user errors are one line on stderr and exit code 2, never a traceback."""
    warnings.showwarning = _one_line_warning
    _terminate_like_ctrl_c()
    _caches_under_gptopt_cache()
    debug = os.environ.get("GPTOPT_DEBUG") == "1"
    if not debug:
        _quiet_import_noise()
    try:
        cli.main(args=argv, prog_name="gptopt", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        if isinstance(exc.__cause__, Terminated):  # click wraps KeyboardInterrupt (and so SIGTERM) in Abort
            _terminated(exc.__cause__)
        print("Error: aborted", file=sys.stderr)
        sys.exit(130)
    except click.UsageError as exc:
        print(f"Error: {safe_text(exc.format_message(), MAX_MESSAGE)}", file=sys.stderr)
        sys.exit(2)
    except GptoptError as exc:
        if debug:
            raise
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)
    except (StepFailed, PluginHookError) as exc:
        if debug:
            raise
        text = safe_text(exc, MAX_MESSAGE)  # a plugin's text: one line, no raw control characters
        print(f"Error: {text} (GPTOPT_DEBUG=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
    except Terminated as exc:
        _terminated(exc)
    except KeyboardInterrupt:
        print("Error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        if debug:
            raise
        mapped = user_error(exc)  # the one place a user-caused fault (long name, read-only disk...) becomes exit 2
        if mapped is not None:
            print(f"Error: {mapped}", file=sys.stderr)
            sys.exit(2)
        text = safe_text(exc, MAX_MESSAGE)
        print(f"Error: internal error: {type(exc).__name__}: {text} (GPTOPT_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        sys.exit(1)
