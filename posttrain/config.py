"""Typed configuration: one schema per command, loaded from YAML plus ``key.sub=value`` overrides.

Every field is documented here (the schema is the reference). Unknown keys, wrong types and
impossible values are rejected at load time, before any model loads, in one line that names
the file and the dotted key. The resolved config is written to the run directory.

Sections are shared between commands (``model``, ``data``, ``optim``, ``train``, ``lora``,
``run``) so SFT, reward-model and RL runs read alike.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from posttrain.errors import ConfigError
from posttrain.models import DEFAULT_MODEL

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum"]


class Section(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(Section):
    name: str = Field("run", description="run name; the run directory is <output_dir>/<name>")
    output_dir: str = Field("runs", description="parent directory of run directories")
    tensorboard: bool = Field(True, description="write TensorBoard event files")
    progress: bool = Field(True, description="show a progress bar (off automatically when not a terminal)")
    overwrite: bool = Field(False, description="allow a fresh run into a directory that already has metrics")


class ModelConfig(Section):
    name: str = Field(DEFAULT_MODEL, description="model spec: alias, local HF dir, .gguf file, or hub id")
    chat_template: str | None = Field(None, description="Jinja file replacing the tokenizer's chat template")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    attn_implementation: str | None = Field(None, description="transformers attention backend (e.g. sdpa, flash_attention_2)")


class LoRAConfig(Section):
    enabled: bool = Field(False, description="train LoRA adapters (peft) instead of all weights")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names to adapt")
    merge_on_export: bool = Field(True, description="merge adapters into the exported final/ model")


class DataConfig(Section):
    train: str | None = Field(None, description="training data: JSONL/JSON/Parquet file or datasets directory")
    val: str | None = Field(None, description="held-out data file (else val_fraction of train)")
    val_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of train held out when val is unset")
    max_length: int = Field(1024, gt=1, description="maximum tokens per sample")
    truncation: Literal["right", "drop", "error"] = Field(
        "right", description="over-long samples: cut on the right, drop them, or fail"
    )
    train_on: Literal["all_assistant", "last_assistant"] = Field(
        "all_assistant", description="which assistant turns are trained"
    )
    train_tool_calls: bool = Field(True, description="train assistant tool calls")
    history_rewrite: Literal["split", "error"] = Field(
        "split", description="templates that rewrite history: one sample per assistant turn, or fail"
    )
    skip_bad: bool = Field(False, description="skip (and count) malformed rows instead of stopping")
    allow_audit_errors: bool = Field(False, description="start training even if the pre-flight audit finds hard errors")
    limit: int | None = Field(None, gt=0, description="use only the first N rows")


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.95))
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="decay after warmup")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="warmup as a fraction of total optimizer steps")
    warmup_steps: int | None = Field(None, ge=0, description="warmup in optimizer steps (overrides warmup_ratio)")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="final lr as a fraction of peak (cosine, linear)")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping by global norm; null = off")


class TrainConfig(Section):
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides epochs)")
    global_batch_size: int | None = Field(16, gt=0, description="sequences per optimizer step")
    global_batch_tokens: int | None = Field(None, gt=0, description="tokens per optimizer step (instead of sequences)")
    micro_batch_tokens: int = Field(4096, gt=0, description="token budget of one forward/backward (per rank)")
    packing: bool = Field(True, description="padding-free packing of sequences into micro-batches")
    loss_agg_mode: LossAggMode = Field("token-mean", description="how token losses are aggregated")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 = autocast with fp32 master weights")
    logits_chunk_size: int = Field(1024, gt=0, description="trained positions per chunk of the output projection")
    seed: int = Field(0, description="seed for data order, dropout and initialisation")
    log_every: int = Field(1, gt=0, description="optimizer steps between metric lines")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between validation passes")
    save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints (and at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept")
    resume: str | None = Field(None, description="'latest' or a checkpoint directory")

    @model_validator(mode="after")
    def _one_batch_unit(self) -> "TrainConfig":
        if self.global_batch_tokens is not None:
            self.__dict__["global_batch_size"] = None
        if self.global_batch_size is None and self.global_batch_tokens is None:
            raise ValueError("set global_batch_size or global_batch_tokens")
        return self


class SFTConfig(Section):
    """``posttrain sft``: supervised fine-tuning."""

    run: RunConfig = RunConfig(name="sft")
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _needs_data(self) -> "SFTConfig":
        if not self.data.train:
            raise ValueError("data.train: a training data file is required")
        if (
            self.data.truncation == "error"
            and not self.train.packing
            and self.train.micro_batch_tokens < self.data.max_length
        ):
            raise ValueError(
                "train.micro_batch_tokens is smaller than data.max_length with truncation=error: "
                "a full-length sample could never fit"
            )
        return self


class RewardModelSection(Section):
    """Reward-model specifics (``rm:`` section of ``posttrain rm``)."""

    margin_key: str | None = Field(
        "margin", description="row key holding a per-pair margin m in -log sigmoid(r_c - r_r - m); "
                              "rows without it use 0; null ignores margins")
    center_rewards_coef: float = Field(
        0.0, ge=0, description="weight of the reward-centring term (r_c + r_r)^2 per pair; 0 = off (0.01 is common)")
    group_key: str | None = Field(
        None, description="row key whose values split the held-out accuracy (val/accuracy/<value>), e.g. an error kind")


class RMConfig(Section):
    """``posttrain rm``: a reward model trained on preference pairs (Bradley–Terry).

    Data rows: ``{"prompt", "chosen", "rejected"}`` (strings or message lists) or
    ``{"chosen": conversation, "rejected": conversation}``. In ``train``,
    ``global_batch_size`` counts PAIRS per optimizer step and ``global_batch_tokens`` the
    tokens of both sides; both sides of a pair always share a micro-batch. ``data.max_length``
    applies to each side: a pair with an over-long side is dropped (``truncation: right`` or
    ``drop``: the score token would be cut off) or refused (``error``). ``train.loss_agg_mode``
    and ``train.logits_chunk_size`` do not apply (one score per sequence, no vocabulary).
    """

    run: RunConfig = RunConfig(name="rm")
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    rm: RewardModelSection = RewardModelSection()

    @model_validator(mode="after")
    def _needs_data(self) -> "RMConfig":
        if not self.data.train:
            raise ValueError("data.train: a preference data file is required")
        if self.train.micro_batch_tokens < 2 * self.data.max_length and self.data.truncation == "error":
            raise ValueError(
                "train.micro_batch_tokens is smaller than 2 x data.max_length with truncation=error: "
                "a pair of full-length sides could never share a micro-batch"
            )
        return self


class ChatConfig(Section):
    """``posttrain chat``: one reply from a model."""

    model: ModelConfig = ModelConfig()
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    system: str | None = Field(None, description="optional system message")
    seed: int = 0


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def load_config(
    schema: type[ConfigT], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> ConfigT:
    """Read YAML ``path`` (optional), apply ``key.sub=value`` overrides, validate with ``schema``.

    Raises ConfigError with one line naming the file and the dotted key.
    """
    source = str(path) if path is not None else "command line"
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(file.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    for override in overrides:
        apply_override(raw, override)
    return validate_config(schema, raw, source)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML (1, true, [1,2], null)."""
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}' must look like key.sub=value")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def validate_config(schema: type[ConfigT], raw: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_error(schema, exc)}") from None


def _describe_error(schema: type[BaseModel], exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = [str(part) for part in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        known = _field_names(schema, loc[:-1])
        hint = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.5)
        suggestion = f" (did you mean '{'.'.join(loc[:-1] + [hint[0]])}'?)" if hint else ""
        return f"unknown key '{key}'{suggestion}; known keys here: {', '.join(known)}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not key:
        return message
    return f"{key}: {message} (got {error.get('input')!r})" if error["type"] != "missing" else f"{key}: required"


def _field_names(schema: type[BaseModel], loc: list[str]) -> list[str]:
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (what the run directory keeps)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
