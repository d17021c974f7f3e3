"""``posttrain pipeline``: the whole post-training pipeline as one command, one run directory.

docs/PIPELINE.md: Phase 1 SFT, Phase 2 reward (a learned reward model, or
rules), Phase 3 RL from the SFT model, with an evaluation after every phase. Here that is the
stage chain

    baseline eval -> sft -> eval -> dpo -> eval -> rm -> rl -> eval

where every stage is optional except that at least one must exist; a stage runs when its
section is in the config. Stages pass artefacts by path only: SFT's ``final/`` becomes the
DPO policy and its reference, the last policy stage's ``final/`` becomes the RL policy and
its frozen reference, the reward model's ``final/`` becomes RL's ``model`` reward. A pipeline run directory ``<output_dir>/<name>/`` holds

    pipeline.yaml        the resolved pipeline config
    pipeline.json        the stage plan and each stage's status (read by the report)
    stages/<stage>.json  the completion marker of a stage (written atomically at its end)
    sft/ dpo/ rm/ rl/    each a trainer run directory (metrics.jsonl, checkpoints/, final/)
    eval/<label>.json    held-out evaluations: baseline, sft, dpo, rl (+ per-sample JSONL)
    report.html          the report (``posttrain report``)

Rerunning the same command skips completed stages (their marker matches the stage's
fingerprint: its resolved config plus the fingerprints of the stages it depends on) and
resumes an interrupted training stage from its latest complete checkpoint
(``train.resume=latest``). A stage whose config changed is redone, and so is everything that
depends on it (like ``make``).

``--dry-run`` validates everything without loading a model: every stage's section (the
trainers' own pre-load checks included), the model chain, and that every file the config
names exists. Data files that are missing are errors, unless ``--allow-missing-data``, which
reports them as warnings: the realistic GPU configs under ``configs/gpu/`` point at data that
exists only on the user's cluster.

Under ``torchrun`` every rank runs the training stages (they shard with FSDP2); evaluation
stages run on rank 0 while the other ranks wait for the stage's marker file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from posttrain.config import PipelineConfig, config_to_yaml, plain_reward_spec
from posttrain.data.formats import is_hub_dataset_spec, parse_dataset_spec
from posttrain.data.mixture import data_sources, is_mixture
from posttrain.errors import ConfigError, DataError, config_section
from posttrain.log import say
from posttrain.models import MODEL_ALIASES
from posttrain.rewards.registry import build_reward

MARKER_VERSION = 1


# ----------------------------------------------------------------------------- the plan
@dataclass
class Stage:
    """One step of the pipeline: what it runs, on which model, and what it leaves behind."""

    name: str  # directory / marker name: baseline, sft, eval_sft, rm, rl, eval_rl
    kind: str  # eval | sft | rm | rl
    config: BaseModel  # the stage's own config, with paths and models filled in by the pipeline
    model_in: str  # the model this stage starts from (or evaluates)
    output: Path | None  # the artefact later stages use (a final/ directory), None for evaluations
    depends_on: list[str] = field(default_factory=list)
    eval_label: str | None = None  # eval stages: eval/<label>.json
    fingerprint: str = ""


def stage_fingerprint(config: BaseModel, upstream: list[str], files: list[str] = ()) -> str:
    """A stable hash of a stage's resolved config, its upstream stages' fingerprints and its input files.

    Only values that differ from the schema's defaults count (a field added to a schema in a
    later version does not redo finished stages). Fields the pipeline sets per attempt
    (``train.resume``, ``run.overwrite``) and display settings (``run.progress``) are left
    out, so resuming does not count as a change; so is ``eval.headline_task`` (what the report
    leads with, not what an evaluation computes). Input files count by content (``file_stamp``):
    changed data redoes the stage, rewriting identical data does not.
    """
    dumped = config.model_dump(mode="json", exclude_defaults=True)
    dumped.pop("headline_task", None)
    if isinstance(dumped.get("train"), dict):
        dumped["train"].pop("resume", None)
    if isinstance(dumped.get("run"), dict):
        dumped["run"].pop("overwrite", None)
        dumped["run"].pop("progress", None)
    stamps = {path: file_stamp(Path(path).expanduser()) for path in files}
    text = json.dumps({"config": dumped, "upstream": upstream, "files": stamps}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: Path, edge_bytes: int = 1 << 20) -> str | None:
    """A cheap content stamp of a data file: its size and a hash of its first and last MiB
    (whole small files; huge ones are not read in full). None if it does not exist.
    A directory (a datasets dir) is stamped by its files' names and sizes."""
    try:
        if path.is_dir():
            listing = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file())
            return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]
        size = path.stat().st_size
        digest = hashlib.sha256(str(size).encode())
        with open(path, "rb") as handle:
            digest.update(handle.read(edge_bytes))
            if size > 2 * edge_bytes:
                handle.seek(size - edge_bytes)
            digest.update(handle.read(edge_bytes))
        return digest.hexdigest()[:16]
    except OSError:
        return None


