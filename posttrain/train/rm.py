"""``posttrain rm``: train a reward model on preference pairs (Bradley–Terry), export it.

Phase 2 of docs/PIPELINE.md (Ouyang et al. 2022): collect comparisons (a prompt, a chosen and a rejected response), train a
model that scores the chosen one higher, check its accuracy on held-out pairs, and use it as
the reward of RL (``rewards.model``). The loss is ``algorithms.preference.bradley_terry_loss``
(InstructGPT eq. 1, optional per-pair margin as in Llama 2, optional reward centring).

The model is a causal LM with a scalar head (``posttrain.models.scalar_head``); its score is read at
the last token of each response (the end-of-turn token). Both sides of a pair are rendered
with the same chat template as SFT data, go through the same pre-flight audit
(``data.audit``: consistency, end-of-turn token, empty masks, length) and always share a
micro-batch, so a pair's loss is computed inside one forward pass.

Everything else is the SFT machinery, shared, not copied: the step plan
(``data.batching.StepPlanner``, here over PAIRS: a pair's "length" is its packed token count,
or two padded rows), collation, ``train.loop.optimizer_step`` (AdamW, schedule per
optimizer step, clipping, accumulation as a plain sum of step-normalised shares),
``train.checkpoint`` (atomic checkpoints, exact resume, HF export) and
``train.distributed`` (FSDP2). The step loss is normalised by the number of pairs in the
whole optimizer step, so it does not depend on how the step is split into micro-batches or
ranks (tested).

Deviation: pairs whose either side exceeds ``data.max_length`` are dropped (or refused with
``truncation: error``) rather than cut, because cutting removes the score token.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.algorithms.preference import bradley_terry_loss
from posttrain.config import RMConfig
from posttrain.data.batching import MicroBatch, StepPlan, StepPlanner, collate
from posttrain.data.preference import preference_messages  # the shared preference-row reader
from posttrain.errors import ConfigError, DataError
from posttrain.log import say, say_stdout
from posttrain.models import load_tokenizer
from posttrain.models.scalar_head import (
    ScoredSequence,
    export_pad_token_id,
    export_tokenizer,
    gather_scores,
    load_scalar_head_model,
    make_head_trainable,
    render_for_scoring,
    render_response,
    score_positions,
    to_scored_sequence,
    token_values,
    train_top_layers_only,
)
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo, all_reduce_sum, init_distributed, shutdown_distributed
from posttrain.train.logging import MetricsLogger, Progress, optimizer_step_metrics
from posttrain.models.prepare import apply_lora
from posttrain.train.loop import MicroResult, autocast_context, is_due, optimizer_step, seed_everything
from posttrain.train.session import RunSession, guard_step, open_run
from posttrain.train.sft import (
    TrainerState,
    advance,
    announce_run,
    end_step,
    build_optimizer_and_scheduler,
    check_schedule,
    lockstep_micro_batches,
    place_for_training,
    restore_state,
)
from posttrain.data.audit import audit_sample, AuditReport, Finding, note_control_text, preflight, PreparedData
from posttrain.data.formats import BadRowError, normalise_tools, read_rows

PAIR_METRICS = ("accuracy", "margin", "reward/chosen", "reward/rejected")


@dataclass
class PreferencePair:
    """Both sides of one comparison, rendered up to their score tokens."""

    chosen: ScoredSequence
    rejected: ScoredSequence
    margin: float = 0.0
    group: str | None = None
    line: int = 0

    @property
    def tokens(self) -> int:
        return len(self.chosen.input_ids) + len(self.rejected.input_ids)


@dataclass
class PairMicroBatch:
    """One forward pass over ``pairs`` pairs: rows [c0, r0, c1, r1, ...] of ``batch``.

    rows_N, columns_N: [2P] position of each sequence's score token; margin_P: [P].
    """

    batch: MicroBatch
    rows_N: torch.Tensor
    columns_N: torch.Tensor
    margin_P: torch.Tensor
    groups: list[str | None] = field(default_factory=list)

    @property
    def pairs(self) -> int:
        return self.margin_P.numel()

    def to(self, device: torch.device | str) -> "PairMicroBatch":
        return PairMicroBatch(self.batch.to(device), self.rows_N.to(device), self.columns_N.to(device),
                              self.margin_P.to(device), self.groups)


@dataclass
class RMResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- the loop


def run_rm(config: RMConfig, *, pairs: tuple[list, list] | None = None) -> RMResult:
    """Train; returns the run directory, final/ (HF format), the logged metrics (rank 0).

    ``pairs``: optional pre-rendered (train, val) ``PreferencePair`` lists (tests). The run
    holds its directory's lock and stops cleanly on SIGTERM / Ctrl-C (``train.session``).
    """
    check_settings(config)
    with RunSession("rm", config) as session:
        return _run_rm(config, session, pairs)


def _run_rm(config: RMConfig, session: RunSession, pairs: tuple[list, list] | None) -> RMResult:
    info = init_distributed()
    seed_everything(config.train.seed + info.rank)
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train_pairs, val_pairs = pairs if pairs is not None else load_preference_data(config, tokenizer,
                                                                                  verbose=info.is_main)
    planner = make_pair_planner(config, train_pairs, info.world_size)
    total_steps = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup_steps = check_schedule(config, total_steps, has_val=bool(val_pairs))
    run, resume_path = open_run("rm", config, info, total_steps=total_steps)
    pad_id = _pad_id(tokenizer)
    model = build_model(config, info, pad_id)
    optimizer, scheduler = build_optimizer_and_scheduler(model, config.optim, total_steps, warmup_steps)
    state = restore_state(resume_path, model, optimizer, scheduler, info)
    announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path)
    history: list[dict[str, Any]] = []
    val_metrics: dict[str, float] = {}
    with MetricsLogger(run, tensorboard=config.run.tensorboard, enabled=info.is_main,
                       wandb=config.run.wandb, wandb_project=config.run.wandb_project) as logger, \
            Progress(total_steps, "rm", enabled=info.is_main and config.run.progress, initial=state.step,
                     keys=("loss", "accuracy", "val/accuracy", "lr")) as progress:
        for plan in planner.iter_plans(state.step, total_steps):
            micro_batches = [pair_micro_batch([train_pairs[i] for i in mb], config.train.packing, pad_id).to(info.device)
                             for mb in plan.micro_batches[info.rank]]
            result = optimizer_step(
                model, optimizer, scheduler, micro_batches,
                lambda m, b: pair_loss(m, b, step_pairs=plan.trained_sequences,
                                       center_rewards_coef=config.rm.center_rewards_coef),
                precision=config.train.precision, device=info.device, max_grad_norm=config.optim.max_grad_norm,
                world_size=info.world_size, reduce_sum=lambda v: all_reduce_sum(v, info),
            )
            state = advance(state, plan, result)
            state.nonfinite_skipped = guard_step("rm", state.step, result, state.nonfinite_skipped, config.train,
                                                 run.checkpoints, info)
            metrics = step_metrics(plan, result, state, summarise_pairs(result.micro, info), train_pairs)
            if val_pairs and (is_due(state.step, config.train.eval_every, total_steps) or state.step == total_steps):
                val_metrics = evaluate_pairs(model, val_pairs, config, info, pad_id)
                metrics.update(val_metrics)
            end_step(session, config, state, total_steps, metrics, history, logger, progress, run, info,
                     (model, optimizer, scheduler))
    if val_pairs and not val_metrics:  # resumed at the very end: nothing was evaluated in this process
        val_metrics = evaluate_pairs(model, val_pairs, config, info, pad_id)
    if info.is_main:
        write_eval(run.eval, val_metrics, len(val_pairs))
    final = ckpt.export_hf(model, export_tokenizer(tokenizer), run.final, info, merge_lora=config.lora.merge_on_export,
                           rebuild=lambda: build_model(config, info, pad_id, unsharded=True))
    if info.is_main:
        summary = "  ".join(f"{k}={val_metrics[k]:.4g}" for k in ("val/accuracy", "val/loss", "val/margin")
                            if k in val_metrics)
        say(f"rm: {state.step} steps in {state.elapsed_s:.0f}s; {summary}; final model in {final}")
    shutdown_distributed()
    return RMResult(run.path, final, state.step, history, val_metrics)


# ----------------------------------------------------------------------------- data


def check_settings(config: RMConfig) -> None:
    """Refuse settings that cannot work before anything loads (one-line ConfigError)."""
    if config.optim.warmup_steps is not None and config.train.max_steps is not None and \
            config.optim.warmup_steps >= config.train.max_steps:
        raise ConfigError(
            f"optim.warmup_steps ({config.optim.warmup_steps}) is not shorter than train.max_steps "
            f"({config.train.max_steps}): the learning rate would never reach its peak")


def _margin_and_group(row: dict, where: str, margin_key: str | None, group_key: str | None) -> tuple[float, str | None]:
    margin = 0.0
    if margin_key is not None and row.get(margin_key) is not None:
        value = row[margin_key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"{where}: {margin_key} must be a number, got {value!r}")
        margin = float(value)
    group = None if group_key is None or row.get(group_key) is None else str(row[group_key])
    return margin, group


def render_pair_samples(row: dict, tokenizer: Any, *, line: int, source: str, margin_key: str | None,
                        group_key: str | None, allow_special_tokens_in_text: bool | Sequence[str] = False
                        ) -> tuple[Any, Any, float, str | None]:
    """(chosen, rejected) ``RenderedSample``s of one row, through the same template and
    rendering as SFT data (control-token text refused unless ``data.allow_special_tokens_in_text``
    allows it), plus the pair's margin and group."""

    where = f"{source}:{line}"
    prompt, chosen, rejected = preference_messages(row, where)
    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    margin, group = _margin_and_group(row, where, margin_key, group_key)
    sides = [render_response(prompt, side, tokenizer, tools=tools, line=line, source=source,
                             allow_special_tokens_in_text=allow_special_tokens_in_text)
             for side in (chosen, rejected)]
    return sides[0], sides[1], margin, group


