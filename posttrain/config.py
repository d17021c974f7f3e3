"""Typed configuration: one schema per command, loaded from YAML plus ``key.sub=value`` overrides.

Every field is documented here (the schema is the reference). Unknown keys, wrong types and
impossible values are rejected at load time, before any model loads, in one line that names
the file and the dotted key. The resolved config is written to the run directory.

Sections are shared between commands (``model``, ``data``, ``optim``, ``train``, ``lora``,
``run``) so SFT, reward-model and RL runs read alike.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from posttrain.data.mixture import source_problem
from posttrain.errors import ConfigError
from posttrain.models import DEFAULT_MODEL
from posttrain.models import bf16_is_native

LossAggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "sum"]


def resolve_precision(precision: str) -> str:
    """``auto`` -> ``bf16`` where this machine computes bf16 natively, else ``fp32``; other
    values unchanged. The device a run trains on is CUDA when one is visible, else the CPU
    (oneDNN's bf16 kernels need AVX512-BF16 or AMX; without them autocast emulates bf16)."""
    if precision != "auto":
        return precision

    return "bf16" if bf16_is_native() else "fp32"


Precision = Annotated[Literal["auto", "fp32", "bf16"], AfterValidator(resolve_precision)]


class Section(BaseModel):
    """Base of all config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Seeds are 32-bit: numpy's range, and small enough that the seeds derived from them (per rank,
# step and epoch, e.g. ``seed * 1_000_003 + step``) stay inside torch's 64-bit seed range.
MAX_SEED = 2**32 - 1


def _one_directory_name(name: str) -> str:
    """A run name names one directory inside ``run.output_dir``: not empty, not ``.`` or ``..``,
    no path separator, so a run's files never land in ``output_dir`` itself or outside it."""
    if not name.strip():
        raise ValueError("must not be empty: it names the run's directory inside run.output_dir")
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError("must be one directory name inside run.output_dir (no '/', not '.' or '..'); to place runs "
                         "elsewhere, set run.output_dir")
    return name


RunName = Annotated[str, AfterValidator(_one_directory_name)]


class RunConfig(Section):
    name: RunName = Field("run", description="run name; the run directory is <output_dir>/<name> (one directory name)")
    output_dir: str = Field("runs", description="parent directory of run directories")
    tensorboard: bool = Field(True, description="write TensorBoard event files")
    wandb: bool = Field(
        False, description="also log metrics to Weights & Biases (pip install wandb); WANDB_MODE=offline writes the run "
                           "under <run>/wandb for a later `wandb sync`")
    wandb_project: str = Field("posttrain", description="W&B project of the run (wandb: true); the W&B run name is run.name")
    progress: bool = Field(True, description="show progress: a bar on a terminal; otherwise plain lines on stderr when "
                                             "a phase starts, every 30 s and when it ends")
    overwrite: bool = Field(
        False, description="start over in a directory that holds a run: its checkpoints, final/, metrics, samples "
                           "and evaluations are deleted first (ignored when train.resume finds a checkpoint)")
    push_to_hub: str | None = Field(
        None,
        description="after training, upload final/ with a generated model card (README.md) to this Hugging Face "
                    "model repo, org/name (created if missing; needs a login or HF_TOKEN); an unreachable hub is "
                    "refused before training; later: `posttrain push RUN_DIR org/name`")

    @field_validator("push_to_hub")
    @classmethod
    def _push_to_hub_is_a_repo_id(cls, value: str | None) -> str | None:
        import re

        if value is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", value):
            raise ValueError("not a Hugging Face repo id: write org/name")
        return value

    @model_validator(mode="after")
    def _wandb_installed(self) -> "RunConfig":
        import importlib.util

        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ValueError("wandb is true but the wandb package is not installed (pip install wandb, or posttrain[wandb])")
        return self


class ModelConfig(Section):
    name: str = Field(DEFAULT_MODEL, description="model spec: alias, local HF dir, .gguf file, or hub id")
    chat_template: str | None = Field(None, description="Jinja file replacing the tokenizer's chat template")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    attn_implementation: str | None = Field(
        None, description="transformers attention backend (e.g. sdpa, flash_attention_2), or posttrain_varlen "
                          "(packed, per-sequence SDPA; the default when packing), posttrain_flex (packed, one "
                          "FlexAttention call with a block mask; CUDA), auto (posttrain_flex on CUDA, posttrain_varlen "
                          "elsewhere)")


class LoRAConfig(Section):
    enabled: bool = Field(False, description="train LoRA adapters (peft) instead of all weights")
    r: int = Field(16, gt=0, description="adapter rank")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names to adapt")
    merge_on_export: bool = Field(True, description="merge adapters into the exported final/ model")


DATA_SOURCE = ("JSONL/JSON/Parquet file, datasets directory, folder of data files, or hub dataset "
               "org/name[@config][:split] (datasets.load_dataset)")
MIXTURE_HELP = ("; or a list of sources, each a path or {path, weight, limit, split, name}: concatenated in order "
                "without weights, else drawn by weight share with train.seed (docs/DATA.md)")


class DataSource(Section):
    """One source of a data mixture (``data.train: [a.jsonl, {path: b.jsonl, weight: 0.25}]``;
    ``data.mixture`` and docs/DATA.md give the semantics)."""

    path: str = Field(min_length=1, description=f"the data: {DATA_SOURCE}")
    weight: float | None = Field(None, gt=0, allow_inf_nan=False,
                                 description="its share of the mixture, relative to the other sources' weights; every "
                                             "source has one (drawn by share) or none does (concatenated)")
    limit: int | None = Field(None, gt=0, description="read only its first N rows")
    split: str | None = Field(None, min_length=1, description="split of a datasets directory, folder of data files or "
                                                              "hub dataset (default train; slicing as in train[:100])")
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]+$",
                             description="its name in the audit and the metrics (default: the file or dataset name)")


def _source_item_kind(value: Any) -> str | None:
    return "path" if isinstance(value, str) else "source" if isinstance(value, (dict, DataSource)) else None


def _setting_kind(value: Any) -> str | None:
    return "path" if isinstance(value, str) else "list" if isinstance(value, list) else None


def _check_sources(sources: list[Any]) -> list[Any]:
    problem = source_problem(sources)
    if problem is not None:
        raise ValueError(problem)  # "[i].field: ...": _describe_error puts the key in front
    return sources


DATA_SOURCE_TAGS = ("path", "list", "source")
DataSourceItem = Annotated[
    Annotated[str, Tag("path")] | Annotated[DataSource, Tag("source")],
    Discriminator(_source_item_kind, custom_error_type="data_source",
                  custom_error_message="a source is a path or a mapping {path, weight, limit, split, name}"),
]
# A data setting: one path (str) or a list of sources. Errors name data.train[1].weight.
DataSetting = Annotated[
    Annotated[str, Tag("path")]
    | Annotated[list[DataSourceItem], Field(min_length=1), AfterValidator(_check_sources), Tag("list")],
    Discriminator(_setting_kind, custom_error_type="data_setting",
                  custom_error_message="expected a path or a list of sources (paths or {path, weight, limit, split, "
                                       "name})"),
]
COLUMNS_HELP = ("rename row fields before anything reads them: {target: source}, source a dotted path into nested "
                "fields, e.g. {prompt: question, answer: reward_model.ground_truth}")


SPECIAL_TEXT_HELP = ("text of a row that holds the string of a special or added token of the tokenizer (<|im_end|>, "
                     "<file_sep>...) would become that control token: false refuses the row, true keeps every such "
                     "string as its token, a list keeps those strings only; tool results are always defused")


class DataConfig(Section):
    train: DataSetting | None = Field(None, description=f"training data: {DATA_SOURCE}{MIXTURE_HELP}")
    val: DataSetting | None = Field(None, description="held-out data, same kinds as train (else val_fraction of train)")
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_HELP)
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
    allow_special_tokens_in_text: bool | list[str] = Field(False, description=SPECIAL_TEXT_HELP)
    limit: int | None = Field(None, gt=0, description="use only the first N rows")


class SFTDataConfig(DataConfig):
    """``data`` of ``posttrain sft`` (and ``inspect``): the shared data settings plus how tool use is laid out."""

    tool_format: Literal["chat_template", "inline"] = Field(
        "chat_template", description="tool calls and results: rendered by the tokenizer's chat template, or inline: "
                                     "python tool use in the last turn laid out by posttrain as the RL turn loop "
                                     "samples it (```python blocks, <output> blocks not trained), for templates "
                                     "without tools")


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


