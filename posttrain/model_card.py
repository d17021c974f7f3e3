"""A run's model card (the ``README.md`` a hub repo shows) and its upload: ``run.push_to_hub``
and ``posttrain push RUN_DIR org/name``.

``model_card`` is pure: the resolved config, the last value of every logged metric, the
held-out evaluations and the data fingerprints in, Markdown out. ``card_for_run`` reads those
from a run directory (``config.yaml``, ``metrics.jsonl``, ``eval/*.json`` through
``report.find_evals``; data stamped by ``pipeline.file_stamp``); ``push_run`` writes the card
into ``final/`` and uploads that directory with ``huggingface_hub``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from posttrain.errors import ConfigError, UserError
from posttrain.hub import hub_offline_set, hub_status

DATA_KEYS = ("train", "val", "eval")  # the data settings a card lists, in this order


@dataclass(frozen=True)
class DataLine:
    """One data source of the run: its config key (``data.train``), what it names, and its
    content stamp (``pipeline.file_stamp``: 16 hex digits), or None for a hub dataset."""

    key: str
    spec: str
    stamp: str | None


@dataclass(frozen=True)
class HeldOut:
    """One held-out score: which model and task, the metric, its value, its 95% interval
    (``ci_low``, ``ci_high``; None when the evaluation gave none) and its n."""

    label: str
    task: str
    metric: str
    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    count: int | None = None


def _number(value: float) -> str:
    return f"{value:.4g}"


def hub_model_id(name: str) -> bool:
    """Whether a model spec is a hub model id (``org/name``), not an alias, a ``.gguf`` file or a
    local directory.

    >>> [hub_model_id(n) for n in ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct", "/tmp/m", "a/b.gguf")]
    [True, False, False, False]
    """
    return (re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", name) is not None and not name.endswith(".gguf")
            and not Path(name).expanduser().exists())


def model_card(repo_id: str, config: Mapping[str, Any], metrics: Mapping[str, Any], held_out: Sequence[HeldOut],
               data: Sequence[DataLine], trainer: str) -> str:
    """The Markdown model card of a run.

    ``config``: the resolved config as a nested mapping (``config.yaml``); ``metrics``: the
    last logged value of each metric; ``trainer``: sft, rm, dpo or rl.

    >>> card = model_card("me/tiny", {"model": {"name": "base/m"}}, {"step": 2, "loss": 1.25},
    ...                   [HeldOut("run", "add", "accuracy", 0.5, 0.25, 0.75, 8)],
    ...                   [DataLine("data.train", "a.jsonl", "0123456789abcdef")], "sft")
    >>> "| add | accuracy | 0.5 | [0.25, 0.75] | 8 |" in card and "- data.train: `a.jsonl` (stamp 0123456789abcdef)" in card
    True
    """
    base = (config.get("model") or {}).get("name", "?")
    metadata = {"base_model": base} if hub_model_id(base) else {}  # the hub links a base model by its id only
    metadata.update({"library_name": "transformers", "tags": ["posttrain", trainer]})
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).rstrip(), "---", "",
             f"# {repo_id}", "",
             f"`{base}` post-trained with posttrain ({trainer}).", "", "## Data", ""]
    for line in data:
        stamp = f"stamp {line.stamp}" if line.stamp else "hub dataset"
        lines.append(f"- {line.key}: `{line.spec}` ({stamp})")
    if not data:
        lines.append("- none recorded")
    lines += ["", "Stamps are `posttrain.pipeline.file_stamp`: a hash of the file's size and first and last MiB.", ""]
    lines += ["## Held-out results", ""]
    if held_out:
        lines += ["| model | task | metric | score | 95% interval | n |", "|---|---|---|---|---|---|"]
        for result in held_out:
            interval = (f"[{_number(result.ci_low)}, {_number(result.ci_high)}]"
                        if result.ci_low is not None and result.ci_high is not None else "-")
            count = str(result.count) if result.count is not None else "-"
            lines.append(f"| {result.label} | {result.task} | {result.metric} | {_number(result.value)} | "
                         f"{interval} | {count} |")
    else:
        lines.append("No held-out evaluation in the run directory.")
    lines += ["", "## Final metrics", ""]
    shown = {key: value for key, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if shown:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_number(value)} |" for key, value in shown.items()]
    else:
        lines.append("No metrics logged.")
    lines += ["", "## Config", "", "```yaml", yaml.safe_dump(dict(config), sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def data_lines(config: Mapping[str, Any]) -> list[DataLine]:
    """The data sources of a resolved config, each stamped (local files and folders) or marked
    a hub dataset."""
    from posttrain.data.mixture import data_sources
    from posttrain.pipeline import file_stamp

    section = config.get("data") or {}
    found: list[DataLine] = []
    for name in DATA_KEYS:
        setting = section.get(name)
        if not setting:
            continue
        for source in data_sources(setting, f"data.{name}"):
            path = Path(source.path).expanduser()
            found.append(DataLine(source.key or f"data.{name}", source.spec, file_stamp(path) if path.exists() else None))
    return found


def held_out_results(run_dir: Path) -> list[HeldOut]:
    """The run's held-out scores: each evaluation's headline metric (``eval/*.json``) with its
    interval, and an RL run's last ``eval/acc`` line in ``metrics.jsonl``."""
    from posttrain.report import as_number, find_evals, find_stage_runs

    results = []
    for result in find_evals(run_dir):
        if result.score is None or result.score_key is None:
            continue
        count = as_number(result.metrics.get("num_prompts"))
        results.append(HeldOut(result.label, result.task, result.score_key, result.score,
                               as_number(result.metrics.get(f"{result.score_key}/ci_low")),
                               as_number(result.metrics.get(f"{result.score_key}/ci_high")),
                               int(count) if count is not None else None))
    for stage in find_stage_runs(run_dir):
        accuracy = stage.last("eval/acc")
        if accuracy is not None:
            count = stage.last("eval/count")
            results.append(HeldOut(stage.name, "data.eval", "acc", accuracy, stage.last("eval/acc/ci_low"),
                                   stage.last("eval/acc/ci_high"), int(count) if count is not None else None))
    return results


def card_for_run(run_dir: str | os.PathLike, repo_id: str) -> str:
    """``model_card`` of a finished run directory (``final/`` and ``config.yaml``); a one-line
    UserError when it is not one."""
    from posttrain.report import find_stage_runs

    path = Path(run_dir)
    if not (path / "final").is_dir():
        raise UserError(f"{path}: no final/ model here; push takes the directory of a finished run "
                        f"(runs/<name>, holding final/ and config.yaml)")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path / 'config.yaml'}: cannot read the run's config: {error}".splitlines()[0]) from None
    stages = find_stage_runs(path)
    metrics: dict[str, Any] = {}
    for record in stages[0].metrics if stages else []:
        metrics.update(record)
    trainer = "rl" if "rl" in config else "dpo" if "dpo" in config else "rm" if "rm" in config else "sft"
    return model_card(repo_id, config, metrics, held_out_results(path), data_lines(config), trainer)


def push_run(run_dir: str | os.PathLike, repo_id: str) -> str:
    """Write the card to ``<run_dir>/final/README.md`` and upload ``final/`` to the hub model
    repo ``repo_id`` (created if missing); returns the repo's URL. One-line errors: no hub
    reachable (checked first), not a finished run, the hub refusing (no login, no access)."""
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"push: '{repo_id}' is not a hub repo id; write org/name")
    reachable, host = hub_status()
    if not reachable:
        why = "HF_HUB_OFFLINE is set" if hub_offline_set() else f"{host} cannot be reached from this machine"
        raise UserError(f"push: cannot push to {repo_id}: {why}")
    card = card_for_run(run_dir, repo_id)
    final = Path(run_dir) / "final"
    (final / "README.md").write_text(card, encoding="utf-8")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(folder_path=str(final), repo_id=repo_id, repo_type="model",
                          commit_message=f"posttrain: upload {Path(run_dir).name}")
    except LocalTokenNotFoundError:
        raise UserError(f"push: {host} needs a login to create {repo_id}: run `huggingface-cli login` "
                        f"or set HF_TOKEN") from None
    except HfHubHTTPError as error:
        raise UserError(f"push: {host} refused {repo_id}: {str(error).splitlines()[0]}") from None
    return str(url)
