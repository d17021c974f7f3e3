"""posttrain's Python API: every command as a function, the command line a thin layer over it.

    import posttrain as pt

    result = pt.sft("configs/sft_quickstart.yaml", overrides={"train.max_steps": 4})
    result.final_model                   # runs/sft_quickstart/final, a Hugging Face directory

    def brevity(completions, **kwargs):  # TRL's reward convention (posttrain's works too)
        return [-len(c) / 100 for c in completions]

    result = pt.rl({"data": {"train": "examples/data/rl_arithmetic_train.jsonl"}},
                   reward=["math", (brevity, 0.1)], overrides={"train.max_steps": 2})
    result.scores                        # held-out scores (data.eval), result.metrics the last logged

``config`` is a YAML path, a dict shaped like the YAML, a typed config
(``posttrain.config.SFTConfig``, ...), or None for the command's defaults. ``overrides`` is one
form: a mapping of the dotted keys the YAML, ``posttrain config COMMAND`` and the command line
use (``{"train.max_steps": 5, "optim.lr": 1e-5}``), values used as given; the command line's
``["train.max_steps=5"]`` strings (values parsed as YAML) are accepted too. Errors are one-line
``posttrain.errors.UserError`` s naming the file, key or override, raised before a model loads.

``push(run_dir, "org/name")`` uploads a finished run's ``final/`` with a model card generated from
the run (``posttrain.model_card``); ``run.push_to_hub`` does it after training.

``dry_run=True`` (sft, rm, dpo, rl, pipeline) runs every check that needs no model (settings,
the data audit, prompts and the reward pre-flight, the schedule, the run directory and its
checkpoints) and returns a ``Plan`` saying what would run; nothing is trained or written.

``reward`` (rl, pipeline) is a reward spec as in the config (``"math"``, a mapping), a Python
callable in posttrain's convention ``(prompts, completions, metadata)`` or TRL's
``(prompts, completions, **kwargs)`` (``rewards.registry``), or a list of those, each alone or
as ``(reward, weight)``: a weighted sum (``rewards.composite``), one ``reward/<name>`` metric per
term. A callable becomes the config's reward by name (``module:function`` when it is importable
from a module, else registered in ``python_rewards`` here), so the resolved ``config.yaml``
names it and the registry builds, checks and wraps it exactly as it does a configured one.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from pydantic import BaseModel

from posttrain.config import (
    DPOConfig,
    EvalConfig,
    Overrides,
    PipelineConfig,
    RLConfig,
    RMConfig,
    SFTConfig,
    plain_reward_spec,
    read_config_file,
    validate_with_overrides,
)
from posttrain.errors import ConfigError

SCHEMAS: dict[str, type[BaseModel]] = {
    "sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "rl": RLConfig, "eval": EvalConfig, "pipeline": PipelineConfig}

ConfigSource = str | os.PathLike | Mapping[str, Any] | BaseModel | None

# Python reward callables that no module exports by name, registered by ``reward_spec`` so a
# config can name them: ``posttrain.api:python_rewards.<name>``.
python_rewards = types.SimpleNamespace()


@dataclass
class Result:
    """What a command left: ``run_dir``, ``final_model`` (a Hugging Face directory), ``steps``,
    ``metrics`` (the last logged value of every training metric), ``scores`` (held-out: validation
    metrics, RL's ``data.eval`` after training, each eval task's metrics, a pipeline's per stage)
    and ``scores_before`` (RL: before the first step; a pipeline: its baseline evaluation).
    ``raw`` is the trainer's own result (``SFTResult``, ``RLResult``, ...)."""

    command: str
    config: BaseModel
    run_dir: Path | None
    final_model: Path | None
    steps: int | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    scores_before: dict[str, Any] = field(default_factory=dict)
    raw: Any = field(default=None, repr=False)


@dataclass
class Plan:
    """A dry run's verdict: the checks passed (or, for a pipeline, ``errors``) and ``lines``
    saying what would run; ``str(plan)`` is what ``--dry-run`` prints."""

    command: str
    config: BaseModel
    lines: list[str]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    raw: Any = field(default=None, repr=False)

    def __str__(self) -> str:
        return "\n".join(self.lines)


# ----------------------------------------------------------------------------- configs


def make_config(command: str, config: ConfigSource = None, overrides: Overrides | None = None, *,
                reward: Any = None) -> BaseModel:
    """The validated config of ``command`` from ``config`` (path, dict, typed config or None)
    with ``overrides`` (see the module docstring) and, for rl and pipeline, ``reward``."""
    if command not in SCHEMAS:
        raise ConfigError(f"unknown command {command!r}; one of {', '.join(SCHEMAS)}")
    schema = SCHEMAS[command]
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides or ())
    if reward is not None:
        if command not in ("rl", "pipeline"):
            raise ConfigError(f"reward: {command} takes no reward (rl and pipeline do)")
        items.append(("reward" if command == "rl" else "rl.reward", reward_spec(reward)))
    if isinstance(config, BaseModel):
        if not isinstance(config, schema):
            raise ConfigError(f"config: {command} takes a {schema.__name__}, not a {type(config).__name__}")
        if not items:
            return config
        raw, source = config.model_dump(exclude_unset=True), f"{schema.__name__} object"
    elif isinstance(config, Mapping):
        raw, source = copy.deepcopy(dict(config)), "config"
    elif isinstance(config, (str, os.PathLike)):
        raw, source = read_config_file(config), str(config)
    elif config is None:
        raw, source = {}, "config"
    else:
        raise ConfigError(f"config: a YAML path, a dict or a {schema.__name__}, not a {type(config).__name__}")
    return validate_with_overrides(schema, raw, items, source)