def render_pair(row: dict, tokenizer: Any, *, line: int, source: str, margin_key: str | None,
                group_key: str | None) -> PreferencePair:
    """One row as a pair, strictly checked (DataError on any rendering problem)."""
    where = f"{source}:{line}"
    prompt, chosen, rejected = preference_messages(row, where)
    margin, group = _margin_and_group(row, where, margin_key, group_key)

    tools = normalise_tools(row.get("tools"), f"{where}: tools")
    return PreferencePair(
        chosen=render_for_scoring(prompt, chosen, tokenizer, tools=tools, line=line, source=source),
        rejected=render_for_scoring(prompt, rejected, tokenizer, tools=tools, line=line, source=source),
        margin=margin, group=group, line=line,
    )


def load_pairs(path: str, tokenizer: Any, config: RMConfig, *, verbose: bool = True,
               keys: tuple[str | None, str | None] | None = None) -> list[PreferencePair]:
    """Render every pair of one file and run the SFT pre-flight audit on both sides.

    ``keys``: the row keys of (margin, group); None = ``rm.margin_key``, ``rm.group_key``
    (other trainers reading preference rows, ``posttrain dpo``, pass their own).

    The audit (``data.audit``) records consistency failures, missing end-of-turn tokens,
    empty masks and over-long sides exactly as for SFT data, prints its summary and refuses
    to start on a hard error (unless ``data.allow_audit_errors``). A pair with an over-long
    side is dropped (``truncation: right`` or ``drop``: cutting would remove the score
    token) or refused (``error``). Malformed rows (``data.preference.preference_messages``:
    identical sides included) stop the run, or are skipped and counted with ``data.skip_bad``.
    """

    pairs, prepared = audit_pairs(path, tokenizer, config, keys=keys)
    preflight(prepared, allow_errors=config.data.allow_audit_errors, print_fn=say_stdout if verbose else None)
    return pairs