def _with(section: BaseModel, **updates: Any) -> BaseModel:
    """A validated copy of a config section with dotted-path updates (``run__name`` = run.name)."""
    data = section.model_dump()
    for key, value in updates.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return type(section).model_validate(data)


def _stage_model(section: BaseModel, model_name: str, top_template: str | None) -> dict[str, Any]:
    """The ``model__*`` updates of a stage: the chained model, and the top-level chat template unless the stage has one."""
    updates: dict[str, Any] = {"model__name": model_name}
    if top_template and not section.model.chat_template:
        updates["model__chat_template"] = top_template
    return updates


def build_plan(config: PipelineConfig, run_dir: Path) -> list[Stage]:
    """The ordered stages of ``config`` with every path and model filled in (no I/O)."""
    stages: list[Stage] = []
    template = config.model.chat_template
    current_model = config.model.name
    producer: str | None = None  # the stage whose output is current_model

    def add_eval(label: str) -> None:
        if config.eval is None:
            return
        # posttrain eval writes <output_dir>/<name>/eval/: a trainer's stage keeps its evaluation beside it
        eval_config = _with(config.eval, **_stage_model(config.eval, current_model, template),
                            run__output_dir=str(run_dir), run__name=label)
        stages.append(Stage("baseline" if label == "baseline" else f"eval_{label}", "eval", eval_config,
                            current_model, None, [producer] if producer else [], eval_label=label))

    def stage_config(name: str, **updates: Any) -> Any:
        section = getattr(config, name)
        return _with(section, **_stage_model(section, current_model, template), run__output_dir=str(run_dir),
                     run__name=name, **updates)

    if config.eval is not None and config.eval_baseline:
        add_eval("baseline")
    for name in ("sft", "dpo"):  # the policy stages before RL, each from the previous one's final/
        if getattr(config, name) is not None:
            output = run_dir / name / "final"
            stages.append(Stage(name, name, stage_config(name), current_model, output, [producer] if producer else []))
            current_model, producer = str(output), name
            add_eval(name)
    reward_model: str | None = None
    if config.rm is not None:
        output = run_dir / "rm" / "final"
        stages.append(Stage("rm", "rm", stage_config("rm"), current_model, output, [producer] if producer else []))
        reward_model = str(output)
    if config.rl is not None:
        rl = stage_config("rl", reward=link_model_reward(config.rl.reward, reward_model))
        output = run_dir / "rl" / "final"
        depends = [name for name in (producer, "rm" if reward_model else None) if name]
        stages.append(Stage("rl", "rl", rl, current_model, output, depends))
        current_model, producer = str(output), "rl"
        add_eval("rl")
    by_name = {stage.name: stage for stage in stages}
    for stage in stages:
        inputs = [path for _, path, what in stage_files(stage) if what in ("data", "template")]
        stage.fingerprint = stage_fingerprint(stage.config, [by_name[d].fingerprint for d in stage.depends_on], inputs)
    return stages