def reward_spec(reward: Any) -> Any:
    """The config reward spec for ``reward`` (see the module docstring): a spec is returned as it
    is, a callable by name, a list (or one ``(reward, weight)`` pair) as a composite.

    >>> reward_spec(["math", ("format", 0.2)])
    {'name': 'composite', 'terms': {'math': {'reward': 'math', 'weight': 1.0}, 'format': {'reward': 'format', 'weight': 0.2}}}
    >>> def shout(completions, **kwargs): return [float(c.isupper()) for c in completions]
    >>> reward_spec(shout)
    'posttrain.api:python_rewards.shout'
    """
    if isinstance(reward, BaseModel):
        return plain_reward_spec(reward)
    if isinstance(reward, (str, Mapping)):
        return reward
    if _is_weighted(reward):
        reward = [reward]
    if callable(reward):
        return callable_name(reward)
    if isinstance(reward, (list, tuple)) and reward:
        terms: dict[str, dict[str, Any]] = {}
        for index, item in enumerate(reward):
            weight = 1.0
            if _is_weighted(item):
                item, weight = item
            key, term = _composite_term(item, f"reward[{index}]")
            unique, count = key, 2
            while unique in terms:
                unique, count = f"{key}_{count}", count + 1
            terms[unique] = {**term, "weight": float(weight)}
        return {"name": "composite", "terms": terms}
    raise ConfigError(f"reward: a callable, a reward spec (a name or a mapping with 'name'), or a non-empty list of "
                      f"those, each alone or as (reward, weight); got {type(reward).__name__}")


def _is_weighted(item: Any) -> bool:
    return (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (int, float))
            and not isinstance(item[1], bool))


def _composite_term(item: Any, key: str) -> tuple[str, dict[str, Any]]:
    """(term name, term spec without its weight) of one item of a reward list."""
    if isinstance(item, BaseModel):
        item = plain_reward_spec(item)
    if isinstance(item, str):
        return _short_name(item), {"reward": item}
    if isinstance(item, Mapping) and isinstance(item.get("name"), str):
        rest = {k: v for k, v in item.items() if k != "name"}
        return _short_name(item["name"]), {"reward": item["name"], **rest}
    if callable(item):
        name = callable_name(item)
        return _short_name(name), {"reward": name}
    raise ConfigError(f"{key}: a callable, a reward name or a mapping with 'name', alone or as (reward, weight); "
                      f"got {type(item).__name__}")


def _short_name(name: str) -> str:
    return name.rpartition(":")[2].rpartition(".")[2]