def audit_pairs(path: str, tokenizer: Any, config: RMConfig, *,
                keys: tuple[str | None, str | None] | None = None) -> tuple[list[PreferencePair], Any]:
    """``load_pairs`` without the verdict: the kept pairs and a ``data.audit.PreparedData``
    (both rendered sides of every kept pair, in file order, and the audit report), for
    ``load_pairs`` and ``posttrain inspect``. Raises BadRowError on the first malformed row
    unless ``data.skip_bad``."""

    data = config.data
    report = AuditReport(source=str(path))
    started = time.perf_counter()
    bad_rows: list[tuple[int, str]] = []
    pairs: list[PreferencePair] = []
    kept_samples: list[Any] = []
    too_long = "error" if data.truncation == "error" else "drop"
    rm = getattr(config, "rm", None)  # a DPO config has no rm section: no margin, no groups
    margin_key, group_key = keys if keys is not None else (rm.margin_key, rm.group_key) if rm else (None, None)
    for line, row in read_rows(path, limit=data.limit, skip_bad=data.skip_bad, bad_rows=bad_rows, columns=data.columns):
        try:
            chosen, rejected, margin, group = render_pair_samples(
                row, tokenizer, line=line, source=str(path), margin_key=margin_key, group_key=group_key,
                allow_special_tokens_in_text=data.allow_special_tokens_in_text)
        except DataError as exc:
            if not data.skip_bad:
                raise BadRowError(str(exc)) from None
            bad_rows.append((line, str(exc)))
            note_control_text(report, line, exc)
            continue
        report.rows += 1
        kept = [audit_sample(side, report, data.max_length, too_long, f"{path}:{line}") for side in (chosen, rejected)]
        if any(side is None for side in kept):
            continue
        kept_samples.extend(kept)
        pairs.append(PreferencePair(to_scored_sequence(kept[0]), to_scored_sequence(kept[1]), margin, group, line))
    report.bad_rows.extend(Finding(line, message) for line, message in bad_rows)
    report.bad_rows.sort(key=lambda finding: finding.line)
    report.seconds = time.perf_counter() - started
    return pairs, PreparedData(samples=kept_samples, audit=report)