def link_model_reward(spec: Any, reward_model: str | None) -> Any:
    """Give every ``model`` reward in ``spec`` that names no ``path`` the RM stage's ``final/``.

    >>> link_model_reward({"name": "composite", "terms": {"model": {"weight": 0.5}, "math": {"weight": 1}}}, "r/rm/final")
    {'name': 'composite', 'terms': {'model': {'weight': 0.5, 'path': 'r/rm/final'}, 'math': {'weight': 1}}}
    >>> link_model_reward("math", None)
    'math'
    """
    spec = plain_reward_spec(spec)
    def is_model(node: dict[str, Any], key: str | None) -> bool:
        # a spec {name: model}, or a composite term keyed "model" or naming it with reward: model
        return (node.get("name") == "model" or node.get("reward") == "model"
                or (key == "model" and "name" not in node and "reward" not in node))

    def visit(node: Any, key: str | None) -> Any:
        if isinstance(node, list):
            return [visit(item, None) for item in node]
        if not isinstance(node, dict):
            return node
        node = {k: visit(v, k) for k, v in node.items()}
        if is_model(node, key) and not node.get("path") and not (node.get("params") or {}).get("path"):
            if reward_model is None:
                raise ConfigError("rl.reward: a 'model' reward needs a path, or an rm section in the pipeline to train one")
            node["path"] = reward_model
        return node

    if spec == "model":
        spec = {"name": "model"}
    return visit(spec, None)


# ----------------------------------------------------------------------------- markers and state
def _atomic_write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def marker_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "stages" / f"{stage.name}.json"


def read_marker(run_dir: Path, stage: Stage) -> dict[str, Any] | None:
    path = marker_path(run_dir, stage)
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None
    return marker if isinstance(marker, dict) and marker.get("status") == "done" else None


def write_state(run_dir: Path, stages: list[Stage], status: dict[str, dict[str, Any]]) -> None:
    """pipeline.json: the plan in order with each stage's status (what the report and users read)
    and ``eval.headline_task`` (the task the report's headline follows; null: the first)."""
    _atomic_write_json(run_dir / "pipeline.json", {
        "headline_task": next((s.config.headline_task for s in stages if s.kind == "eval"), None),
        "stages": [{"name": s.name, "kind": s.kind, "model_in": s.model_in,
                    "output": str(s.output) if s.output else None,
                    "eval": f"{s.eval_label}/eval/results.json" if s.eval_label else None,
                    "fingerprint": s.fingerprint, **status.get(s.name, {"status": "pending"})}
                   for s in stages],
    })


# ----------------------------------------------------------------------------- runners
def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def run_eval_stage(stage: Stage, run_dir: Path, resume: bool) -> dict[str, Any]:
    from posttrain.eval.runner import run_eval

    results = run_eval(stage.config)
    scores = {result.name: result.metrics.get("accuracy", result.metrics.get("ppl")) for result in results}
    intervals = {result.name: [result.metrics["accuracy/ci_low"], result.metrics["accuracy/ci_high"]]
                 for result in results if "accuracy/ci_low" in result.metrics}
    return {"results": f"{stage.eval_label}/eval/results.json", "scores": scores, "intervals": intervals}


def push_stage(config: BaseModel, stage_dir: Path) -> None:
    """A stage's ``run.push_to_hub``: upload its ``final/`` with its model card (``model_card``);
    the hub was checked before the first stage (each trainer's ``check_settings``)."""
    if getattr(config.run, "push_to_hub", None) and int(os.environ.get("RANK", "0")) == 0:
        from posttrain.model_card import push_run

        say(f"pushed {stage_dir / 'final'} to {push_run(stage_dir, config.run.push_to_hub)}")


def run_sft_stage(stage: Stage, run_dir: Path, resume: bool) -> dict[str, Any]:
    from posttrain.train.sft import run_sft

    config = _with(stage.config, train__resume="latest" if resume else None, run__overwrite=True)
    result = run_sft(config)
    push_stage(config, result.run_dir)
    return {"steps": result.steps, "final": str(result.final_dir) if result.final_dir else None}


def run_dpo_stage(stage: Stage, run_dir: Path, resume: bool) -> dict[str, Any]:
    from posttrain.train.dpo import run_dpo

    config = _with(stage.config, train__resume="latest" if resume else None, run__overwrite=True)
    result = run_dpo(config)
    push_stage(config, result.run_dir)
    return {"steps": result.steps, "final": str(stage.output), "val": result.val_metrics}


def run_rm_stage(stage: Stage, run_dir: Path, resume: bool) -> dict[str, Any]:
    from posttrain.train.rm import run_rm

    config = _with(stage.config, train__resume="latest" if resume else None, run__overwrite=True)
    result = run_rm(config)
    push_stage(config, result.run_dir)
    return {"steps": getattr(result, "steps", None), "final": str(stage.output)}