class RunFaultsConfig(Section):
    """Resume and fault handling, shared by every trainer's ``train`` section (``train.session``)."""

    resume: str | None = Field(
        None, description="'latest' (the newest intact checkpoint; none yet = start from step 0) or a checkpoint "
                          "directory; a checkpoint written under another config is refused (resume_allow_changes)")
    resume_allow_changes: list[str] = Field(
        default_factory=list, description="config keys (dotted, or a section such as 'optim') allowed to differ from "
                                          "the checkpoint's config on resume, e.g. [train.max_steps]; an allowed "
                                          "change takes effect as in a fresh run with the new config (the new "
                                          "learning-rate schedule from the checkpoint's step, new AdamW settings, "
                                          "moments kept), one a checkpoint cannot carry (the model or adapter it "
                                          "holds, RL's optimizer steps per step, a shorter run) is refused; any "
                                          "other changed key is refused in one line")
    skip_nonfinite_steps: int = Field(
        0, ge=0, description="optimizer steps with a NaN/inf loss or gradient norm that are skipped (no update, one "
                             "warning each) before the run stops; 0 = stop at the first, keeping the last checkpoint")
    save_on_signal: bool = Field(
        True, description="on SIGTERM or Ctrl-C, save a checkpoint at the end of the current step and stop "
                          "(resume with resume=latest); false = stop at once without saving")


class TrainConfig(RunFaultsConfig):
    epochs: float = Field(1.0, gt=0, description="passes over the training data")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps (overrides epochs)")
    global_batch_size: int | None = Field(16, gt=0, description="sequences per optimizer step")
    global_batch_tokens: int | None = Field(None, gt=0, description="tokens per optimizer step (instead of sequences)")
    micro_batch_tokens: int = Field(4096, gt=0, description="token budget of one forward/backward (per rank)")
    packing: bool = Field(True, description="padding-free packing of sequences into micro-batches")
    loss_agg_mode: LossAggMode = Field("token-mean", description="how token losses are aggregated")
    precision: Precision = Field(
        "fp32", description="bf16 = autocast with fp32 master weights; auto = bf16 where the hardware computes it "
                            "natively (CUDA with bf16, a CPU with AVX512-BF16/AMX), else fp32 (emulated bf16 is ~10x "
                            "slower on a CPU); resolved when the config is loaded")
    logits_chunk_size: int = Field(1024, gt=0, description="trained positions per chunk of the output projection")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed for data order, dropout and initialisation")
    shuffle: bool = Field(True, description="reshuffle the training data every epoch (seeded); false = file order")
    log_every: int = Field(1, gt=0, description="optimizer steps between metric lines")
    eval_every: int | None = Field(None, gt=0, description="optimizer steps between validation passes")
    save_every: int | None = Field(None, gt=0, description="optimizer steps between checkpoints (and at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept")

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
    data: SFTDataConfig = SFTDataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    train_top_layers: int | None = Field(
        None, ge=0, description="train only the top N decoder blocks and the final norm (embeddings, head and the "
                                "blocks below frozen), so backward stops below them: a step costs about "
                                "(1 + 2N/L) / 3 of a full one on an L-block model; null = all (or LoRA)")

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
    train_top_layers: int | None = Field(
        None, ge=0, description="train only the top N decoder blocks (+ final norm and head); backward stops "
                                "below them, so a step costs far less; null = all (or LoRA)")


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


class DPOSection(Section):
    """Preference-optimisation specifics (``dpo:`` section of ``posttrain dpo``)."""

    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid = DPO (Rafailov 2023); ipo = IPO (Azar 2023, per-token means); "
                               "simpo = SimPO (Meng 2024, reference-free, length-normalised)")
    beta: float = Field(0.1, gt=0, description="inverse temperature beta (DPO 0.1 is usual; SimPO uses ~2)")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="conservative DPO: probability a label is flipped (sigmoid, simpo)")
    simpo_gamma: float = Field(0.5, ge=0, description="simpo: target reward margin gamma")
    rpo_alpha: float | None = Field(
        None, ge=0, description="RPO (Pang et al. 2024; TRL rpo_alpha): add alpha x the chosen response's NLL, "
                                "averaged over its own tokens then over pairs, to the loss (any loss_type); "
                                "keeps the preferred answer likely; null = off")
    group_key: str | None = Field(
        None, description="row key whose values split the held-out accuracy (val/rewards/accuracies/<value>)")
    reference_cache: bool = Field(
        True, description="keep the reference log-probs in <run>/reference_logps.pt, keyed by a fingerprint of "
                          "the model and data, and reuse them on a rerun or resume")
    share_prompt: bool | None = Field(
        None, description="lay out each pair's prompt once, both responses attending to it (rl.share_prompt's "
                          "layout; the same log-probs, fewer tokens to compute); null = wherever train.packing and "
                          "the attention allow it; true = required")


class DPOConfig(Section):
    """``posttrain dpo``: direct preference optimisation (DPO, conservative DPO, IPO, SimPO).

    Data rows as for ``posttrain rm``: ``{"prompt", "chosen", "rejected"}`` or two whole
    conversations. ``global_batch_size`` counts PAIRS per optimizer step; both sides of a
    pair share a micro-batch; ``data.max_length`` applies to each side (a pair with an
    over-long side is dropped, or refused with ``truncation: error``). The reference is the
    starting model (with LoRA: the base, adapter off); its log-probs are computed once
    before training (not for simpo).
    """

    run: RunConfig = RunConfig(name="dpo")
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig(lr=1e-6)
    train: TrainConfig = TrainConfig()
    dpo: DPOSection = DPOSection()

    @model_validator(mode="after")
    def _consistent(self) -> "DPOConfig":
        if not self.data.train:
            raise ValueError("data.train: a preference data file is required")
        if self.dpo.loss_type == "ipo" and self.dpo.label_smoothing:
            raise ValueError("dpo.label_smoothing: does not apply to loss_type ipo")
        if self.dpo.share_prompt and (not self.train.packing
                                      or self.model.attn_implementation not in SHARED_PROMPT_ATTENTION):
            raise ValueError(
                f"dpo.share_prompt: the shared-prompt layout needs train.packing and an attention that honours its "
                f"mask (each response sees the prompt, never the other response); train.packing="
                f"{str(self.train.packing).lower()}, model.attn_implementation={self.model.attn_implementation!r}. "
                f"Set dpo.share_prompt=null or false")
        if self.train.micro_batch_tokens < 2 * self.data.max_length and self.data.truncation == "error":
            raise ValueError(
                "train.micro_batch_tokens is smaller than 2 x data.max_length with truncation=error: "
                "a pair of full-length sides could never share a micro-batch"
            )
        return self


class AgentConfig(Section):
    """Multi-turn tool use (``agent:`` of ``rl``, ``eval`` and ``chat``): the model writes a tool
    call, the environment answers, the model reads the answer and goes on (docs/AGENTIC.md).
    Off unless ``tools`` or ``environment`` is set."""

    tools: list[str] = Field(
        default_factory=list, description="tools offered: 'python' (runs code in the sandbox) and/or 'module:function' "
                                          "or 'file.py:function' (a typed, docstringed function; its JSON schema comes "
                                          "from the signature; resolved as reward: is, from the working directory)")
    tool_format: Literal["inline", "chat_template"] = Field(
        "inline", description="inline: the model writes a ```python block in its reply, posttrain runs it and appends "
                              "an <output> block (templates without tools, like the bundled model's); chat_template: "
                              "the tokenizer's own tool-call rendering (Hermes <tool_call> JSON)")
    environment: str | None = Field(
        None, description="optional 'module:Class' or 'file.py:Class' with reset(row) and step(calls) -> "
                          "(observation, done, reward), one instance per trajectory (docs/AGENTIC.md)")
    max_turns: int = Field(4, gt=0, description="model turns per trajectory at most")
    max_tool_calls: int = Field(4, ge=0, description="tool calls per trajectory at most")
    max_total_tokens: int = Field(
        512, gt=0, description="response tokens per trajectory, sampled and tool output together; each turn's "
                               "max_new_tokens is clamped to what is left")
    max_tool_output_tokens: int = Field(128, gt=0, description="a tool output longer than this is cut, keeping head and tail")
    tool_concurrency: int = Field(4, gt=0, description="tool calls running at once (all trajectories together)")
    tool_timeout: float = Field(5.0, gt=0, description="seconds per python call")
    python_session: bool = Field(False, description="keep one interpreter state per trajectory (never shared); "
                                                    "false: every call starts fresh")
    tool_call_bonus: float = Field(0.0, description="RL reward shaping: added when the final answer is the value a successful tool call printed (docs/AGENTIC.md)")
    tool_error_penalty: float = Field(0.0, ge=0, description="RL reward shaping: subtracted per tool error")

    @property
    def enabled(self) -> bool:
        return bool(self.tools or self.environment)


class ChatConfig(Section):
    """``posttrain chat``: one reply from a model (with ``agent.tools``: a trajectory, turn by turn)."""

    model: ModelConfig = ModelConfig()
    agent: AgentConfig = AgentConfig()
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    system: str | None = Field(None, description="optional system message")
    seed: int = Field(0, ge=0, le=MAX_SEED)