def load_preference_data(config: RMConfig, tokenizer: Any, *, verbose: bool = True,
                         keys: tuple[str | None, str | None] | None = None
                         ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Train and held-out pairs: ``data.val`` if set, else a seeded ``data.val_fraction``
    (``keys``: see ``load_pairs``)."""
    train = load_pairs(config.data.train, tokenizer, config, verbose=verbose, keys=keys)
    val: list[PreferencePair] = []
    if config.data.val:
        val = load_pairs(config.data.val, tokenizer, config, verbose=verbose, keys=keys)
    elif config.data.val_fraction > 0:
        order = list(range(len(train)))
        random.Random(config.train.seed).shuffle(order)
        held = set(order[: max(1, int(round(config.data.val_fraction * len(train))))])
        val = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    if not train:
        raise DataError(f"{config.data.train}: no training pairs left after rendering")
    return train, val


def pair_length(pair: PreferencePair, packing: bool) -> int:
    """Micro-batch tokens one pair costs: both sides packed, or two rows of the longer side."""
    if packing:
        return pair.tokens
    return 2 * max(len(pair.chosen.input_ids), len(pair.rejected.input_ids))


def make_pair_planner(config: RMConfig, pairs: Sequence[PreferencePair], world_size: int) -> StepPlanner:
    """The SFT step planner over pairs: each pair counts one towards the step normaliser."""
    lengths = [pair_length(p, config.train.packing) for p in pairs]
    if max(lengths) > config.train.micro_batch_tokens:
        raise ConfigError(
            f"train.micro_batch_tokens ({config.train.micro_batch_tokens}) is smaller than a {max(lengths)}-token "
            f"pair (both sides share a micro-batch): raise it or lower data.max_length")
    return StepPlanner(
        lengths, [1] * len(pairs),
        global_batch_size=config.train.global_batch_size, global_batch_tokens=config.train.global_batch_tokens,
        micro_batch_tokens=config.train.micro_batch_tokens, packing=config.train.packing,
        world_size=world_size, seed=config.train.seed, shuffle=config.train.shuffle,
    )


def pair_micro_batch(pairs: Sequence[PreferencePair], packing: bool, pad_token_id: int) -> PairMicroBatch:
    """Collate pairs as [c0, r0, c1, r1, ...] (an empty list gives a filler micro-batch)."""
    sequences = [side for pair in pairs for side in (pair.chosen, pair.rejected)]
    batch = collate(sequences, packing=packing, pad_token_id=pad_token_id)
    if sequences:
        rows, columns = score_positions(sequences, batch)
    else:
        rows = columns = torch.zeros(0, dtype=torch.long)
    margin = torch.tensor([pair.margin for pair in pairs], dtype=torch.float32)
    return PairMicroBatch(batch, rows, columns, margin, [pair.group for pair in pairs])


# ----------------------------------------------------------------------------- loss


def pair_scores(model: torch.nn.Module, micro: PairMicroBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P], all values [B, T]) of one micro-batch."""
    values_BT = token_values(model, micro.batch)
    scores_N = gather_scores(values_BT, micro.rows_N, micro.columns_N).reshape(-1, 2)
    return scores_N[:, 0], scores_N[:, 1], values_BT


def pair_loss(model: torch.nn.Module, micro: PairMicroBatch, *, step_pairs: float,
              center_rewards_coef: float) -> MicroResult:
    """This micro-batch's share of the step's Bradley–Terry loss (sum of shares = step mean),
    with its pair metrics weighted by its pairs."""
    chosen_P, rejected_P, values_BT = pair_scores(model, micro)
    loss, metrics = bradley_terry_loss(chosen_P, rejected_P, margin_P=micro.margin_P,
                                       centering_coef=center_rewards_coef, step_pairs=step_pairs)
    if micro.pairs == 0:  # filler micro-batch: keep the graph connected for FSDP's collectives
        loss = loss + 0.0 * values_BT.sum()
    return MicroResult(loss, float(micro.pairs), metrics)


def summarise_pairs(micro: Sequence[MicroResult], info: DistInfo,
                    keys: Sequence[str] = PAIR_METRICS) -> dict[str, float]:
    """Pair-weighted means of ``keys`` (accuracy, margin and rewards) over the step's
    micro-batches (all ranks)."""
    totals = [sum(float(m.metrics[key]) * m.count for m in micro) for key in keys] + [sum(m.count for m in micro)]
    totals = all_reduce_sum(totals, info)
    pairs = max(totals[-1], 1.0)
    return {key: value / pairs for key, value in zip(keys, totals)} | {"pairs_per_step": int(totals[-1])}


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: Sequence[PreferencePair], config: RMConfig, info: DistInfo,
                   pad_token_id: int) -> dict[str, float]:
    """val/loss, val/accuracy, val/margin, val/reward/* over every held-out pair (and
    val/accuracy/<group> per value of ``rm.group_key``), split over ranks in lock-step."""
    mine = lockstep_micro_batches([pair_length(p, config.train.packing) for p in pairs],
                                  config.train.micro_batch_tokens, config.train.packing, info)
    groups = sorted({p.group for p in pairs if p.group is not None})
    sums = {key: 0.0 for key in ("loss", *PAIR_METRICS, "pairs")}
    group_sums = {g: [0.0, 0.0] for g in groups}  # correct, count
    was_training = model.training
    model.eval()
    try:
        for indices in mine:
            micro = pair_micro_batch([pairs[i] for i in indices], config.train.packing, pad_token_id).to(info.device)
            with autocast_context(config.train.precision, info.device):
                chosen_P, rejected_P, _ = pair_scores(model, micro)
            _, metrics = bradley_terry_loss(chosen_P, rejected_P, margin_P=micro.margin_P,
                                            centering_coef=config.rm.center_rewards_coef)
            for key in sums:
                sums[key] += metrics[key] * (metrics["pairs"] if key != "pairs" else 1.0)
            correct = (chosen_P > rejected_P).tolist()
            for group, right in zip(micro.groups, correct):
                if group is not None:
                    group_sums[group][0] += float(right)
                    group_sums[group][1] += 1.0
    finally:
        model.train(was_training)
    keys = list(sums)
    totals = all_reduce_sum([sums[k] for k in keys] + [v for g in groups for v in group_sums[g]], info)
    reduced = dict(zip(keys, totals[: len(keys)]))
    count = max(reduced["pairs"], 1.0)
    result = {f"val/{key}": reduced[key] / count for key in ("loss", *PAIR_METRICS)}
    result["val/pairs"] = int(reduced["pairs"])
    for k, group in enumerate(groups):
        correct, seen = totals[len(keys) + 2 * k: len(keys) + 2 * k + 2]
        result[f"val/accuracy/{group}"] = correct / max(seen, 1.0)
    return result