def run_rl_stage(stage: Stage, run_dir: Path, resume: bool) -> dict[str, Any]:
    from posttrain.train.rl import run_rl

    config = _with(stage.config, train__resume="latest" if resume else None, run__overwrite=True)
    result = run_rl(config)
    push_stage(config, result.run_dir)
    return {"steps": getattr(result, "steps", None), "final": str(stage.output)}


RUNNERS: dict[str, Callable[[Stage, Path, bool], dict[str, Any]]] = {
    "eval": run_eval_stage,
    "sft": run_sft_stage,
    "dpo": run_dpo_stage,
    "rm": run_rm_stage,
    "rl": run_rl_stage,
}
RANK0_ONLY = {"eval"}


# ----------------------------------------------------------------------------- the command
def run_dir_of(config: PipelineConfig) -> Path:
    return Path(config.run.output_dir) / config.run.name


def _say(message: str) -> None:
    if _rank() == 0:
        say(f"[pipeline] {message}")


def _wait_for_marker(run_dir: Path, stage: Stage, poll_s: float = 2.0) -> None:
    while True:
        marker = read_marker(run_dir, stage)
        if marker is not None and marker.get("fingerprint") == stage.fingerprint:
            return
        time.sleep(poll_s)


def run_pipeline(config: PipelineConfig, *, runners: dict[str, Callable] | None = None) -> dict[str, Any]:
    """Run every stage not yet done; return {stage name: its marker}. Writes the report at the end.

    Rank 0 holds the pipeline directory's lock throughout (``train.session.lock_run_dir``):
    a second pipeline in the same directory fails at once, naming the holder's pid."""
    from posttrain.train.session import lock_run_dir, unlock_run_dir

    checked = dry_run(config)
    if checked.errors:
        more = f" (and {len(checked.errors) - 1} more: see posttrain pipeline --dry-run)" if len(checked.errors) > 1 else ""
        raise ConfigError(checked.errors[0] + more)
    for line in checked.preflight if _rank() == 0 else ():
        say(line, stdout=True)
    lock = lock_run_dir(run_dir_of(config)) if _rank() == 0 else None
    try:
        return _run_pipeline(config, runners or RUNNERS, checked.stages)
    finally:
        unlock_run_dir(lock)


def _run_pipeline(config: PipelineConfig, runners: dict[str, Callable], stages: list[Stage]) -> dict[str, Any]:
    run_dir = run_dir_of(config)
    is_main = _rank() == 0
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.yaml").write_text(config_to_yaml(config))
    status: dict[str, dict[str, Any]] = {}
    redone: set[str] = set()
    started = time.monotonic()
    for stage in stages:
        marker = read_marker(run_dir, stage)
        if config.run.overwrite or any(d in redone for d in stage.depends_on):
            marker = None
        if marker is not None and marker.get("fingerprint") == stage.fingerprint:
            status[stage.name] = marker
            _say(f"{stage.name}: done earlier ({marker.get('wall_s', 0):.0f}s), skipped")
            continue
        resume = False
        if marker is not None:
            _say(f"{stage.name}: its config, input files or an upstream stage changed since it finished: "
                 f"running it again")
        elif not config.run.overwrite:
            attempt = _attempt_record(run_dir, stage)
            resume = attempt is not None and attempt.get("fingerprint") == stage.fingerprint and stage.kind != "eval"
            if resume and not checkpoints_match(stage):
                _say(f"{stage.name}: its checkpoints were written under another config: starting it over")
                resume = False
        redone.add(stage.name)
        status[stage.name] = {"status": "running", "fingerprint": stage.fingerprint}
        if is_main:
            _atomic_write_json(_attempt_path(run_dir, stage), {"fingerprint": stage.fingerprint,
                                                               "started_at": time.time()})
            marker_path(run_dir, stage).unlink(missing_ok=True)
            write_state(run_dir, stages, status)
        _say(f"{stage.name}: {'resuming' if resume else 'running'} ({stage.kind} on {stage.model_in})")
        stage_start = time.monotonic()
        if stage.kind in RANK0_ONLY and not is_main:
            _wait_for_marker(run_dir, stage)
            status[stage.name] = read_marker(run_dir, stage) or {}
            continue
        with config_section(_section_name(stage)):  # a stage's messages name keys as the pipeline file writes them
            details = runners[stage.kind](stage, run_dir, resume)
        _release_memory()
        wall = time.monotonic() - stage_start
        done = {"status": "done", "fingerprint": stage.fingerprint, "wall_s": round(wall, 1),
                "finished_at": time.time(), "version": MARKER_VERSION, **(details or {})}
        if is_main:
            _atomic_write_json(marker_path(run_dir, stage), done)
            write_state(run_dir, stages, {**status, stage.name: done})
        status[stage.name] = done
        _say(f"{stage.name}: done in {wall:.0f}s")
    if is_main:
        write_state(run_dir, stages, status)
        _say(f"all stages done in {time.monotonic() - started:.0f}s")
        if config.run.report:
            from posttrain.report import write_report

            path = write_report(run_dir)
            say(f"report: {path}", stdout=True)
    return status