# ----------------------------------------------------------------------------- RL


class RLDataConfig(Section):
    """Prompt rows for ``posttrain rl``: ``{"prompt"|"messages", "answer"|"tests", ...}``.

    Every key other than the prompt goes to the reward as that row's metadata.
    """

    train: DataSetting | None = Field(None, description=f"training prompts: {DATA_SOURCE}{MIXTURE_HELP}")
    columns: dict[str, str] = Field(default_factory=dict, description=COLUMNS_HELP)
    eval: DataSetting | None = Field(None, description="held-out prompts (one source or a list, as train), scored before "
                                                       "training, every train.eval_every steps and after")
    system: str | None = Field(None, description="system message put before every prompt that has none")
    max_prompt_length: int = Field(512, gt=0, description="prompts longer than this many tokens are dropped (counted)")
    limit: int | None = Field(None, gt=0, description="use only the first N training rows")
    eval_limit: int | None = Field(None, gt=0, description="use only the first N held-out rows")
    allow_special_tokens_in_text: bool | list[str] = Field(False, description=SPECIAL_TEXT_HELP)


class RolloutConfig(Section):
    """How completions are sampled (``rollout:`` section)."""

    engine: Literal["hf", "vllm", "vllm_server"] = Field(
        "hf", description="hf = a transformers model in this process (posttrain's decode loop); vllm = vLLM "
                          "offline engine in this process (extra); vllm_server = a vLLM server in its own process "
                          "or machine (rollout.server_url, or started by posttrain), weights pushed after every update")
    group_size: int = Field(8, gt=0, description="completions sampled per prompt (GRPO's G)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; log-probs are computed at it too")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(256, gt=0, description="completion length cap (a capped completion is 'clipped')")
    stop: list[str] = Field(default_factory=list, description="stop strings (the completion ends after one)")
    batch_size: int = Field(64, gt=0, description="sequences per generate call (hf engine)")
    prepacked_copy: bool | None = Field(
        None, description="hf engine on a CPU: generate with a copy of the policy whose linear weights are stored "
                          "transposed (about 2x faster decoding at small batches; one more copy of the weights in "
                          "memory; docs/PERFORMANCE.md); null = on for full (non-LoRA, unsharded) models on a CPU")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="hf engine: weights generation runs with (bf16 = a bf16 copy of the policy, refreshed "
                            "after every update); auto = train.precision")
    eval_temperature: float = Field(0.0, ge=0, description="sampling temperature of held-out evaluation; 0 = greedy")
    engine_logprobs: bool | None = Field(
        None, description="ask the engine for log-probs and log their gap to the trainer's (temperature 1 only); "
                          "null = on for vllm, off for hf (whose generate keeps every step's logits)")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vllm: share of GPU memory for weights + KV cache")
    vllm_kv_cache_gb: float = Field(2.0, gt=0, description="vllm on CPU: KV-cache size in GiB")
    vllm_enforce_eager: bool = Field(True, description="vllm: no CUDA graphs / torch.compile (faster start)")
    server_url: str | None = Field(
        None, description="vllm_server: URL of a running server (http://host:port) started with `posttrain "
                          "rollout-server` or the `vllm serve` line of README 'Scaling out'; null = posttrain starts "
                          "one on this machine for the run and stops it after")
    server_python: str | None = Field(
        None, description="vllm_server started by posttrain: the Python that has vLLM (e.g. .venv-vllm/bin/python); "
                          "null = this interpreter")
    server_args: list[str] = Field(default_factory=list, description="vllm_server started by posttrain: extra "
                                                                     "`vllm serve` arguments")
    server_start_timeout_s: float = Field(600.0, gt=0, description="vllm_server: seconds to wait for the server to answer /health")
    server_timeout_s: float = Field(600.0, gt=0, description="vllm_server: seconds one generate or weight-sync request may take")
    sync_dir: str | None = Field(
        None, description="vllm_server: directory both trainer and server can read where each update's weights "
                          "(or LoRA adapter) are written for the server to load; null = <run dir>/weight_sync")


class CriticConfig(Section):
    """The PPO critic (``rl.critic``): a scalar-head copy of a causal LM (``posttrain.models.scalar_head``)."""

    model: str | None = Field(None, description="model spec of the critic's backbone; null = the policy's model")
    lr: float = Field(1e-5, gt=0, description="critic learning rate (constant after warmup)")
    value_clip: float | None = Field(0.2, gt=0, description="how far a value may move from its rollout value; null = off")
    train_top_layers: int | None = Field(
        None, ge=0, description="train only the top N decoder blocks of the critic (+ norm and head); null = all")
    warmup_steps: int = Field(0, ge=0, description="first steps train only the critic (the policy waits)")


PREFLIGHT_HELP = ("the reward pre-flight of rl, pipeline and inspect --config (docs/PREFLIGHT.md): null or true = "
                  "called on sample rows before training; false = skipped, for a reward meant to pay otherwise than "
                  "full marks for the reference answer and less for a wrong one")


