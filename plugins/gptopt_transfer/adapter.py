"""Saving and loading a model that carries an unmerged LoRA adapter (a PEFT model): the base in the directory, the
adapter in ``adapter/`` (``PeftModel.from_pretrained``). peft is imported when a directory with an adapter loads."""
from __future__ import annotations

from pathlib import Path

from gptopt_core import SourceError
from gptopt_core.kit.models import load_local_dir
from gptopt_core.kit.sensitivity import replace_module


def is_peft_model(model) -> bool:
    return type(model).__module__.split(".")[0] == "peft"


def save_with_adapter(ctx, model, path) -> None:
    """The base model (LoRA layers swapped out) in ``path``, saved by whichever plugin saves such a base (e.g. a
    4-bit one), and the adapter in ``path/adapter``."""
    base = model.get_base_model()
    with WithoutLoraLayers(base):
        ctx.hook.gptopt_save_model(ctx=ctx, model=base, path=path)
    model.save_pretrained(str(path / "adapter"), safe_serialization=True)


def _is_lora_layer(module) -> bool:
    return hasattr(module, "base_layer") and hasattr(module, "lora_A")


class WithoutLoraLayers:
    """Temporarily put each PEFT-wrapped layer's innermost ``base_layer`` back in its place (nothing is merged).
    peft nests its wrappers of parameters (``lora --experts include``: one per fused expert parameter of a module),
    so a wrapper inside a wrapper already swapped out goes with it."""

    def __init__(self, model):
        self.model, self.swapped = model, []

    def __enter__(self):
        done = []
        for name, module in list(self.model.named_modules()):
            if not _is_lora_layer(module) or any(name.startswith(d + ".") for d in done):
                continue
            inner = module.base_layer
            while _is_lora_layer(inner):
                inner = inner.base_layer
            self.swapped.append((name, replace_module(self.model, name, inner)))
            done.append(name)
        return self.model

    def __exit__(self, *exc):
        for name, module in reversed(self.swapped):
            replace_module(self.model, name, module)
        return False


def load_with_adapter(spec: str, options: dict):
    """A :class:`gptopt_core.LoadedModel` for a directory ``save`` wrote after an unmerged ``lora`` (the base, then
    its ``adapter/``; fact ``adapter``), or ``None`` for any other spec."""
    path = Path(spec).expanduser()
    if not (path / "adapter" / "adapter_config.json").is_file() or not (path / "config.json").is_file():
        return None
    loaded = load_local_dir(path, options)
    try:
        import peft

        loaded.model = peft.PeftModel.from_pretrained(loaded.model, str(path / "adapter"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SourceError(f"cannot load the LoRA adapter in {path / 'adapter'}: {exc}"[:300]) from None
    loaded.model.eval()
    loaded.facts = set(loaded.facts) | {"adapter"}
    return loaded