# ----------------------------------------------------------------------------- pieces


def build_model(config: RMConfig, info: DistInfo, pad_token_id: int, *, unsharded: bool = False) -> torch.nn.Module:
    """Scalar-head model (fp32 master weights), LoRA (head trained in full), attention, shard."""
    model = load_scalar_head_model(config.model.name, dtype=torch.float32, seed=config.train.seed,
                                   pad_token_id=pad_token_id)
    if config.lora.enabled:
        lora = config.lora
        model = make_head_trainable(apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                                               target_modules=lora.target_modules, task_type="SEQ_CLS"))
    if config.rm.train_top_layers is not None:
        try:
            train_top_layers_only(model, config.rm.train_top_layers)
        except ValueError as exc:
            raise ConfigError(f"rm.train_top_layers: {exc}") from None
    return model if unsharded else place_for_training(model, config, info)


def step_metrics(plan: StepPlan, result: Any, state: TrainerState, pair_metrics: dict[str, float],
                 pairs: Sequence[PreferencePair]) -> dict[str, Any]:
    """The per-step metric line: the shared optimizer-step keys plus the pair metrics.

    The Bradley-Terry loss has no token mask: ``tokens_per_step`` counts every token of
    both sides of the step's pairs (all ranks, padding excluded, unlike ``plan.tokens``,
    which is the planner's micro-batch cost: two padded rows per pair without packing), and
    the effective batch size is ``pairs_per_step``. No ``masked_token_count`` is logged.
    """
    tokens = sum(pairs[i].tokens for i in plan.sample_indices)
    return optimizer_step_metrics(result, step=state.step, epoch=plan.epoch_progress, tokens=tokens, **pair_metrics)


def _pad_id(tokenizer: Any) -> int:
    """Padding id of training batches and of the export (not the end-of-turn token, if possible)."""
    for candidate in (export_pad_token_id(tokenizer), tokenizer.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def write_eval(eval_dir: Path, val_metrics: dict[str, float], pairs: int, name: str = "rm_val.json") -> None:
    """``eval/<name>``: the held-out pair metrics of the end of training (nothing if none)."""
    if not val_metrics:
        return
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / name).write_text(json.dumps({"pairs": pairs, **val_metrics}, indent=2) + "\n")


def announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path) -> None:
    announce_run("rm", config, info, model, f"{len(train_pairs)} train / {len(val_pairs)} val pairs",
                 sum(p.tokens for p in train_pairs), total_steps, warmup_steps, resume_path)