class NamedReward(BaseModel):
    """A reward by name, a built-in (``math``, ``code``, ``format``, ``length``, ``model``, ...)
    or ``module:function``, with its parameters beside the name or under ``params``; the
    reward itself checks their names when it is built (``rewards.registry.build_reward``)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="built-in reward name or module:function")
    params: dict[str, Any] | None = Field(None, description="parameters (they may also sit beside 'name')")
    preflight: bool | None = Field(None, strict=True, description=PREFLIGHT_HELP)


class CompositeTerm(BaseModel):
    """One weighted term of a composite reward: its key names the reward unless ``reward`` does."""

    model_config = ConfigDict(extra="allow")
    weight: float = Field(1.0, strict=True, allow_inf_nan=False, description="the term's weight in the sum")
    reward: str | None = Field(None, description="the reward this term uses (default: the term's key)")
    preflight: bool | None = Field(None, strict=True, description=PREFLIGHT_HELP)


class CompositeReward(BaseModel):
    """``{name: composite, terms: {math: {weight: 1}, format: {weight: 0.2, pattern: ...}}}``."""

    model_config = ConfigDict(extra="forbid")
    name: Literal["composite"]
    terms: dict[str, CompositeTerm | None] = Field(min_length=1, description="named, weighted terms")
    preflight: bool | None = Field(None, strict=True, description=PREFLIGHT_HELP + " (every term)")


def _reward_kind(value: Any) -> str:
    name = value.get("name") if isinstance(value, dict) else getattr(value, "name", None)
    return "text" if isinstance(value, str) else "composite" if name == "composite" else "named"


# A reward spec: "math" / "module:function", a named reward with parameters, or a composite.
REWARD_SPEC_TAGS = ("text", "composite", "named")
RewardSpec = Annotated[
    Annotated[str, Tag("text")] | Annotated[CompositeReward, Tag("composite")] | Annotated[NamedReward, Tag("named")],
    Discriminator(_reward_kind),
]


def plain_reward_spec(spec: Any) -> Any:
    """The spec as the user wrote it (plain strings, dicts and lists), for the reward registry.

    >>> spec = {"name": "composite", "terms": {"math": {}}}
    >>> plain_reward_spec(validate_config(RLConfig, {"data": {"train": "p.jsonl"}, "reward": spec}).reward)
    {'name': 'composite', 'terms': {'math': {}}}
    """
    return spec.model_dump(exclude_unset=True, exclude_none=True) if isinstance(spec, BaseModel) else spec


ADVANTAGE_PRESETS = {"grpo": "grpo", "dr_grpo": "dr_grpo", "rloo": "rloo", "reinforce_pp": "reinforce_pp", "ppo": "gae"}
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # compare completions within a prompt's group


class MismatchConfig(Section):
    """Correction of the rollout/trainer mismatch (``rl.mismatch``; ``algorithms.mismatch``):
    an importance weight pi_trainer / pi_engine per token, bounded, on the policy loss."""

    correction: Literal["auto", "none", "tis", "mis"] = Field(
        "auto", description="tis = truncated IS (weight capped at `cap`); mis = masked IS (tokens or sequences whose "
                            "ratio is outside [low, high] not trained); none = weight 1 (metrics still logged); auto = "
                            "tis whenever the engine is not the trainer's own module (vllm, vllm_server, or "
                            "rl.max_staleness > 0), else none")
    level: Literal["token", "sequence"] = Field(
        "token", description="token = each token's ratio; sequence = the geometric mean of the sequence's token ratios")
    cap: float = Field(2.0, gt=0, description="tis: the largest weight")
    low: float = Field(0.5, ge=0, le=1, description="mis: ratios below are masked")
    high: float = Field(2.0, ge=1, description="mis: ratios above are masked")


class RLAlgorithmConfig(Section):
    """The algorithm (``rl:`` section): advantages, policy loss, KL, entropy, DAPO options."""

    algorithm: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "ppo"] = Field(
        "grpo", description="a preset naming the advantage estimator when rl.advantage is unset: grpo, dr_grpo, "
                            "rloo and reinforce_pp their namesakes, ppo = gae (with a learned critic)")
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] | None = Field(
        None, description="the advantage estimator (algorithms.advantages.ADVANTAGE_ESTIMATORS): grpo "
                          "(group-normalised), dr_grpo (no std division), rloo (leave-one-out), reinforce_pp "
                          "(batch-normalised returns), gae (a learned critic); null = rl.algorithm's preset")
    prompts_per_step: int = Field(8, gt=0, description="prompts sampled per RL step (each gets group_size completions)")
    ppo_epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    mini_batch_size: int | None = Field(
        None, gt=0, description="sequences per optimizer step; null = the whole rollout batch (one step per epoch)")
    share_prompt: bool = Field(True, description="lay out each group's prompt once in the log-prob and update "
                                                 "passes (same math, fewer tokens); false: one packed sequence "
                                                 "per completion")
    policy_loss: Literal["ppo_clip", "gspo", "cispo"] = Field(
        "ppo_clip", description="the policy loss (algorithms.policy.POLICY_LOSSES): ppo_clip (PPO/GRPO token ratio, "
                                "clip-higher, dual clip), gspo (sequence ratio, Zheng et al. 2025; the paper clips at "
                                "clip_low 3e-4 / clip_high 4e-4), cispo (clipped stop-gradient IS weight on REINFORCE, "
                                "MiniMax-M1 2025; clip_low 1 = no lower bound). With ppo_epochs 1 and one mini-batch "
                                "every ratio is 1 and the three give the same gradient")
    gspo_importance_level: Literal["sequence", "token"] = Field(
        "sequence", description="gspo: one ratio per sequence, or GSPO-token (same value, each token its own gradient; "
                                "differs only when advantages vary within a sequence)")
    clip_low: float = Field(0.2, gt=0, le=1, description="ratio (cispo: weight) lower bound 1 - clip_low")
    clip_high: float | None = Field(None, gt=0, description="ratio (cispo: weight) upper bound 1 + clip_high (DAPO clip-higher: 0.28); null = clip_low")
    dual_clip_c: float | None = Field(None, gt=1, description="ppo_clip: dual clip bound for negative advantages (e.g. 3); null = off")
    kl_coef: float = Field(0.0, ge=0, description="KL-to-reference weight beta; 0 skips the reference model entirely")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="per-token KL estimator")
    kl_clamp: float | None = Field(
        10.0, gt=0, description="clamp each token's KL estimate to [-kl_clamp, kl_clamp] (k3 is exp(log-ratio) and "
                                "unbounded: 16 at log-ratio 3, veRL clamps its low_var_kl at 10 too); a clamped "
                                "token gets no KL gradient; null = unbounded")
    kl_in: Literal["loss", "reward"] = Field("loss", description="KL as a loss term (GRPO) or a per-token reward penalty (PPO)")
    target_kl: float | None = Field(None, gt=0, description="adaptive KL: steer the measured KL to this (null = fixed beta)")
    kl_horizon: float = Field(10000.0, gt=0, description="adaptive KL: samples over which beta moves by ~20%")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus weight")
    gamma: float = Field(1.0, ge=0, le=1, description="discount (ppo, reinforce_pp)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (ppo)")
    whiten_advantages: bool = Field(True, description="gae: normalise the advantages over the batch")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and sample more prompts")
    max_refill_rounds: int = Field(3, ge=0, description="dynamic sampling: extra generation rounds at most per step")
    overlong: Literal["none", "filter", "penalty"] = Field(
        "none", description="completions cut at max_new_tokens: keep, exclude from the loss (DAPO overlong filtering), "
                            "or penalise (DAPO soft overlong punishment)")
    overlong_buffer: int = Field(64, ge=1, description="penalty: the last N tokens before max_new_tokens are penalised linearly")
    overlong_penalty: float = Field(1.0, ge=0, description="penalty: reward subtracted at max_new_tokens")
    train_top_layers: int | None = Field(
        None, ge=0, description="policy: train only the top N decoder blocks and the final norm (embeddings and "
                                "the rest frozen), so backward stops below them; null = all (or LoRA)")
    critic: CriticConfig = CriticConfig()
    max_staleness: int = Field(
        0, ge=0, description="asynchronous steps: rollouts for up to this many future steps are generated while "
                             "the trainer updates (0 = the synchronous loop); a sample generated by a policy more than "
                             "this many versions old is dropped and counted (docs/METRICS.md 'Staleness')")
    mismatch: MismatchConfig = MismatchConfig()


class RLTrainConfig(RunFaultsConfig):
    """Steps, precision, logging, evaluation and checkpoints of ``posttrain rl``."""

    max_steps: int = Field(50, gt=0, description="RL steps (one rollout batch each)")
    micro_batch_tokens: int = Field(4096, gt=0, description="token budget of one forward/backward (packed, per rank)")
    loss_agg_mode: LossAggMode = Field(
        "token-mean", description="how token losses are aggregated; 'sum' is divided by sequences x max_new_tokens "
                                  "(Dr. GRPO's constant normaliser)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of prompt order, sampling and initialisation")
    precision: Precision = Field(
        "fp32", description="bf16 = autocast with fp32 master weights; auto = bf16 where the hardware computes it "
                            "natively (CUDA with bf16, a CPU with AVX512-BF16/AMX), else fp32 (emulated bf16 is ~10x "
                            "slower on a CPU); resolved when the config is loaded")
    logits_chunk_size: int = Field(1024, gt=0, description="response tokens per chunk of the output projection")
    log_every: int = Field(1, gt=0, description="steps between metric lines")
    samples_every: int | None = Field(5, gt=0, description="steps between appends to samples.jsonl; null = never")
    samples_per_log: int = Field(4, gt=0, description="completions written to samples.jsonl each time")
    eval_every: int | None = Field(None, gt=0, description="steps between held-out evaluations (also before and after)")
    eval_before: bool = Field(True, description="evaluate on data.eval before the first step")
    save_every: int | None = Field(None, gt=0, description="steps between checkpoints (and at the end)")
    keep_last: int = Field(2, gt=0, description="checkpoints kept")
    export: bool = Field(True, description="write final/ (HF format) at the end")


class AlarmsConfig(Section):
    """``alarms:`` of ``posttrain rl``: reward hacking and collapse alarms read from the run's own
    metrics (``train.rl_alarms``; docs/METRICS.md, "Alarms"). Each logs ``alarm/<name>`` (0/1)
    every step and says one line when it fires; a threshold set to null switches its alarm off.
    "Since the start" compares the mean of the run's first ``window`` steps with the last ones."""

    enabled: bool = Field(True, description="watch the alarms at all; false = no alarm/* metrics, no warnings")
    window: int | None = Field(
        None, gt=0, description="steps per window: levels are means over the last window, rises compare it with the "
                                "first window (so they need 2 x window steps); null = a quarter of train.max_steps, "
                                "at least 3 and at most 10")
    acc_gain: float = Field(0.05, ge=0, description="accuracy (acc) 'gained' when its last-window mean exceeds its "
                                                    "first-window mean by this; below it, it stayed flat")
    heldout_drop: float | None = Field(
        0.05, gt=0, description="reward_up_heldout_down: held-out accuracy (eval/acc, else eval/reward) fell by this "
                                "between the last two evaluations (needs train.eval_every) while the training "
                                "reward rose by reward_rise; null = off")
    reward_rise: float = Field(0.05, ge=0, description="reward_up_heldout_down: how much the training reward (mean of "
                                                       "the window ending at each evaluation) must have risen")
    reward_length_corr: float | None = Field(
        0.5, ge=-1, le=1, description="reward_length_corr: the within-group correlation of reward and response "
                                      "length (reward_length_corr), averaged over the last window, reaches this "
                                      "while accuracy did not gain acc_gain (or the reward checks no correctness); "
                                      "null = off")
    term_rise: float | None = Field(
        0.3, gt=0, description="format_saturated: a reward term (reward/<term>) rose by this since the start to "
                               "term_saturation over the last window while accuracy stayed flat; null = off")
    term_saturation: float = Field(0.9, gt=0, description="format_saturated: the level at which a term counts as "
                                                          "saturated (full marks are 1.0, as the built-in rewards "
                                                          "score them)")
    tool_calls_rise: float | None = Field(
        0.5, gt=0, description="tool_calls_no_gain (agent runs): tool calls per trajectory rose by this since the "
                               "start while accuracy stayed flat; null = off")
    entropy_ratio: float | None = Field(
        0.05, gt=0, lt=1, description="entropy_collapse: entropy over the last window fell below this share of its "
                                      "first window (the quickstarts' healthy runs end near 0.15); null = off")
    kl_max: float | None = Field(1.0, gt=0, description="kl_blowup: mean kl to the reference over the last window "
                                                        "(nats/token) reaching this; null = off for kl")
    approx_kl_max: float | None = Field(
        0.1, gt=0, description="kl_blowup: mean approx_kl to the sampling policy over the last window reaching this; "
                               "null = off for approx_kl")
    clip_frac_max: float | None = Field(
        0.2, gt=0, le=1, description="clip_frac_blowup: mean clip_frac over the last window reaching this (and "
                                     "blowup_factor x its first window); null = off")
    blowup_factor: float = Field(3.0, ge=1, description="kl_blowup, clip_frac_blowup: the last window must also be "
                                                        "this many times the first window's mean")
    length_cap_frac: float | None = Field(
        0.5, gt=0, le=1, description="length_cap: the share of responses cut at the length cap over the last window "
                                     "reaching this after rising by length_cap_rise since the start; null = off")
    length_cap_rise: float = Field(0.2, ge=0, description="length_cap: how much that share must have risen")
    nonfinite_steps: int | None = Field(
        1, gt=0, description="nonfinite: optimizer steps skipped for a NaN/inf loss or gradient within the last "
                             "window (train.skip_nonfinite_steps lets a run skip them) reaching this; null = off")


