"""Example plugin that changes a model's module structure: ``lowrank`` replaces linear layers by two smaller ones
(truncated SVD), and the plugin saves and reloads such a model.

Why a plugin that changes the structure needs a writer and a model source: ``save_pretrained`` writes the new
layers' weights under new names, but a plain ``from_pretrained`` builds the original architecture, ignores those
names and gives the original layers random weights, silently. The convention:

* a directory writer (``gptopt_register_writers``) chosen by a fact the step provides (here ``lowrank``) that
  specializes ``safetensors``: ``save`` (``auto`` or ``--format safetensors``) hands such a model to it, and it
  writes the weights with ``save_pretrained`` and a marker file naming the changed layers (``gptopt-lowrank.json``);
* ``gptopt_resolve_model``: for a directory with that marker, build the architecture from ``config.json``, put the
  changed layers back, load every weight strictly (a missing or unexpected weight is an error), and return it.
"""
import json
from pathlib import Path

import pydantic

from gptopt_core import (GptoptError, LoadedModel, Params, SourceError, Step, Writer, get_module, hookimpl,
                         replace_module, weight_matrix, weight_modules)

MARKER = "gptopt-lowrank.json"


class LowRankParams(Params):
    rank: int = pydantic.Field(8, ge=1, le=65536, description="rank kept of every factored layer")
    include: list[str] = pydantic.Field(["*mlp*"], description="glob on module names to factor (repeatable)")


def factored(rank, in_features, out_features, bias):
    """``in -> rank -> out``: two linear layers, marked so the saver can find them."""
    import torch.nn as nn

    pair = nn.Sequential(nn.Linear(in_features, rank, bias=False), nn.Linear(rank, out_features, bias=bias))
    pair.gptopt_lowrank = rank
    return pair


class LowRank(Step):
    """Factor linear layers into two of rank --rank (truncated SVD of the weight)."""

    name = "lowrank"
    Params = LowRankParams
    forbids = {"quantized": "the SVD needs float weights; put lowrank before quantize",
               "adapter": "merge the LoRA adapter first (lora --merge)"}
    provides = frozenset({"lowrank"})  # the fact the writer below is chosen by
    columns = {"lowrank_layers": ("low-rank layers", "d")}

    def apply(self, ctx):
        import torch

        layers = weight_modules(ctx.model, include=self.params.include)
        if not layers:
            raise GptoptError(f"lowrank: --include {self.params.include} matches no linear layer")
        with torch.no_grad():
            for name, module in layers:
                w = weight_matrix(module).float()  # (out, in), whatever the layer type
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                r = min(self.params.rank, s.numel())
                pair = factored(r, w.shape[1], w.shape[0], module.bias is not None)
                pair[0].weight.copy_(vh[:r])
                pair[1].weight.copy_(u[:, :r] * s[:r])
                if module.bias is not None:
                    pair[1].bias.copy_(module.bias)
                replace_module(ctx.model, name, pair.to(w.device))
        return {"lowrank_layers": len(layers)}


@hookimpl
def gptopt_register_steps(register):
    register(LowRank)


class LowRankWriter(Writer):
    """The weights (``save_pretrained``) and the marker naming the factored layers."""

    name = "lowrank"
    summary = "save_pretrained + gptopt-lowrank.json naming the factored layers"
    kind = "directory"
    facts = frozenset({"lowrank"})
    specializes = "safetensors"

    def write(self, ctx, model, path, options):
        model.save_pretrained(str(path), safe_serialization=True)
        layers = {n: m.gptopt_lowrank for n, m in model.named_modules() if getattr(m, "gptopt_lowrank", None)}
        (Path(path) / MARKER).write_text(json.dumps({"layers": layers}, indent=1))


@hookimpl
def gptopt_register_writers(register):
    register(LowRankWriter)


@hookimpl
def gptopt_resolve_model(spec, options):
    """A directory this plugin saved: rebuild the factored layers, then load every weight strictly."""
    path = Path(spec).expanduser()
    if not (path / MARKER).is_file():
        return None
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    layers = json.loads((path / MARKER).read_text())["layers"]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    for name, rank in layers.items():
        old = get_module(model, name)
        w = weight_matrix(old)
        replace_module(model, name, factored(int(rank), w.shape[1], w.shape[0], old.bias is not None))
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SourceError(f"{path}: weights do not fit the low-rank structure (missing {sorted(set(missing) - tied)[:3]}"
                          f", unexpected {sorted(unexpected)[:3]})")
    model.tie_weights()
    return LoadedModel(model.eval(), AutoTokenizer.from_pretrained(path), "lowrank")