def callable_name(fn: Callable) -> str:
    """``module:qualname`` when that imports back to ``fn`` (not from ``__main__``), else the name
    it is registered under in ``python_rewards`` (its ``__name__``, made unique)."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname and module != "__main__" and "<" not in qualname:
        try:
            found: Any = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
        if found is fn:
            return f"{module}:{qualname}"
    base = re.sub(r"\W+", "_", getattr(fn, "__name__", type(fn).__name__)).strip("_")
    base = "reward" if base in ("", "lambda") else base
    name, count = base, 2
    while getattr(python_rewards, name, fn) is not fn:
        name, count = f"{base}_{count}", count + 1
    setattr(python_rewards, name, fn)
    return f"{__name__}:python_rewards.{name}"


# ----------------------------------------------------------------------------- the commands


def sft(config: ConfigSource = None, *, overrides: Overrides | None = None, dry_run: bool = False) -> Result | Plan:
    """``posttrain sft``: supervised fine-tuning. Returns a ``Result`` (``scores``: ``val/*``),
    or with ``dry_run`` a ``Plan``."""
    loaded = make_config("sft", config, overrides)
    if dry_run:
        return _plan_sft(loaded)
    from posttrain.train.sft import run_sft

    _choose_threads()
    raw = run_sft(loaded)
    _push_if_asked(loaded, raw.run_dir)
    metrics = _last_values(raw.history)
    return Result("sft", loaded, raw.run_dir, raw.final_dir, raw.steps, metrics,
                  {key: value for key, value in metrics.items() if key.startswith("val/")}, raw=raw)


def rm(config: ConfigSource = None, *, overrides: Overrides | None = None, dry_run: bool = False) -> Result | Plan:
    """``posttrain rm``: a reward model on preference pairs. ``scores``: held-out ``val/*``."""
    return _train_on_pairs("rm", config, overrides, dry_run)


def dpo(config: ConfigSource = None, *, overrides: Overrides | None = None, dry_run: bool = False) -> Result | Plan:
    """``posttrain dpo``: direct preference optimisation. ``scores``: held-out ``val/*``."""
    return _train_on_pairs("dpo", config, overrides, dry_run)


def _train_on_pairs(trainer: str, config: ConfigSource, overrides: Overrides | None, dry_run: bool) -> Result | Plan:
    """``rm`` or ``dpo``: both read preference pairs and report held-out ``val/*``."""
    loaded = make_config(trainer, config, overrides)
    if dry_run:
        return _plan_pairs(trainer, loaded)
    if trainer == "rm":
        from posttrain.train.rm import run_rm as run
    else:
        from posttrain.train.dpo import run_dpo as run

    _choose_threads()
    raw = run(loaded)
    _push_if_asked(loaded, raw.run_dir)
    return Result(trainer, loaded, raw.run_dir, raw.final_dir, raw.steps, _last_values(raw.history),
                  dict(raw.val_metrics), raw=raw)


def rl(config: ConfigSource = None, *, reward: Any = None, overrides: Overrides | None = None,
       dry_run: bool = False) -> Result | Plan:
    """``posttrain rl``: on-policy RL. ``reward`` replaces the config's (see the module
    docstring). ``scores``: the held-out evaluation after training (``data.eval``),
    ``scores_before`` the one before the first step (``train.eval_before``)."""
    loaded = make_config("rl", config, overrides, reward=reward)
    if dry_run:
        return _plan_rl(loaded)
    from posttrain.train.rl import run_rl

    _choose_threads()
    raw = run_rl(loaded)
    _push_if_asked(loaded, raw.run_dir)
    return Result("rl", loaded, raw.run_dir, raw.final_dir, raw.steps, _last_values(raw.history),
                  dict(raw.eval_after), dict(raw.eval_before), raw=raw)


def eval(config: ConfigSource = None, *, overrides: Overrides | None = None, print_table: bool = True) -> Result:
    """``posttrain eval``: evaluate a model on the config's tasks. ``scores``: ``{"task/metric": value}``;
    ``run_dir`` holds ``eval/results.json`` and ``eval/samples.jsonl``."""
    loaded = make_config("eval", config, overrides)
    from posttrain.eval.runner import run_eval

    _choose_threads()
    results = run_eval(loaded, print_table=print_table)
    scores = {f"{result.name}/{key}": value for result in results for key, value in result.metrics.items()}
    return Result("eval", loaded, Path(loaded.run.output_dir) / loaded.run.name, None, None, {}, scores, raw=results)


def pipeline(config: ConfigSource = None, *, reward: Any = None, overrides: Overrides | None = None,
             dry_run: bool = False, allow_missing_data: bool = False) -> Result | Plan:
    """``posttrain pipeline``: the stages of the config in one run directory. ``reward`` replaces
    ``rl.reward``. ``final_model``: the last policy stage's ``final/``; ``scores``: every
    evaluation after a stage (``"<stage>/<task>"``) and DPO's held-out metrics (``"dpo/val/*"``);
    ``scores_before``: the baseline evaluation; ``metrics``: each training stage's last logged
    values (``"<stage>/<metric>"``). ``dry_run``: the pipeline's own dry run (``Plan.errors``
    lists what would stop it; ``allow_missing_data`` turns missing data files into warnings)."""
    from posttrain import pipeline as stages

    loaded = make_config("pipeline", config, overrides, reward=reward)
    run_dir = stages.run_dir_of(loaded)
    plan = stages.build_plan(loaded, run_dir)
    if dry_run:
        report = stages.dry_run(loaded, allow_missing_data=allow_missing_data)
        lines = [f"pipeline dry run: {run_dir} (nothing loaded)"]
        lines += [f"  {stage.name:<10} {stage.kind:<5} from {stage.model_in}" for stage in report.stages]
        lines += [f"warning: {warning}" for warning in report.warnings]
        lines += [f"error: {error}" for error in report.errors]
        if not report.errors:
            lines.append(f"config OK: {len(report.stages)} stages")
        return Plan("pipeline", loaded, lines, list(report.errors), list(report.warnings), raw=report)
    if allow_missing_data:
        raise ConfigError("allow_missing_data applies to dry runs only: a real run needs its data")
    _choose_threads()
    markers = stages.run_pipeline(loaded)
    policies = [stage for stage in plan if stage.output is not None and stage.kind != "rm"]
    scores: dict[str, Any] = {}
    before: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    for stage in plan:
        marker = markers.get(stage.name) or {}
        if stage.kind == "eval":
            target = before if stage.eval_label == "baseline" else scores
            prefix = "" if stage.eval_label == "baseline" else f"{stage.eval_label}/"
            target.update({f"{prefix}{task}": value for task, value in (marker.get("scores") or {}).items()})
        elif stage.output is not None:
            scores.update({f"{stage.name}/{key}": value for key, value in (marker.get("val") or {}).items()})
            logged = _read_metrics(stage.output.parent / "metrics.jsonl")
            metrics.update({f"{stage.name}/{key}": value for key, value in logged.items()})
    final = policies[-1].output if policies else None
    return Result("pipeline", loaded, run_dir, final, None, metrics, scores, before, raw=markers)


def push(run_dir: str | os.PathLike, repo_id: str) -> str:
    """``posttrain push``: upload a finished run's ``final/`` to the hub model repo ``repo_id``
    (org/name) with a model card generated from the run (``model_card``: base model, data
    stamps, config, final metrics, held-out scores with their 95% intervals); returns the repo's
    URL. One-line ``UserError`` when no hub is reachable, before anything is read or written."""
    from posttrain.model_card import push_run

    return push_run(run_dir, repo_id)


def _push_if_asked(config: Any, run_dir: Path | None) -> None:
    """``run.push_to_hub``: push the finished run, from rank 0 only (torchrun's ``RANK``)."""
    if config.run.push_to_hub and run_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        from posttrain.log import say

        say(f"pushed {run_dir / 'final'} to {push(run_dir, config.run.push_to_hub)}", stdout=True)


# ----------------------------------------------------------------------------- dry runs


def _plan_sft(config: SFTConfig) -> Plan:
    from posttrain.models import load_tokenizer
    from posttrain.train import sft as trainer
    from posttrain.train.steps import check_schedule

    trainer.check_settings(config)
    info = _planning_info()
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train, val = trainer.load_sft_samples(config, tokenizer, info)
    planner = trainer.make_planner(config, train, info.world_size)
    total = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup = check_schedule(config, total, has_val=bool(val))
    data = f"{config.data.train}: {len(train)} samples; validation: {len(val) or 'none'}"
    return _trainer_plan("sft", config, total, warmup, data, info.world_size)


def _plan_pairs(command: str, config: RMConfig | DPOConfig) -> Plan:
    from posttrain.data.preference import load_preference_data, make_pair_planner
    from posttrain.models import load_tokenizer
    from posttrain.train.steps import check_schedule

    trainer = importlib.import_module(f"posttrain.train.{command}")
    trainer.check_settings(config)
    info = _planning_info()
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train, val = load_preference_data(config.data, tokenizer, seed=config.train.seed, keys=trainer.pair_keys(config))
    planner = make_pair_planner(train, config.train, info.world_size)
    total = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup = check_schedule(config, total, has_val=bool(val))
    data = f"{config.data.train}: {len(train)} pairs; validation: {len(val) or 'none'}"
    return _trainer_plan(command, config, total, warmup, data, info.world_size)


def _plan_rl(config: RLConfig) -> Plan:
    from posttrain.models import load_tokenizer
    from posttrain.train import rl as trainer
    from posttrain.train.rl_settings import rl_settings
    from posttrain.train.steps import pad_token_id

    info = _planning_info()
    trainer.check_settings(config, info.world_size)
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train, held_out = trainer.load_prompts(config, tokenizer, info)  # the prompt audit and the reward pre-flight
    trainer.build_reward_fn(config)
    rl_settings(config, info, pad_token_id(tokenizer), trainer.build_rl_agent(config, tokenizer))
    steps = config.train.max_steps
    data = (f"{config.data.train}: {len(train)} prompts; held out: {len(held_out) or 'none'}; "
            f"{config.rl.prompts_per_step} prompts x {config.rollout.group_size} completions a step")
    plan = _trainer_plan("rl", config, steps, None, data, info.world_size)
    plan.lines.insert(-2, f"  reward    {json.dumps(plain_reward_spec(config.reward))}")
    plan.lines.insert(-2, f"  rollouts  {config.rollout.engine}, {config.rl.algorithm} "
                          f"(advantage {config.rl.advantage}, policy loss {config.rl.policy_loss})")
    return plan


def _trainer_plan(command: str, config: Any, total_steps: int, warmup: int | None, data: str, ranks: int) -> Plan:
    schedule = (_steps(total_steps) + (f" (warmup {warmup})" if warmup else "")
                + f", {ranks} process" + ("es" if ranks > 1 else ""))
    lines = [f"{command} dry run: settings, data and run directory checked; no model loaded",
             f"  model     {config.model.name}" + (" + LoRA" if config.lora.enabled else ""),
             f"  data      {data}",
             f"  schedule  {schedule}",
             f"  run       {run_directory_plan(command, config, total_steps)}",
             f"config OK: `posttrain {command}` would train {_steps(total_steps)}"]
    return Plan(command, config, lines)


def _steps(count: int) -> str:
    return f"{count} step" + ("" if count == 1 else "s")


def run_directory_plan(command: str, config: Any, total_steps: int) -> str:
    """What the run would do with its directory: start fresh, resume a checkpoint (checked
    against the config as a real run checks it), or start over; ConfigError where the run
    would refuse it."""
    from posttrain.train import checkpoint as ckpt
    from posttrain.train.logging import holds_run
    from posttrain.train.session import check_resume_changes, checkpoint_step, run_path_of

    path, train = run_path_of(config), config.train
    snapshot = ckpt.config_snapshot(config)
    ckpt.check_allowed_keys(train.resume_allow_changes, snapshot)
    resume = ckpt.resolve_resume(train.resume, path / "checkpoints", config=config,
                                 allow_changes=train.resume_allow_changes)
    if resume is not None:
        check_resume_changes(ckpt.saved_config(resume) or {}, snapshot, checkpoint_step(resume), total_steps)
        return f"{path}: resumes from {resume}"
    if not holds_run(path):
        return f"{path}: new"
    if config.run.overwrite or train.resume is not None:
        return f"{path}: holds a run without a checkpoint to resume; starts over"
    raise ConfigError(f"run.name: {path} already holds a run; set train.resume=latest to continue it, "
                      f"run.overwrite=true to start over, or choose another run.name")


def _planning_info() -> Any:
    """One process planning for ``WORLD_SIZE`` ranks (torchrun's), on the CPU: no process group."""
    import torch

    from posttrain.train.distributed import DistInfo

    return DistInfo(0, int(os.environ.get("WORLD_SIZE", "1")), 0, torch.device("cpu"), None)


# ----------------------------------------------------------------------------- helpers


def _choose_threads() -> None:
    """The CPU threads for the machine's load (``train.threads``), unless the caller loaded torch."""
    from posttrain.train.threads import configure_threads

    configure_threads()


def _last_values(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The last value of every key over logged metric records.

    >>> _last_values([{"step": 1, "loss": 2.0, "val/loss": 3.0}, {"step": 2, "loss": 1.5}])
    {'step': 2, 'loss': 1.5, 'val/loss': 3.0}
    """
    merged: dict[str, Any] = {}
    for record in records:
        merged.update(record)
    return merged


def _read_metrics(path: Path) -> dict[str, Any]:
    """``_last_values`` of a ``metrics.jsonl`` (a missing file or a torn line: skipped)."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return _last_values([record for record in records if isinstance(record, dict)])