class RLOptimConfig(OptimConfig):
    """``optim:`` of ``posttrain rl``: as for SFT, with RL's usual small constant learning rate."""

    lr: float = Field(1e-6, gt=0, description="peak learning rate of the policy")
    schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="decay after warmup")


class PtxConfig(Section):
    """``ptx:`` of ``posttrain rl``: PPO-ptx (Ouyang et al. 2022, eq. 2), a supervised next-token
    loss on rows of SFT data added to the policy loss of every optimizer step, so RL keeps what
    the reward does not ask for (chat, tasks outside the prompts). ``train.rl_ptx``."""

    coef: float = Field(0.0, ge=0, description="weight of the supervised loss (token mean over the step's rows) beside "
                                               "the policy loss; 0 = off")
    rows_per_step: int = Field(8, gt=0, description="SFT rows per optimizer step, drawn from ptx.data.train with the "
                                                    "run's seed and the step (a resumed run draws the same rows)")
    data: SFTDataConfig = Field(default_factory=SFTDataConfig,
                                description="the SFT rows, read and audited as sft's data section (train, "
                                            "tool_format, max_length, ...)")


# Attention backends that apply the shared-prompt block masks (None = posttrain's choice: varlen SDPA).
SHARED_PROMPT_ATTENTION = (None, "posttrain_varlen", "posttrain_flex", "auto")


class RLConfig(Section):
    """``posttrain rl``: on-policy RL (GRPO, Dr. GRPO, RLOO, REINFORCE++, PPO with a critic).

    ``reward`` is a reward spec (``posttrain.rewards.build_reward``): a built-in name, a
    mapping with ``name`` and parameters, a composite, or ``module:function``.
    """

    run: RunConfig = RunConfig(name="rl")
    model: ModelConfig = ModelConfig()
    lora: LoRAConfig = LoRAConfig()
    data: RLDataConfig = RLDataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSpec = Field("math", description="reward spec: name, {name: ..., params}, composite, or module:function")
    optim: RLOptimConfig = RLOptimConfig()
    rl: RLAlgorithmConfig = RLAlgorithmConfig()
    agent: AgentConfig = AgentConfig()
    ptx: PtxConfig = PtxConfig()
    train: RLTrainConfig = RLTrainConfig()
    alarms: AlarmsConfig = AlarmsConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "RLConfig":
        rl, rollout = self.rl, self.rollout
        if not self.data.train:
            raise ValueError("data.train: a file of training prompts is required")
        if rl.advantage is None:
            rl.advantage = ADVANTAGE_PRESETS[rl.algorithm]
        if rl.advantage in GROUP_ESTIMATORS and rollout.group_size < 2:
            raise ValueError(f"rollout.group_size: {rl.advantage} compares completions within a group; it needs >= 2")
        batch = rl.prompts_per_step * rollout.group_size
        if rl.mini_batch_size is not None and batch % rl.mini_batch_size:
            raise ValueError(
                f"rl.mini_batch_size: {rl.mini_batch_size} does not divide the rollout batch "
                f"(rl.prompts_per_step x rollout.group_size = {batch})")
        if rl.mini_batch_size is not None and rl.advantage in GROUP_ESTIMATORS and rl.mini_batch_size % rollout.group_size:
            raise ValueError("rl.mini_batch_size: must be a multiple of rollout.group_size (groups stay together)")
        if rl.target_kl is not None and rl.kl_coef == 0:
            raise ValueError("rl.target_kl: adaptive KL needs a starting rl.kl_coef > 0")
        if rl.dual_clip_c is not None and rl.policy_loss != "ppo_clip":
            raise ValueError(f"rl.dual_clip_c: only policy_loss ppo_clip has a dual clip ({rl.policy_loss} bounds "
                             f"its ratio or weight by clip_low / clip_high)")
        if rl.overlong == "penalty" and rl.overlong_buffer >= rollout.max_new_tokens:
            raise ValueError("rl.overlong_buffer: must be smaller than rollout.max_new_tokens")
        truncated = rollout.top_p < 1 or rollout.top_k > 0
        if truncated and (rl.max_staleness > 0 or rl.mismatch.correction in ("tis", "mis")):
            setting = "rl.max_staleness" if rl.max_staleness > 0 else "rl.mismatch.correction"
            raise ValueError(f"{setting}: needs the engine's log-probs of the distribution the trainer computes; with "
                             f"rollout.top_p < 1 or rollout.top_k > 0 the engine samples from a truncated one "
                             f"(docs/METRICS.md 'Mismatch'): set top_p 1 and top_k 0")
        if self.train.eval_every is not None and not self.data.eval:
            raise ValueError("train.eval_every: set data.eval (held-out prompts) to evaluate")
        if self.ptx.coef > 0 and not self.ptx.data.train:
            raise ValueError("ptx.data.train: ptx.coef > 0 trains on SFT rows; name their file")
        if self.ptx.data.train and self.ptx.coef == 0:
            raise ValueError("ptx.coef: 0 switches the supervised term off, so ptx.data.train would be read for "
                             "nothing; set ptx.coef > 0 or remove ptx.data.train")
        if self.ptx.data.val or self.ptx.data.val_fraction:
            key = "ptx.data.val" if self.ptx.data.val else "ptx.data.val_fraction"
            raise ValueError(f"{key}: PPO-ptx only trains on its rows and holds none out; remove it")
        if self.ptx.coef > 0 and self.ptx.data.max_length > self.train.micro_batch_tokens:
            raise ValueError(f"ptx.data.max_length: {self.ptx.data.max_length} tokens would not fit in a micro-batch "
                             f"of train.micro_batch_tokens={self.train.micro_batch_tokens}; lower it or raise that")
        attention = self.model.attn_implementation
        if rl.share_prompt and attention not in SHARED_PROMPT_ATTENTION:
            raise ValueError(
                f"rl.share_prompt: the shared-prompt layout needs an attention that honours its mask (completions "
                f"see their prompt, never their siblings); model.attn_implementation={attention!r} cannot, so "
                f"completions would attend to each other. Unset model.attn_implementation or set "
                f"rl.share_prompt=false")
        return self


ConfigT = TypeVar("ConfigT", bound=BaseModel)


# Overrides: command-line strings ``key.sub=value`` (the value parsed as YAML), or a mapping of
# dotted keys to values (``{"train.max_steps": 5}``, the Python API's form; values used as given);
# a sequence may mix strings and ``(dotted key, value)`` pairs.
Overrides = typing.Sequence[str | tuple[str, Any]] | typing.Mapping[str, Any]


def load_config(schema: type[ConfigT], path: str | Path | None = None, overrides: Overrides = ()) -> ConfigT:
    """Read YAML ``path`` (optional: without it the schema's defaults), apply the overrides,
    validate with ``schema``.

    Raises ConfigError with one line naming the file and the dotted key, or the override when
    the key the error is about was set by one.
    """
    source = str(path) if path is not None else "command line"
    raw: dict[str, Any] = read_config_file(path) if path is not None else {}
    return validate_with_overrides(schema, raw, overrides, source)