def _release_memory() -> None:
    """Give a finished stage's model memory back before the next stage loads its own."""
    import ctypes
    import gc

    gc.collect()
    try:  # glibc keeps freed arenas; hand them back so the next stage starts from a small footprint
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:
        pass


def checkpoints_match(stage: Stage) -> bool:
    """Whether the stage's newest checkpoint (if any) was written under the stage's config.

    A stage redone after a config change runs with ``run.overwrite`` (its directory starts
    clean) and its trainer refuses checkpoints of another config; this check makes the
    pipeline start such a stage over instead of stopping on that refusal."""
    from posttrain.train import checkpoint as ckpt

    config = stage.config
    latest = ckpt.latest_checkpoint(Path(config.run.output_dir) / config.run.name / "checkpoints")
    if latest is None:
        return True
    saved = ckpt.saved_config(latest)
    allowed = getattr(getattr(config, "train", None), "resume_allow_changes", [])
    return saved is not None and not ckpt.changed_config_keys(saved, ckpt.config_snapshot(config), allowed)


def _attempt_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / "stages" / f"{stage.name}.started.json"


def _attempt_record(run_dir: Path, stage: Stage) -> dict[str, Any] | None:
    try:
        return json.loads(_attempt_path(run_dir, stage).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------- dry run
@dataclass
class DryRunReport:
    stages: list[Stage]
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    preflight: list[str] = field(default_factory=list)  # the RL stages' reward pre-flight summaries


def _check_model_spec(spec: str, key: str, produced: set[str], report: DryRunReport) -> None:
    if spec in produced:
        return  # made by an earlier stage
    if spec in MODEL_ALIASES:
        import importlib.util

        package = MODEL_ALIASES[spec][0]
        if importlib.util.find_spec(package) is None:
            report.errors.append(f"{key}: alias '{spec}' needs the package {package.replace('_', '-')}")
        return
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            report.errors.append(f"{key}: GGUF file {spec} does not exist")
    elif path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            report.errors.append(f"{key}: {spec} has no config.json (not a Hugging Face model directory)")
    elif len(spec.split("/")) == 2 and not spec.startswith((".", "/", "~")):
        report.warnings.append(f"{key}: '{spec}' is a hub id, downloaded when the stage runs (not checked offline)")
    else:
        report.errors.append(f"{key}: model {spec} not found (not an alias, a directory, a .gguf or a hub id)")


def _section_name(stage: Stage) -> str:
    return "eval" if stage.kind == "eval" else stage.kind


def stage_files(stage: Stage) -> list[tuple[str, str, str]]:
    """(dotted key in the pipeline config, path, what) of every file a stage reads; what = data | model | template."""
    section, config = _section_name(stage), stage.config
    files: list[tuple[str, str, str]] = []
    if config.model.chat_template:
        files.append((f"{section}.model.chat_template", config.model.chat_template, "template"))
    if stage.kind in ("sft", "dpo", "rm"):
        files += [(key, path, "data") for name in ("train", "val")
                  for key, path in _data_files(f"{section}.data.{name}", getattr(config.data, name))]
    elif stage.kind == "rl":
        files += [(key, path, "data") for name in ("train", "eval")
                  for key, path in _data_files(f"rl.data.{name}", getattr(config.data, name))]
        files += [(key, path, "data") for key, path in _data_files("rl.ptx.data.train", config.ptx.data.train)]
        if config.rl.critic.model:
            files.append(("rl.rl.critic.model", config.rl.critic.model, "model"))
        files += [(f"rl.reward{key}", path, "model") for key, path in _model_reward_paths(config.reward)]
    elif stage.kind == "eval":
        files += [(f"eval.tasks.{index}.path", task.path, "data") for index, task in enumerate(config.tasks)
                  if task.path]
    return files


def _data_files(key: str, setting: Any) -> list[tuple[str, str]]:
    """(key, path) of each source of a data setting: the path itself, or ``key[i]`` per source of a
    list (``data.mixture``); none when it is unset."""
    if not setting:
        return []
    if not is_mixture(setting):
        return [(key, setting)]
    return [(source.key, source.spec) for source in data_sources(setting, key)]


def _model_reward_paths(spec: Any, prefix: str = "") -> list[tuple[str, str]]:
    """(key suffix, path) of the ``model`` rewards inside a reward spec."""
    spec = plain_reward_spec(spec)
    found: list[tuple[str, str]] = []
    if isinstance(spec, dict):
        path = spec.get("path") or (spec.get("params") or {}).get("path")
        if ((spec.get("name") == "model" or spec.get("reward") == "model" or prefix.endswith(".terms.model"))
                and isinstance(path, str)):
            found.append((prefix, path))
        for key, value in spec.items():
            found += _model_reward_paths(value, f"{prefix}.{key}")
    elif isinstance(spec, list):
        for index, item in enumerate(spec):
            found += _model_reward_paths(item, f"{prefix}.{index}")
    return found


def dry_run(config: PipelineConfig, *, allow_missing_data: bool = False) -> DryRunReport:
    """Validate every stage without loading a model: model chain, files, each trainer's own pre-load checks.

    Missing data files are errors, or warnings with ``allow_missing_data`` (configs written for
    another machine); missing models and chat templates are always errors.
    """
    run_dir = run_dir_of(config)
    stages = build_plan(config, run_dir)
    report = DryRunReport(stages)
    produced: set[str] = set()
    _check_model_spec(config.model.name, "model.name", produced, report)
    for stage in stages:
        for key, path, what in stage_files(stage):
            if what == "model":
                _check_model_spec(path, key, produced, report)
            elif what == "data" and is_hub_dataset_spec(path):
                report.warnings.append(f"{key}: '{path}' is a hub dataset, loaded when the stage runs (not checked offline)")
            elif what == "data" and Path(parse_dataset_spec(path)[0]).expanduser().is_dir():
                continue  # a local dataset folder with a split or config: DIR:SPLIT
            elif not Path(path).expanduser().exists():
                message = f"{key}: {path} does not exist"
                (report.warnings if what == "data" and allow_missing_data else report.errors).append(message)
        check = PRELOAD_CHECKS.get(stage.kind)
        if check is not None:
            try:
                with config_section(_section_name(stage)):
                    check(stage.config, produced)
                if stage.kind == "rl" and not _done_earlier(run_dir, stage, config):
                    report.preflight += _rl_preflight(stage.config)
            except (ConfigError, DataError) as exc:
                report.errors.append(_in_section(_section_name(stage), str(exc)))
        if stage.output is not None:
            produced.add(str(stage.output))
    report.errors = list(dict.fromkeys(report.errors))
    report.warnings = list(dict.fromkeys(report.warnings))
    return report


def _in_section(section: str, message: str) -> str:
    """A stage check's message with its key made a pipeline key: "train.x ..." -> "sft.train.x ...".

    >>> _in_section("sft", "train.micro_batch_tokens (64) is too small")
    'sft.train.micro_batch_tokens (64) is too small'
    >>> _in_section("rl", "rl.reward: bad")
    'rl.reward: bad'
    >>> _in_section("rm", "something odd")
    'rm: something odd'
    """
    if message.startswith(section + "."):
        return message
    if re.match(r"[a-z_]+(\.[a-z_0-9@]+)+[ :(]", message):
        return f"{section}.{message}"
    return f"{section}: {message}"


def _sft_check(config: BaseModel, produced: set[str]) -> None:
    from posttrain.train.sft import check_settings

    check_settings(config)


def _rm_check(config: BaseModel, produced: set[str]) -> None:
    from posttrain.train.rm import check_settings

    check_settings(config)


def _dpo_check(config: BaseModel, produced: set[str]) -> None:
    from posttrain.train.dpo import check_settings

    check_settings(config)


def _rl_check(config: BaseModel, produced: set[str]) -> None:
    """The reward spec builds; a ``model`` reward whose model an earlier stage will train is left out."""

    spec = _drop_pending_model_rewards(config.reward, produced)
    if spec is not None:
        build_reward(spec, key="rl.reward")
    try:
        from posttrain.train.rl import check_settings
    except ImportError:  # a trainer without pre-load checks
        return
    check_settings(config)


def _done_earlier(run_dir: Path, stage: Stage, config: BaseModel) -> bool:
    """The stage finished in an earlier run with this fingerprint, so running the pipeline skips it
    (its checks need not run again)."""
    marker = read_marker(run_dir, stage)
    return (not config.run.overwrite and marker is not None
            and marker.get("fingerprint") == stage.fingerprint)


def _rl_preflight(config: BaseModel) -> list[str]:
    """The RL stage's reward pre-flight (``rewards.preflight.rl_preflight``) on its local prompt
    files, before the first stage loads a model; a reward model an earlier stage trains is
    skipped like any ``model`` reward. Files that are not there yet (or hub datasets) are left
    to the stage's own pre-flight."""
    from posttrain.rewards.preflight import read_reward_rows, rl_preflight

    data = config.data

    def rows(setting: Any, limit: int | None) -> list:  # the local files of one source or a list of them
        found: list = []
        for _, path in _data_files("data", setting):
            if not is_hub_dataset_spec(path) and Path(path).expanduser().is_file():
                found += read_reward_rows(path, columns=data.columns, system=data.system, limit=limit)
        return found

    train = rows(data.train, data.limit)
    return rl_preflight(config, train, rows(data.eval, data.eval_limit), key="rl.reward") if train else []


def _drop_pending_model_rewards(spec: Any, produced: set[str]) -> Any:
    """``spec`` without the ``model`` rewards whose path is an earlier stage's output (None if nothing is left).

    >>> _drop_pending_model_rewards({"name": "composite", "terms": {"model": {"path": "r/rm/final"}, "math": {}}},
    ...                             {"r/rm/final"})
    {'name': 'composite', 'terms': {'math': {}}}
    >>> _drop_pending_model_rewards({"name": "model", "path": "r/rm/final"}, {"r/rm/final"}) is None
    True
    """
    spec = plain_reward_spec(spec)
    def pending(node: Any, key: str | None) -> bool:
        if not isinstance(node, dict):
            return False
        is_model = node.get("name") == "model" or node.get("reward") == "model" or (key == "model" and "name" not in node)
        path = node.get("path") or (node.get("params") or {}).get("path")
        return is_model and path in produced

    if pending(spec, None):
        return None
    if isinstance(spec, dict) and isinstance(spec.get("terms"), dict):
        terms = {key: term for key, term in spec["terms"].items() if not pending(term, key)}
        return {**spec, "terms": terms} if terms else None
    return spec


def _eval_check(config: BaseModel, produced: set[str]) -> None:
    """Every task's reward and format specs build; ``headline_task`` names a task."""
    from posttrain.eval.runner import check_headline_task

    check_headline_task(config)
    for index, task in enumerate(config.tasks):
        if task.reward is not None:
            build_reward(task.reward, key=f"tasks.{index}.reward")
        if task.format is not None:
            build_reward({"name": "format", **task.format}, key=f"tasks.{index}.format")


PRELOAD_CHECKS: dict[str, Callable[[BaseModel, set[str]], None]] = {
    "sft": _sft_check, "dpo": _dpo_check, "rm": _rm_check, "rl": _rl_check, "eval": _eval_check}


def print_dry_run(report: DryRunReport, config: PipelineConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"pipeline {run_dir_of(config)} (dry run: nothing loaded)", title_justify="left")
    for column in ("stage", "kind", "model in", "writes"):
        table.add_column(column, overflow="fold")
    for stage in report.stages:
        writes = str(stage.output) if stage.output else f"{run_dir_of(config)}/{stage.eval_label}/eval/results.json"
        table.add_row(stage.name, stage.kind, stage.model_in, writes)
    console.print(table)
    for line in report.preflight:
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    for error in report.errors:
        console.print(f"[red]error:[/] {error}", highlight=False)
    if not report.errors:
        console.print(f"config OK: {len(report.stages)} stages" +
                      (f", {len(report.warnings)} warning(s)" if report.warnings else ""))
