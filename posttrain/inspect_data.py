"""``posttrain inspect DATA``: show what training would train on, and audit it.

Renders a data file exactly as the trainers do (``posttrain.data.load_sft_data``), prints the
first n samples token by token with the trained tokens highlighted and message boundaries
labelled, then the audit summary (``docs/PREFLIGHT.md``). Exit status: 0 when clean,
1 when the data has a hard error (bad row, empty mask, consistency failure, untrained
end-of-turn), 2 for usage errors (missing model, bad option) via the CLI.

``--config`` takes any training config, read as its own command reads it: SFT data
(``posttrain sft``), preference pairs with both sides rendered and audited as ``posttrain rm``
and ``posttrain dpo`` do (``data.preference.audit_pairs``), or RL prompt rows checked and rendered
as ``posttrain rl`` does (``data.audit.load_prompt_data``; prompts are context, so nothing is
trained); for a pipeline config, one training stage (``--stage``, default the first).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from posttrain.config import (DPOConfig, ModelConfig, RLConfig, RMConfig, Section, SFTConfig, SFTDataConfig,
                              apply_override, read_config_file, validate_config)
from posttrain.errors import ConfigError, DataError, UserError
from posttrain.data.audit import (
    format_sample,
    load_prompt_data,
    load_sft_data,
    PreparedData,
    render_html,
    write_dump,
)
from posttrain.data.formats import BadRowError, read_rows_or_errors
from posttrain.data.mixture import data_sources, setting_text
from posttrain.data.render import RenderedSample
from posttrain.models import load_tokenizer
from posttrain.eval.prompts import prompt_rows
from posttrain.rewards.preflight import RewardRow, reward_rows, rl_preflight
from posttrain.rewards.registry import reward_fields


class InspectConfig(Section):
    """What ``inspect`` reads without a training config: the ``data`` and ``model`` sections."""

    data: SFTDataConfig = SFTDataConfig()
    model: ModelConfig = ModelConfig()


@dataclass
class InspectTarget:
    """What to inspect and how: ``kind`` is ``sft``, ``dpo`` or ``rm`` (preference pairs) or ``rl``
    (prompts); ``config`` the validated config (``InspectConfig`` or that command's config),
    whose ``data`` and ``model`` sections drive the audit; ``skip_bad``: count and skip bad rows."""

    kind: str
    config: Any
    skip_bad: bool = False
    note: str | None = None  # how the kind was chosen when no section of the config names it


# the inspect options that have an RL counterpart (RL prompt rows have no trained tokens)
RL_KEYS = {"data.max_length": "data.max_prompt_length", "data.limit": "data.limit"}


def inspect_config(config_path: str | None, overrides: list[str], data: str | None = None,
                   stage: str | None = None) -> InspectTarget:
    """The target of ``inspect``: ``config_path`` (any training config: SFT, reward model, RL,
    or one training stage of a pipeline config, ``stage`` or else its first) validated as its
    own command validates it, with ``overrides`` (``data.*``/``model.*`` keys) applied; ``data``
    replaces its ``data.train``. Without a config: SFT data, ``InspectConfig``."""
    if config_path is None:
        if stage is not None:
            raise ConfigError("inspect: --stage picks a stage of a pipeline --config")
        raw: dict[str, Any] = {}
        for override in overrides:
            apply_override(raw, override)
        config = validate_config(InspectConfig, raw, "command line")
        return InspectTarget("sft", config, config.data.skip_bad)
    raw, kind, source = training_section(read_config_file(config_path), config_path, stage)
    note = None
    if kind == "sft" and source == config_path and "sft" not in raw and (sniffed := sniff_kind(raw)):
        kind = sniffed
        note = (f"inspect: {config_path} names no trainer section; its rows are "
                + ("preference pairs, audited as `posttrain dpo` (and rm) reads them" if kind == "dpo"
                   else "RL prompts, audited as `posttrain rl` reads them"))
    skip_bad = False
    for override in overrides:
        key, _, value = override.partition("=")
        if kind == "rl":
            if key == "data.skip_bad":
                skip_bad = value == "true"
                continue
            if key.startswith("data.") and key not in RL_KEYS:
                raise ConfigError(f"inspect: {key} does not apply to RL prompts ({source} is an RL config)")
            key = RL_KEYS.get(key, key)
        apply_override(raw, f"{key}={value}")
    if data is not None:
        apply_override(raw, f"data.train={json.dumps(data)}")
    schema = {"sft": SFTConfig, "dpo": DPOConfig, "rm": RMConfig, "rl": RLConfig}[kind]
    config = validate_config(schema, raw, source)
    return InspectTarget(kind, config, skip_bad if kind == "rl" else config.data.skip_bad, note)


PIPELINE_STAGES = ("sft", "dpo", "rm", "rl")  # the pipeline's training stages, in its order


def training_section(raw: dict[str, Any], path: str, stage: str | None) -> tuple[dict[str, Any], str, str]:
    """``(raw config, kind, source for errors)`` of a training config file: ``rl`` (an ``rl``,
    ``rollout`` or ``reward`` section), ``dpo`` or ``rm`` (that section) or ``sft``. For a pipeline
    config (stage sections holding their own ``data``; ``config.PipelineConfig``) the section of
    ``stage``, or of its first training stage, with the pipeline's ``model`` filled in."""
    stages = [name for name in PIPELINE_STAGES if isinstance(raw.get(name), dict) and "data" in raw[name]]
    if stages:
        if stage is None:
            stage = stages[0]
        elif stage not in stages:
            raise ConfigError(f"inspect --stage {stage}: {path} has no such training stage (stages: {', '.join(stages)})")
        section = dict(raw[stage])
        top_model = raw.get("model") if isinstance(raw.get("model"), dict) else {}
        section["model"] = {**top_model, **(section.get("model") or {})}
        return section, stage, f"{path} ({stage})"
    if stage is not None:
        raise ConfigError(f"inspect --stage {stage}: {path} is not a pipeline config")
    if any(key in raw for key in ("rl", "rollout", "reward")):
        return raw, "rl", path
    return raw, next((kind for kind in ("dpo", "rm") if kind in raw), "sft"), path


def kind_of_rows(row: Any) -> str | None:
    """The trainer a data row belongs to, for a config whose sections name none: ``dpo`` for a
    preference pair (``chosen``/``rejected``: ``posttrain rm`` reads it alike), ``rl`` for a
    prompt without a response (``prompt`` or ``question`` without ``completion``; ``messages``
    without an assistant turn), else None (SFT).

    >>> [kind_of_rows(r) for r in ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"question": "2+2?", "answer": "4"},
    ...  {"prompt": "p", "completion": "c"}, {"messages": [{"role": "user", "content": "hi"}]}, {"text": "t"})]
    ['dpo', 'rl', None, 'rl', None]
    """
    if not isinstance(row, dict):
        return None
    if "chosen" in row and "rejected" in row:
        return "dpo"
    if "completion" in row or "text" in row or "conversations" in row:
        return None
    if isinstance(row.get("messages"), list):
        roles = {m.get("role") for m in row["messages"] if isinstance(m, dict)}
        return None if "assistant" in roles else "rl"
    return "rl" if "prompt" in row or "question" in row else None


def sniff_kind(raw: dict[str, Any]) -> str | None:
    """``kind_of_rows`` of the first row of a config's local ``data.train`` (a mixture: its first
    source); None when it has none, it is a hub dataset, or the row cannot be read."""
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    if not data.get("train"):
        return None
    try:
        source = data_sources(data["train"], "data.train")[0]
        if not Path(source.path).expanduser().exists():
            return None
        for _, row in read_rows_or_errors(source.spec, limit=1, columns=data.get("columns")):
            return kind_of_rows(row)
    except (UserError, OSError, TypeError, ValueError):
        return None
    return None


def use_colour(choice: str, stream: TextIO) -> bool:
    """``always``/``never``, or ``auto``: a terminal and no ``NO_COLOR`` in the environment."""
    if choice == "always":
        return True
    if choice == "never":
        return False
    return hasattr(stream, "isatty") and stream.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def inspect_data(
    target: InspectTarget,
    path: str,
    *,
    n: int = 5,
    colour: bool = False,
    as_json: bool = False,
    html_path: str | None = None,
    dump_path: str | None = None,
    max_tokens: int | None = None,
    out: TextIO | None = None,
    err: TextIO | None = None,
    probe_groups: int = 0,
) -> int:
    """Audit ``path`` as ``target.kind`` data and print the views; return the exit status (0 clean, 1 hard error)."""

    out = out or sys.stdout
    err = err or sys.stderr
    if target.note:
        print(target.note, file=err)
    tokenizer = load_tokenizer(target.config.model.name, chat_template=target.config.model.chat_template)
    try:
        prepared = _prepare(target, path, tokenizer, n)
    except DataError as exc:
        if as_json:
            print(json.dumps({"source": setting_text(path), "ok": False, "error": str(exc)}), file=out)
        else:
            print(f"error: {exc}", file=err)
            if isinstance(exc, BadRowError):  # only a bad row can be skipped: not a file or a setting
                print("(stopped at the first bad row; --skip-bad counts and skips bad rows)", file=err)
        return 1
    report = prepared.audit
    checked = rl_checks(target, path, prepared, tokenizer) if target.kind == "rl" else None
    if as_json:
        print(json.dumps({**report.to_dict(), **({"rl_preflight": checked} if checked else {})}), file=out)
    else:
        for index, sample in enumerate(prepared.samples[: max(n, 0)]):
            label = f"{index // 2} ({'chosen' if index % 2 == 0 else 'rejected'})" if target.kind in ("rm", "dpo") else index
            print(format_sample(sample, tokenizer, colour=colour, index=label, max_tokens=max_tokens), file=out)
        if not colour and n > 0 and prepared.samples and target.kind != "rl":
            print("([[...]] = trained tokens, ‹role› = where a message starts)\n", file=out)
        for line in report.summary_lines():
            print(line, file=out)
        for line in (checked or {}).get("lines", []):
            print(line, file=out)
        if checked and checked.get("error"):
            print(f"error: {checked['error']}", file=err)
        elif checked and probe_groups > 0:
            for line in probe(target.config, prompt_rows(prepared.prompts), tokenizer, probe_groups):
                print(line, file=out)
    if html_path:
        Path(html_path).write_text(render_html(prepared.samples[: max(n, 0)], tokenizer, report), encoding="utf-8")
        if not as_json:
            print(f"wrote {html_path}", file=out)
    if dump_path:
        write_dump(prepared.samples, dump_path)
        if not as_json:
            print(f"wrote {dump_path} ({len(prepared.samples)} samples)", file=out)
    return 1 if report.hard_errors or (checked and checked.get("error")) else 0


def probe(config: RLConfig, rows: list, tokenizer, groups: int) -> list[str]:
    """``inspect --config RL --probe N``: sample ``N`` groups (``rollout.group_size`` completions
    each, the run's sampling settings) from the starting model with the trainer's own pieces
    (``train.rl_models.build_policy`` / ``build_engine``, ``train.rl_rollouts.collect_rollouts``
    on ``train.rl_settings``), score them with the reward, and forecast the share of groups
    whose completions all score the same (GRPO learns nothing from them) and of prompts no
    completion solves (for rewards that check correctness); with the measured cost."""
    import time

    from posttrain.algorithms.advantages import zero_variance_group_fraction
    from posttrain.train.distributed import init_distributed
    from posttrain.train.loop import seed_everything
    from posttrain.train.rl import build_reward_fn, build_rl_agent
    from posttrain.train.rl_models import build_engine, build_policy
    from posttrain.train.rl_rollouts import PromptSampler, collect_rollouts
    from posttrain.train.rl_settings import rl_settings
    from posttrain.train.steps import pad_token_id

    started = time.perf_counter()
    groups = min(groups, len(rows))
    config = config.model_copy(update={"rl": config.rl.model_copy(update={
        "prompts_per_step": groups, "dynamic_sampling": False, "mini_batch_size": None})})
    info = init_distributed()
    seed_everything(config.train.seed)
    agent = build_rl_agent(config, tokenizer)
    settings = rl_settings(config, info, pad_token_id(tokenizer), agent)
    policy = build_policy(config, info)
    engine = build_engine(config, policy, tokenizer, settings.source)
    loaded = time.perf_counter()
    batch = collect_rollouts(engine, rows, PromptSampler(len(rows), seed=config.train.seed), build_reward_fn(config),
                             settings.rollout, settings.scoring, 0, info, agent)
    flat = zero_variance_group_fraction(batch.rewards_PG())
    checks = [[s.correct for s in group] for group in batch.groups]
    lines = [f"probe: {len(batch.groups)} groups x {config.rollout.group_size} completions from {config.model.name} in "
             f"{time.perf_counter() - started:.1f} s ({loaded - started:.1f} s loading, {batch.seconds_generate:.1f} s "
             f"generating, {batch.seconds_score:.2f} s scoring)",
             f"  zero-variance groups (every completion the same reward; no GRPO signal): {flat:.0%}"]
    if all(c is not None for group in checks for c in group):
        never = sum(not any(group) for group in checks)
        always = sum(all(group) for group in checks)
        lines.append(f"  prompts never solved: {never} of {len(checks)} ({never / max(len(checks), 1):.0%}); "
                     f"always solved: {always} of {len(checks)}")
    else:
        lines.append("  prompts never solved: not forecast (the reward checks no correctness)")
    return lines


@dataclass
class PreparedRLPrompts(PreparedData):
    """RL prompts shown as samples (no trained token), with the checked rows (``prompts``)."""

    prompts: Any = None


def rl_checks(target: InspectTarget, path: str, prepared: PreparedRLPrompts, tokenizer) -> dict[str, Any]:
    """The RL pre-flight ``posttrain rl`` runs after its prompt audit (``rewards.preflight.rl_preflight``:
    every reward on sample rows, the agent's budget, train/held-out overlap) on the inspected
    prompts and the config's held-out file: ``{"ok", "lines", "error"?}``."""
    config = target.config
    data = config.data
    rows = reward_rows(prompt_rows(prepared.prompts), str(path))
    held_out: list[RewardRow] = []
    try:
        if data.eval:
            held_out = reward_rows(prompt_rows(load_prompt_data(
                data.eval, tokenizer, system=data.system, max_prompt_length=data.max_prompt_length,
                limit=data.eval_limit, skip_bad=target.skip_bad, columns=data.columns,
                reward_fields=reward_fields(config.reward),
                allow_special_tokens_in_text=data.allow_special_tokens_in_text, seed=config.train.seed,
                key="data.eval")), data.eval)
        return {"ok": True, "lines": rl_preflight(config, rows, held_out)}
    except (ConfigError, DataError) as exc:
        return {"ok": False, "lines": [], "error": str(exc)}


def _prepare(target: InspectTarget, path: str, tokenizer, n: int):
    """``PreparedData`` of ``path`` read the way ``target.kind``'s trainer reads it."""

    data = target.config.data
    seed = target.config.train.seed if hasattr(target.config, "train") else 0  # a mixture draws as training does
    if target.kind in ("rm", "dpo"):
        from posttrain.data.preference import audit_pairs
        from posttrain.train.dpo import pair_keys as dpo_pair_keys
        from posttrain.train.rm import pair_keys as rm_pair_keys

        keys = dpo_pair_keys(target.config) if target.kind == "dpo" else rm_pair_keys(target.config)
        return audit_pairs(path, tokenizer, data, keys=keys, seed=seed)[1]
    if target.kind == "rl":

        prompts = load_prompt_data(path, tokenizer, system=data.system, max_prompt_length=data.max_prompt_length,
                                   limit=data.limit, skip_bad=target.skip_bad, columns=data.columns,
                                   reward_fields=reward_fields(target.config.reward),
                                   allow_special_tokens_in_text=data.allow_special_tokens_in_text, seed=seed)
        samples = [RenderedSample(input_ids=p.prompt_ids, loss_mask=[0] * len(p.prompt_ids), line=p.line,
                                  source=p.source) for p in prompts.prompts]
        return PreparedRLPrompts(samples=samples, audit=prompts.audit, prompts=prompts)
    return load_sft_data(path, tokenizer, data, spans_for_first=max(n, 0), seed=seed)