def validate_with_overrides(schema: type[ConfigT], raw: dict[str, Any], overrides: Overrides = (),
                            source: str = "config") -> ConfigT:
    """``validate_config`` of ``raw`` (changed in place) after the overrides; an error about a key
    an override set (the key itself, a key inside it, or the section holding it) names that
    override instead of ``source``."""
    applied: dict[str, str] = {}  # dotted key -> the override that set it, as the user wrote it (quoted)
    for item in overrides.items() if isinstance(overrides, typing.Mapping) else overrides:
        if isinstance(item, str):
            applied[apply_override(raw, item)] = f"'{_short_text(item, 120)}'"
        else:
            key, value = item
            text = f"{key}={_short_repr(value, 80)}"
            set_key(raw, str(key), value, text)
            applied[str(key).strip()] = text
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        message = _describe_error(schema, exc)
        culprit = _override_behind(applied, _error_key(exc, message))
        raise ConfigError(f"override {culprit}: {message}" if culprit else f"{source}: {message}") from None


def _error_key(exc: ValidationError, message: str) -> str:
    """The dotted key a validation error is about: its location, else the key its message starts with."""
    loc = [str(part) for part in exc.errors()[0]["loc"]]
    loc = [part for i, part in enumerate(loc) if not (i and loc[i - 1] == "reward" and part in REWARD_SPEC_TAGS)]
    if loc:
        return ".".join(loc)
    match = re.match(r"([a-z_][a-z_0-9]*(?:\.[a-z_0-9]+)*)[: (]", message)
    return match.group(1) if match else ""


def _override_behind(applied: dict[str, str], key: str) -> str | None:
    """The last override whose key is ``key``, holds it, or lies inside it (None if none).

    >>> _override_behind({"train.max_steps": "train.max_steps=x", "optim.lr": "optim.lr=1"}, "train.max_steps")
    'train.max_steps=x'
    >>> _override_behind({"rl": "rl={algorithm: x}"}, "rl.algorithm"), _override_behind({"optim.lr": "o"}, "train")
    ('rl={algorithm: x}', None)
    """
    if not key:
        return None
    found = [text for set_key_, text in applied.items()
             if set_key_ == key or key.startswith(set_key_ + ".") or set_key_.startswith(key + ".")]
    return found[-1] if found else None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path``, unvalidated; ConfigError (one line naming the file, and the
    line for invalid YAML) when it is missing, a directory, unreadable, or not a mapping."""
    file = Path(path)
    if file.is_dir():
        examples = sorted(str(child) for child in file.glob("*.yaml"))[:3]
        hint = f" (e.g. {', '.join(examples)})" if examples else ""
        raise ConfigError(f"config file {path} is a directory; give one YAML config file{hint}")
    if not file.exists():  # /dev/null and a pipe (<(...)) are files to read too: only absence is refused
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = load_yaml(file.read_text(encoding="utf-8"), str(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({_short_text(str(getattr(exc, 'problem', exc)))})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read ({' '.join(str(exc).split())[:200]})") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    return loaded


def apply_override(raw: dict[str, Any], override: str) -> str:
    """Set ``a.b.c=value`` in the nested dict ``raw``; the value is parsed as YAML (1, true, [1,2], null).
    Returns the dotted key."""
    key, sep, value_text = override.partition("=")
    key = key.strip()
    if _LONE_SURROGATE.search(override):
        raise ConfigError(f"override '{_short_text(key, 80)}': holds bytes that are not UTF-8 text (a lone surrogate "
                          f"{ascii(_LONE_SURROGATE.search(override).group())[1:-1]})")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}' must look like key.sub=value")
    try:
        value = load_yaml(value_text, "override", key=key) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    set_key(raw, key, value, override)
    return key


def set_key(raw: dict[str, Any], key: str, value: Any, override: str) -> None:
    """Set dotted ``key`` to ``value`` in the nested dict ``raw``; ``override`` names it in errors."""
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{override}': the key must look like key.sub")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{override}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


# A config is a page of settings; a YAML alias repeats a whole subtree without writing it out, so a few
# lines of aliases can stand for billions of values ("billion laughs", PyYAML issue #37) that
# validation and the resolved config.yaml would then expand. This bounds what a config may expand to.
MAX_CONFIG_VALUES = 100_000
MAX_CONFIG_DEPTH = 100


def load_yaml(text: str, source: str, *, key: str = "") -> Any:
    """``yaml.safe_load(text)`` for a config, refusing what PyYAML silently accepts: a key given
    twice in one mapping (YAML keeps the last value, so a repeated section or key overrides the
    first without a word; the YAML 1.2 spec requires keys to be unique), a document that expands
    through aliases to more than ``MAX_CONFIG_VALUES`` values or nests deeper than
    ``MAX_CONFIG_DEPTH``, and an alias inside its own anchor. ConfigError naming ``source``,
    the line (1-based) and the dotted key; invalid YAML raises ``yaml.YAMLError`` as safe_load does.
    ``key``: the dotted key the text is the value of (a command-line override ``key=text``):
    problems are named by it, without a line.

    >>> load_yaml("optim:\\n  lr: 1.0e-5\\n  lr: 5.0\\n", "c.yaml")
    Traceback (most recent call last):
    ...
    posttrain.errors.ConfigError: c.yaml:3: duplicate key 'optim.lr' (first at line 2): YAML would keep only the last value; give each key once
    >>> load_yaml("base: &b {lr: 1.0}\\noptim:\\n  <<: *b\\n  lr: 2.0\\n", "c.yaml")["optim"]
    {'lr': 2.0}
    """
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{source}: {_dotted(key)} nests more than {MAX_CONFIG_DEPTH} levels deep") from None
        if node is None:
            return None
        check_config_nodes(node, source, key)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_config_nodes(root: yaml.Node, source: str, key: str = "") -> None:
    """ConfigError (see ``load_yaml``) for a duplicate key, a self-containing alias, nesting deeper
    than ``MAX_CONFIG_DEPTH``, more than ``MAX_CONFIG_VALUES`` values once aliases are expanded, or
    text holding a lone surrogate (YAML's ``"\\ud800"`` escape: no Unicode character; a key too).
    Each node is visited once (an alias is the node it names), so the check is linear in the
    text however much the aliases would expand."""
    size: dict[int, int] = {}  # id(node) -> values it expands to (itself included)
    path_of: dict[int, str] = {id(root): _short_text(key, 80)}
    at = (lambda node: f"{source}:{node.start_mark.line + 1}") if not key else (lambda node: source)
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, int, bool]] = [(root, 0, False)]
    while stack:
        node, depth, children_done = stack.pop()
        ident = id(node)
        children = _child_nodes(node)
        if children_done:
            open_nodes.discard(ident)
            size[ident] = min(1 + sum(size[id(child)] for _, child in children), MAX_CONFIG_VALUES + 1)
            continue
        if ident in size:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{at(node)}: {_dotted(path_of[ident])} nests more than {MAX_CONFIG_DEPTH} levels deep")
        if isinstance(node, yaml.ScalarNode) and _LONE_SURROGATE.search(node.value):
            raise ConfigError(f"{at(node)}: {_dotted(path_of[ident])} holds a lone surrogate "
                              f"({ascii(_LONE_SURROGATE.search(node.value).group())[1:-1]}): not Unicode text, so no "
                              f"tokenizer can encode it")
        if isinstance(node, yaml.MappingNode):
            _refuse_duplicate_keys(node, path_of[ident], at)
        open_nodes.add(ident)
        stack.append((node, depth, True))
        for label, child in reversed(children):
            if id(child) in open_nodes:
                raise ConfigError(f"{at(child)}: {_dotted(path_of[ident])}: an alias refers to the node that holds it, "
                                  f"so the value would contain itself without end")
            path_of.setdefault(id(child), _join_key(path_of[ident], label))
            stack.append((child, depth + 1, False))
    if size[id(root)] > MAX_CONFIG_VALUES:
        node = root
        while True:  # name the innermost node that alone goes past the bound
            bigger = [child for _, child in _child_nodes(node) if size[id(child)] > MAX_CONFIG_VALUES]
            if not bigger:
                break
            node = bigger[0]
        raise ConfigError(f"{at(node)}: {_dotted(path_of[id(node)])} expands through YAML "
                          f"aliases to more than {MAX_CONFIG_VALUES} values, more than a config may hold")


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _child_nodes(node: yaml.Node) -> list[tuple[str, yaml.Node]]:
    """``(label, child)`` of a mapping (values labelled by their key; a merge ``<<`` by ``<<``)
    or a sequence (``[i]``); keys that are collections count as children too."""
    if isinstance(node, yaml.MappingNode):
        pairs = []
        for key_node, value_node in node.value:
            label = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            pairs.append((f"{label} (the key)" if label != "?" else label, key_node))
            pairs.append((label, value_node))
        return pairs
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{index}]", child) for index, child in enumerate(node.value)]
    return []


def _refuse_duplicate_keys(node: yaml.MappingNode, path: str, at: Callable[[yaml.Node], str]) -> None:
    first_line: dict[tuple[str, str], int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # keys merged in with << may be overridden: that is what a merge is for
        identity = (key_node.tag, key_node.value)
        line = key_node.start_mark.line + 1
        if identity in first_line:
            raise ConfigError(f"{at(key_node)}: duplicate key '{_join_key(path, key_node.value)}' (first at line "
                              f"{first_line[identity]}): YAML would keep only the last value; give each key once")
        first_line[identity] = line


def _join_key(path: str, label: str) -> str:
    label = _short_text(str(label), 40).encode("utf-8", "backslashreplace").decode("utf-8")  # printable, always
    return path + label if label.startswith("[") or not path else f"{path}.{label}"


def _dotted(path: str) -> str:
    return f"'{path}'" if path else "the document"


def _short_text(text: str, limit: int = 200) -> str:
    """``text`` on one line, cut to ``limit`` characters with the count of those cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def _short_repr(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for an error line, cut to ``limit`` characters; a huge value is never
    rendered whole (its repr is built from a bounded copy)."""
    return _short_text(repr(_bounded_copy(value)), limit)


def _bounded_copy(value: Any, items: int = 20, depth: int = 4) -> Any:
    """A copy of ``value`` with at most ``items`` entries per list or dict and ``depth`` levels,
    long strings cut: small enough to render whatever the input was."""
    if isinstance(value, str):
        return value if len(value) <= 200 else value[:200] + "..."
    if depth == 0 and isinstance(value, (list, tuple, dict)):
        return "..."
    if isinstance(value, (list, tuple)):
        shown = [_bounded_copy(item, items, depth - 1) for item in value[:items]]
        return shown + ([f"... {len(value) - items} more"] if len(value) > items else [])
    if isinstance(value, dict):
        shown = {_bounded_copy(k, items, 0): _bounded_copy(v, items, depth - 1) for k, v in list(value.items())[:items]}
        if len(value) > items:
            shown["..."] = f"{len(value) - items} more"
        return shown
    return value


def validate_config(schema: type[ConfigT], raw: dict[str, Any], source: str = "config") -> ConfigT:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe_error(schema, exc)}") from None


def _describe_error(schema: type[BaseModel], exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = [_short_text(str(part), 60) for part in error["loc"]]
    loc = [part for i, part in enumerate(loc)  # RewardSpec's union tags are not keys
           if not (i and loc[i - 1] == "reward" and part in REWARD_SPEC_TAGS)]
    loc, in_source = _data_setting_loc(loc)
    key = ".".join(loc)
    if error["type"] == "extra_forbidden" and in_source:
        close = difflib.get_close_matches(loc[-1], list(DataSource.model_fields), n=1, cutoff=0.5)
        suggestion = f" (did you mean '{'.'.join(loc[:-1] + close)}'?)" if close else ""
        return f"unknown key '{key}'{suggestion}; known keys here: {', '.join(DataSource.model_fields)}"
    if error["type"] == "extra_forbidden":
        known = _field_names(schema, loc[:-1])
        hint = nearest_key(schema, loc)
        suggestion = f" (did you mean '{hint}'?)" if hint else ""
        return f"unknown key '{key}'{suggestion}; known keys here: {', '.join(known)}"
    message = error["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if not key:
        return message
    if message.startswith("[") and error["type"] == "value_error":
        return f"{key}{message}"  # a list of data sources: "[1].name: ..." after the setting's key
    if isinstance(error.get("input"), dict) and error["type"] == "value_error":
        return f"{key}: {message}"  # a whole section's check: its message names the key; the input is noise
    message = _short_text(message, 300)
    return f"{key}: {message} (got {_short_repr(error.get('input'))})" if error["type"] != "missing" else f"{key}: required"


def _data_setting_loc(loc: list[str]) -> tuple[list[str], bool]:
    """An error's ``loc`` inside a data setting (``DataSetting``: a path or a list of sources)
    with the union's tags dropped and a source's index joined to its key, and whether it lies
    inside one source: ``data.train.list.1.source.weight`` -> ``(data.train[1].weight, True)``.

    >>> _data_setting_loc(["sft", "data", "train", "list", "1", "source", "weight"])
    (['sft', 'data', 'train[1]', 'weight'], True)
    >>> _data_setting_loc(["data", "val", "path"])
    (['data', 'val'], False)
    """
    for at in range(1, len(loc) - 1):
        if loc[at - 1] == "data" and loc[at] in ("train", "val", "eval") and loc[at + 1] in DATA_SOURCE_TAGS:
            head, rest = loc[: at + 1], loc[at + 2 :]
            if not (rest and rest[0].isdigit()):
                return head + rest, False
            head[-1] += f"[{rest[0]}]"
            rest = rest[1:]
            return head + (rest[1:] if rest and rest[0] in DATA_SOURCE_TAGS else rest), True
    return loc, False


def nearest_key(schema: type[BaseModel], loc: list[str]) -> str | None:
    """The real dotted key an unknown key ``loc`` most likely meant, looking across sections:
    the same name in another section (``train.lr`` -> ``optim.lr``, a misplaced key), else a
    close spelling in the same section (``optim.learning_rat``), else a close spelling anywhere.

    >>> nearest_key(SFTConfig, ["train", "lr"]), nearest_key(SFTConfig, ["optim", "l_r"]), nearest_key(SFTConfig, ["lr"])
    ('optim.lr', 'optim.lr', 'optim.lr')
    """
    everywhere = all_keys(schema)
    section, leaf = loc[:-1], loc[-1]
    prefix = ".".join(section)
    same_leaf = [key for key in everywhere if key.rsplit(".", 1)[-1] == leaf and key != ".".join(loc)]
    if same_leaf:  # the shortest path, then the one closest to where it was written
        return min(same_leaf, key=lambda key: (key.count("."), -difflib.SequenceMatcher(None, key, ".".join(loc)).ratio()))
    here = difflib.get_close_matches(leaf, _field_names(schema, section), n=1, cutoff=0.5)
    if here:
        return ".".join(section + [here[0]])
    leaves = {key: key.rsplit(".", 1)[-1] for key in everywhere if key.rsplit(".", 1)[0] != prefix or "." not in key}
    close = difflib.get_close_matches(leaf, list(dict.fromkeys(leaves.values())), n=1, cutoff=0.75)
    if close:
        return min((key for key, name in leaves.items() if name == close[0]), key=lambda key: key.count("."))
    return None


def all_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config schema, sections included (``optim``, ``optim.lr``, ...)."""
    keys = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        section = _section_class(field.annotation)
        if section is not None:
            keys += all_keys(section, key + ".")
    return keys


def _section_class(annotation: Any) -> type[BaseModel] | None:
    """The config section an annotation holds (``Section`` or ``Section | None``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((arg for arg in typing.get_args(annotation) if isinstance(arg, type) and issubclass(arg, BaseModel)), None)


def describe_schema(schema: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None) -> list[str]:
    """``posttrain config <command>``: every key of ``schema`` with its type, default and
    description, as YAML a config file can start from (sections as mappings, the rest as
    ``key: default  # type: description``). ``defaults``: the section's default instance (a
    command's own defaults, e.g. ``run.name: rl``)."""
    lines = []
    indent = "  " * prefix.count(".")
    for name, field in schema.model_fields.items():
        section = _section_class(field.annotation)
        note = f"  # {field.description}" if field.description else ""
        own = getattr(defaults, name, None) if defaults is not None else None
        if section is not None and typing.get_origin(field.annotation) is list:
            items = describe_schema(section, f"{prefix}{name}.")
            lines.append(f"{indent}{name}:{note} (a list; each item:)")
            lines += [f"{indent}  - {line.strip()}" if k == 0 else f"{indent}  {line}" for k, line in enumerate(items)]
        elif section is not None and not isinstance(field.annotation, type) and field.default is None:
            lines.append(f"{indent}{name}:{note or '  #'} (optional section; absent = off)")
            lines += [f"#{line}" for line in describe_schema(section, f"{prefix}{name}.")]
        elif section is not None:
            doc = (section.__doc__ or "").strip().splitlines()
            lines.append(f"{indent}{name}:{note or (f'  # {doc[0]}' if doc else '')}")
            instance = own if isinstance(own, BaseModel) else field.default if isinstance(field.default, BaseModel) else None
            lines += describe_schema(section, f"{prefix}{name}.", instance)
        else:
            default = field.get_default(call_default_factory=True) if not field.is_required() else None
            if defaults is not None and not field.is_required():
                default = own
            value = "<required>" if field.is_required() else yaml.safe_dump(
                _jsonable(default), default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
            kind = _type_name(field.annotation)
            lines.append(f"{indent}{name}: {value}  # {kind}" + (f": {field.description}" if field.description else ""))
    return lines


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, tuple):
        return list(value)
    return value


def _type_name(annotation: Any) -> str:
    """A type as a user reads it: validation metadata left out, classes by name, unions with ``|``.

    >>> _type_name(RLConfig.model_fields["reward"].annotation)
    'str | CompositeReward | NamedReward'
    >>> _type_name(dict[str, Any] | None), _type_name(Literal["a", "b"]), _type_name(list[int])
    ('dict[str, Any] | None', "Literal['a', 'b']", 'list[int]')
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is Literal:
        return f"Literal[{', '.join(repr(arg) for arg in args)}]"
    if annotation is type(None):
        return "None"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(arg) for arg in args)}]"
    if isinstance(annotation, type) or annotation is Any:
        return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
    return str(annotation).replace("typing.", "").replace("NoneType", "None")


def _field_names(schema: type[BaseModel], loc: list[str]) -> list[str]:
    model: Any = schema
    for part in loc:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):  # Optional[Section]: the section
            model = next((arg for arg in typing.get_args(model)
                          if isinstance(arg, type) and issubclass(arg, BaseModel)), model)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def config_to_yaml(config: BaseModel) -> str:
    """The resolved config as YAML (what the run directory keeps)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ----------------------------------------------------------------------------- pipeline


# ``posttrain eval``: a model, sampling settings and a list of tasks (configs/eval_cpu.yaml).


class SamplingConfig(Section):
    n: int = Field(1, gt=0, description="completions per prompt (pass@k needs n >= k)")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0 = off")
    max_new_tokens: int = Field(256, gt=0)
    seed: int | list[int] | None = Field(
        0, description="generation seed; a list such as [0, 1, 2] (temperature > 0) evaluates every task once per "
                       "seed and reports the mean, the spread over seeds and each seed's figure")

    @field_validator("seed")
    @classmethod
    def _seeds_in_range(cls, value: int | list[int] | None) -> int | list[int] | None:
        seeds = value if isinstance(value, list) else [] if value is None else [value]
        if isinstance(value, list) and not value:
            raise ValueError("an empty list: give one seed or several")
        if any(not 0 <= seed <= MAX_SEED for seed in seeds):
            raise ValueError(f"seeds are 0 .. {MAX_SEED}")
        if len(set(seeds)) < len(seeds):
            raise ValueError("a seed is listed twice")
        return value

    @model_validator(mode="after")
    def _several_seeds_sample(self) -> "SamplingConfig":
        if isinstance(self.seed, list) and len(self.seed) > 1 and self.temperature == 0:
            raise ValueError(f"seed lists {len(self.seed)} seeds but temperature is 0: greedy decoding gives the "
                             "same completions for every seed; set temperature > 0 or give one seed")
        return self

    @property
    def seeds(self) -> list[int | None]:
        """The generation seeds: the list, or the one seed (None: unseeded)."""
        return list(self.seed) if isinstance(self.seed, list) else [self.seed]


class EvalTaskConfig(Section):
    name: Literal["humaneval", "reasoning_gym", "jsonl", "perplexity"] = Field(description="task loader")
    label: str | None = Field(None, description="name shown in the table and files (default: derived)")
    dataset: str | None = Field(None, description="reasoning_gym: dataset name, e.g. basic_arithmetic")
    params: dict[str, Any] = Field(default_factory=dict, description="reasoning_gym: dataset parameters")
    path: str | None = Field(None, description="jsonl / perplexity: the data file")
    limit: int | None = Field(None, gt=0, description="problems (or conversations) used; default: the top-level limit")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="subset / generation seed; default: the top-level seed")
    reward: RewardSpec | None = Field(None, description="jsonl: reward spec (name + params), default math or code by row keys")
    format: dict[str, Any] | None = Field(
        None, description="format reward parameters (pattern, required_tags, tool_call) for a compliance rate"
    )
    system_prompt: str | None = Field("default", description="reasoning_gym: SYSTEM_PROMPTS key, text, or null")
    max_new_tokens: int | None = Field(None, gt=0, description="overrides sampling.max_new_tokens for this task")
    agent: AgentConfig | None = Field(
        None, description="offer tools: each completion is a multi-turn trajectory (tool-call rate, error rate and "
                          "turns are reported; the reward reads the answer after the last tool output)")

    @model_validator(mode="after")
    def _required_fields(self) -> "EvalTaskConfig":
        if self.name == "reasoning_gym" and not self.dataset:
            raise ValueError("a reasoning_gym task needs 'dataset' (e.g. basic_arithmetic)")
        if self.name in ("jsonl", "perplexity") and not self.path:
            raise ValueError(f"a {self.name} task needs 'path'")
        return self


class EvalConfig(Section):
    """``posttrain eval``: generate, score, and report pass@k / accuracy / perplexity."""

    run: RunConfig = RunConfig(name="eval")
    model: ModelConfig = ModelConfig()
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")
    batch_size: int = Field(16, gt=0, description="prompts generated together")
    sampling: SamplingConfig = SamplingConfig()
    pass_k: list[int] = Field(default_factory=lambda: [1], description="k values reported as pass@k (k <= n)")
    limit: int | None = Field(20, gt=0, description="default problems per task (null = all)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="default subset seed")
    sandbox_workers: int | None = Field(None, gt=0, description="parallel sandboxed runs (default min(8, cores))")
    code_timeout: float = Field(10.0, gt=0, description="seconds per sandboxed program")
    unsafe_process_isolation: bool = Field(
        False, description="allow HumanEval to run model code in 'process' isolation (no namespaces: the code "
        "sees the filesystem, behind a bypassable audit hook) where namespace isolation is unavailable")
    tasks: list[EvalTaskConfig] = Field(min_length=1, description="what to evaluate")
    headline_task: str | None = Field(
        None, description="the task the report's headline follows across stages (a task's label or derived name, "
                          "e.g. arith_tool); default: the first task")

    @model_validator(mode="after")
    def _k_fits_n(self) -> "EvalConfig":
        for k in self.pass_k:
            if k < 1 or k > self.sampling.n:
                raise ValueError(f"pass_k: {k} needs 1 <= k <= sampling.n ({self.sampling.n})")
        return self


class PipelineRunConfig(Section):
    """Where a pipeline run lives: ``<output_dir>/<name>/`` with one sub-directory per stage."""

    name: RunName = Field("pipeline", description="run name; the run directory is <output_dir>/<name> (one directory name)")
    output_dir: str = Field("runs", description="parent directory of run directories")
    overwrite: bool = Field(False, description="redo every stage, even those already done")
    report: bool = Field(True, description="write report.html (and print the summary) at the end")


class PipelineConfig(Section):
    """``posttrain pipeline``: baseline eval -> SFT -> eval -> DPO -> eval -> reward model -> RL -> eval, one run directory.

    Each stage section is the config of that stage's own command (``posttrain sft``, ``rm``,
    ``rl``, ``eval``), so a pipeline config is the union of stage configs; a stage runs when
    its section is present. The pipeline fills in what links the stages: every stage's
    ``model.name`` (``model.name`` here for the first, the previous stage's ``final/`` after)
    and ``run.name`` / ``run.output_dir`` (``<run>/<stage>``); setting those inside a stage
    section is an error.
    """

    run: PipelineRunConfig = PipelineRunConfig()
    model: ModelConfig = Field(ModelConfig(), description="the starting model (what baseline eval and the first stage use)")
    eval_baseline: bool = Field(True, description="evaluate the starting model before any training (needs 'eval')")
    eval: EvalConfig | None = Field(None, description="held-out evaluation after every stage that changes the policy")
    sft: SFTConfig | None = Field(None, description="supervised fine-tuning (posttrain sft's config)")
    dpo: DPOConfig | None = Field(None, description="preference optimisation (posttrain dpo's config) from the previous policy")
    rm: RMConfig | None = Field(None, description="reward-model training (posttrain rm's config); RL's 'model' reward uses it")
    rl: RLConfig | None = Field(None, description="reinforcement learning (posttrain rl's config) from the previous policy")

    @model_validator(mode="before")
    @classmethod
    def _links_are_the_pipelines(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        for section_name in ("eval", "sft", "dpo", "rm", "rl"):
            section = raw.get(section_name)
            if not isinstance(section, dict):
                continue
            if isinstance(section.get("model"), dict) and "name" in section["model"]:
                raise ValueError(
                    f"{section_name}.model.name: the pipeline chains models (the first stage starts from "
                    f"model.name, later ones from the previous stage's final/); set model.name at the top")
            for key in ("name", "output_dir"):
                if isinstance(section.get("run"), dict) and key in section["run"]:
                    raise ValueError(
                        f"{section_name}.run.{key}: the pipeline places stages in <run.output_dir>/<run.name>/"
                        f"{section_name}; set run.{key} at the top")
        if not any(raw.get(name) is not None for name in ("eval", "sft", "dpo", "rm", "rl")):
            raise ValueError("the pipeline has no stages: add at least one of the sections eval, sft, dpo, rm, rl")
        return raw


def load_pipeline_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """``load_config`` for ``posttrain pipeline``."""
    return load_config(PipelineConfig, path, overrides)
