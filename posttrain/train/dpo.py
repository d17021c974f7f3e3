"""``posttrain dpo``: train a policy directly on preference pairs (DPO, conservative DPO, IPO,
SimPO), without a reward model or rollouts.

Losses: ``algorithms.preference.preference_optimization_loss`` (DPO, Rafailov et al. 2023;
label smoothing = conservative DPO, Mitchell 2023; IPO, Azar et al. 2023; SimPO, Meng et
al. 2024; the module's docstring lists the deviations). Each side's log-prob is the SUM of
log pi(token) over its response tokens only: the rows are read, rendered through the chat
template and audited exactly as for ``posttrain rm`` (``data.preference.load_preference_data``:
explicit or implicit prompt, identical sides and responses with no trained token are hard
errors naming file:line), and the trained tokens of a side are its ``loss_mask`` shifted by
one, as in SFT.

The reference (the starting model; with LoRA the base with the adapter off) is run ONCE,
before training, over every train and held-out pair; its summed log-probs are kept in
``<run>/reference_logps.pt`` under a fingerprint of the starting weights, the pairs' token
ids and the precision, so a rerun or a resume reuses them and no second model is resident
while training. SimPO needs no reference and skips the pass.

Everything else is shared with SFT and the reward model: the pair step plan
(``data.preference.make_pair_planner``: both sides of a pair in the same micro-batch, packed
padding-free), the run machinery of ``train.steps``, ``train.loop.optimizer_step`` (step-normalised shares, so the loss and the
gradient do not depend on micro-batches, packing or ranks; tested), log-probs only at
response positions, chunked over the vocabulary (``models.logprobs.response_token_logprobs``
-> ``algorithms.sft``), ``train.checkpoint`` (exact resume) and ``train.distributed`` (FSDP2).
Metric names follow TRL's DPOTrainer (``rewards/chosen`` ... ``logps/rejected``); see
docs/METRICS.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from posttrain.algorithms.preference import (
    preference_optimization_loss,
    preference_optimization_rewards,
    sequence_logp_sums,
)
from posttrain.config import SHARED_PROMPT_ATTENTION, DPOConfig
from posttrain.data.batching import MicroBatch, StepPlan, collate, collate_shared_prompt, trained_target_count
from posttrain.data.mixture import source_metrics
from posttrain.data.preference import PairKeys, PreferencePair, load_preference_data, make_pair_planner, pair_length
from posttrain.hub import check_push_target
from posttrain.log import say
from posttrain.models import load_tokenizer
from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import (
    DistInfo,
    all_reduce_sum,
    init_distributed,
    shutdown_distributed,
)
from posttrain.train.logging import Progress, optimizer_step_metrics, run_metrics_logger
from posttrain.models.prepare import unwrap_causal_lm
from posttrain.train.loop import (
    MicroResult,
    autocast_context,
    is_due,
    optimizer_step,
    seed_everything,
    tune_cpu_allocator,
)
from posttrain.models.logprobs import response_token_logprobs
from posttrain.train.session import RunSession, guard_step, open_run
from posttrain.train.steps import (TrainerState, advance, announce_run, build_optimizer_and_scheduler, check_schedule,
                                   check_warmup_before_max_steps, end_step, load_causal_lm, lockstep_micro_batches,
                                   pad_token_id, place_for_training, restore_state, summarise_pairs, write_eval)

PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")
REFERENCE_FILE = "reference_logps.pt"


@dataclass
class DPOMicroBatch:
    """One forward pass over ``pairs`` pairs: sequences [c0, r0, c1, r1, ...] of ``batch``.

    reference_logps_N: [2P] summed reference log-prob of each sequence (None for SimPO).
    """

    batch: MicroBatch
    reference_logps_N: torch.Tensor | None
    pairs: int

    def to(self, device: torch.device | str) -> "DPOMicroBatch":
        reference = None if self.reference_logps_N is None else self.reference_logps_N.to(device)
        return DPOMicroBatch(self.batch.to(device), reference, self.pairs)


@dataclass
class ReferenceLogps:
    """Summed reference log-probs, [pairs, 2] (chosen, rejected), of the train and held-out pairs."""

    train: torch.Tensor
    val: torch.Tensor
    reused: bool = False


@dataclass
class DPOResult:
    run_dir: Path
    final_dir: Path | None
    steps: int
    history: list[dict[str, Any]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)
    reference_reused: bool = False


# ----------------------------------------------------------------------------- the loop


def run_dpo(config: DPOConfig, *, pairs: tuple[list, list] | None = None) -> DPOResult:
    """Train; returns the run directory, final/ (HF format), the logged metrics (rank 0).

    ``pairs``: optional pre-rendered (train, val) ``PreferencePair`` lists (tests, benchmarks).
    The run holds its directory's lock, never applies a NaN/inf step and stops cleanly on
    SIGTERM / Ctrl-C (``train.session``).
    """
    check_settings(config)
    with RunSession("dpo", config) as session:
        return _run_dpo(config, session, pairs)


def _run_dpo(config: DPOConfig, session: RunSession, pairs: tuple[list, list] | None) -> DPOResult:
    info = init_distributed()
    if info.device.type == "cpu":
        tune_cpu_allocator()
    seed_everything(config.train.seed)
    tokenizer = load_tokenizer(config.model.name, config.model.chat_template)
    train_pairs, val_pairs = pairs if pairs is not None else load_preference_data(
        config.data, tokenizer, seed=config.train.seed, keys=pair_keys(config), verbose=info.is_main)
    planner = make_pair_planner(train_pairs, config.train, info.world_size)
    total_steps = planner.total_steps(config.train.epochs, config.train.max_steps)
    warmup_steps = check_schedule(config, total_steps, has_val=bool(val_pairs))
    run, resume_path = open_run("dpo", config, info, total_steps=total_steps)
    pad_id = pad_token_id(tokenizer)
    model, weights_id = build_model(config, info)
    seed_everything(config.train.seed + info.rank)
    # the optimizer first: under FSDP2 a no-grad forward leaves the root's parameters unsharded,
    # and an optimizer built then would hold those instead of the sharded ones
    optimizer, scheduler = build_optimizer_and_scheduler(model, config.optim, total_steps, warmup_steps)
    reference = reference_logps(model, train_pairs, val_pairs, config, info, run.path, weights_id, pad_id)
    state = restore_state(resume_path, model, optimizer, scheduler, info)  # after the reference: starting weights
    announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path)
    targets = [pair_targets(p) for p in train_pairs]
    history: list[dict[str, Any]] = []
    val_metrics: dict[str, float] = {}
    with (
        run_metrics_logger(run, config.run, info.is_main) as logger,
        Progress(total_steps, "dpo", enabled=info.is_main and config.run.progress, initial=state.step,
                 keys=("loss", "rewards/accuracies", "val/rewards/accuracies", "lr")) as progress,
    ):
        if state.step == 0:  # a mixture's pairs per source; the starting point of the validation curves
            start = source_metrics(config.data.train, train_pairs, lambda pair: pair.chosen.source)
            if config.train.eval_every and val_pairs:
                start.update(evaluate(model, val_pairs, reference, config, info, pad_id, at_start=True))
            if start:
                history.append(logger.log(start, step=0))
        for plan in planner.iter_plans(state.step, total_steps):
            micro_batches = [dpo_micro_batch(train_pairs, mb, reference and reference.train, config.train.packing,
                                             pad_id, shares_prompt(config)).to(info.device)
                             for mb in plan.micro_batches[info.rank]]
            result = optimizer_step(
                model, optimizer, scheduler, micro_batches,
                lambda m, b: dpo_micro_loss(m, b, step_pairs=plan.trained_sequences,
                                            chunk_size=config.train.logits_chunk_size, **loss_options(config)),
                precision=config.train.precision, device=info.device, max_grad_norm=config.optim.max_grad_norm,
                world_size=info.world_size, reduce_sum=lambda v: all_reduce_sum(v, info),
            )
            state = advance(state, plan, result)
            state.nonfinite_skipped = guard_step("dpo", state.step, result, state.nonfinite_skipped, config.train,
                                                 run.checkpoints, info)
            metrics = step_metrics(plan, result, state, summarise_pairs(result.micro, info, pair_metric_keys(config)),
                                   train_pairs, targets)
            if val_pairs and (is_due(state.step, config.train.eval_every, total_steps) or state.step == total_steps):
                val_metrics = evaluate(model, val_pairs, reference, config, info, pad_id)
                metrics.update(val_metrics)
            end_step(session, config, state, total_steps, metrics, history, logger, progress, run, info,
                     (model, optimizer, scheduler))
    if val_pairs and not val_metrics:  # resumed at the very end: nothing was evaluated in this process
        val_metrics = evaluate(model, val_pairs, reference, config, info, pad_id)
    if info.is_main:
        write_eval(run.eval, val_metrics, len(val_pairs), name="dpo_val.json")
    final = ckpt.export_hf(model, tokenizer, run.final, info, merge_lora=config.lora.merge_on_export,
                           rebuild=lambda: build_model(config, info, unsharded=True)[0])
    if info.is_main:
        summary = "  ".join(f"{k}={val_metrics[k]:.4g}" for k in ("val/rewards/accuracies", "val/loss",
                                                                   "val/rewards/margins") if k in val_metrics)
        say(f"dpo: {state.step} steps in {state.elapsed_s:.0f}s; {summary}; final model in {final}")
    shutdown_distributed()
    return DPOResult(run.path, final, state.step, history, val_metrics, bool(reference and reference.reused))


# ----------------------------------------------------------------------------- pieces


def check_settings(config: DPOConfig) -> None:
    """Refuse settings that cannot work before anything loads (one-line ConfigError)."""
    check_warmup_before_max_steps(config.optim.warmup_steps, config.train.max_steps)
    check_push_target(config.run.push_to_hub)


def pair_keys(config: DPOConfig) -> PairKeys:
    """The row keys DPO reads besides the pair: ``dpo.group_key`` (no margin)."""
    return PairKeys(group=config.dpo.group_key)


def build_model(config: DPOConfig, info: DistInfo, *, unsharded: bool = False) -> tuple[torch.nn.Module, str]:
    """The policy as SFT builds it (fp32 master weights, LoRA, attention, FSDP2) and the
    fingerprint of its starting weights (taken before sharding; LoRA adapters left out)."""
    model = load_causal_lm(config.model.name, config.lora)
    fingerprint = weights_fingerprint(model)
    if unsharded:
        return model, fingerprint
    return place_for_training(model, info, packing=config.train.packing,
                              attn_implementation=config.model.attn_implementation,
                              gradient_checkpointing=config.model.gradient_checkpointing), fingerprint


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 1024) -> str:
    """A cheap, stable hash of a model's base weights: every tensor's name, shape, dtype,
    float64 sum and ``samples_per_tensor`` strided values (LoRA adapter weights excluded)."""
    digest = hashlib.sha256()
    for name, parameter in sorted(unwrap_causal_lm(model).named_parameters(), key=lambda item: item[0]):
        if "lora_" in name:
            continue
        flat = parameter.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        digest.update(f"{name}|{tuple(parameter.shape)}|{parameter.dtype}|".encode())
        digest.update(repr(float(flat.sum(dtype=torch.float64))).encode())
        digest.update(flat[::stride].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def pair_targets(pair: PreferencePair) -> int:
    """Response tokens the loss sees in a pair (both sides; each side's mask shifted by one)."""
    return trained_target_count(pair.chosen) + trained_target_count(pair.rejected)


def pair_token_counts(pairs: Sequence[PreferencePair]) -> torch.Tensor:
    """[P, 2] trained response tokens of (chosen, rejected), for the length-normalised losses."""
    return torch.tensor([[trained_target_count(p.chosen), trained_target_count(p.rejected)] for p in pairs],
                        dtype=torch.float32).reshape(-1, 2)


def loss_options(config: DPOConfig) -> dict[str, Any]:
    """The ``dpo:`` section as keyword arguments of ``preference_optimization_loss``."""
    dpo = config.dpo
    return dict(loss_type=dpo.loss_type, beta=dpo.beta, label_smoothing=dpo.label_smoothing,
                simpo_gamma=dpo.simpo_gamma, rpo_alpha=dpo.rpo_alpha)


def pair_metric_keys(config: DPOConfig) -> tuple[str, ...]:
    """The pair metrics logged per step and held out (``loss/nll_chosen`` with ``rpo_alpha``)."""
    return PAIR_METRICS + (("loss/nll_chosen",) if config.dpo.rpo_alpha else ())


def shares_prompt(config: DPOConfig) -> bool:
    """``dpo.share_prompt`` resolved: null = on wherever packing and the attention allow it."""
    if config.dpo.share_prompt is not None:
        return config.dpo.share_prompt
    return config.train.packing and config.model.attn_implementation in SHARED_PROMPT_ATTENTION


def shared_prompt_length(pair: PreferencePair) -> int:
    """Leading tokens the two sides have in common and neither trains on: the prompt, laid out
    once by the shared-prompt layout (a response's first token stays on its own side)."""
    chosen, rejected = pair.chosen, pair.rejected
    limit = min(len(chosen.input_ids), len(rejected.input_ids))
    length = 0
    while (length < limit and chosen.input_ids[length] == rejected.input_ids[length]
           and not chosen.loss_mask[length] and not rejected.loss_mask[length]):
        length += 1
    return length


def dpo_micro_batch(pairs: Sequence[PreferencePair], indices: Sequence[int], reference_P2: torch.Tensor | None,
                    packing: bool, pad_token_id: int, share_prompt: bool = False) -> DPOMicroBatch:
    """Collate pairs ``indices`` as [c0, r0, c1, r1, ...] with their reference log-probs
    (an empty list gives a filler micro-batch). ``share_prompt``: each pair is one block,
    prompt + chosen response + rejected response, the responses seeing the prompt and not each
    other (``data.batching.collate_shared_prompt``): the same log-probs from fewer tokens."""
    prompts = [shared_prompt_length(pairs[i]) for i in indices] if share_prompt and packing else []
    if prompts and min(prompts) > 0:
        batch = collate_shared_prompt([
            (pairs[i].chosen.input_ids[:length],
             [pairs[i].chosen.input_ids[length:], pairs[i].rejected.input_ids[length:]],
             [pairs[i].chosen.loss_mask[length:], pairs[i].rejected.loss_mask[length:]])
            for i, length in zip(indices, prompts)])
    else:
        sequences = [side for i in indices for side in (pairs[i].chosen, pairs[i].rejected)]
        batch = collate(sequences, packing=packing, pad_token_id=pad_token_id)
    reference = None if reference_P2 is None else reference_P2[list(indices)].reshape(-1)
    return DPOMicroBatch(batch, reference, len(indices))


def sequence_logps(model: torch.nn.Module, micro: DPOMicroBatch, chunk_size: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed log-prob [2P], trained tokens [2P], token log-probs [N]) of every sequence;
    logits only at the response positions, ``chunk_size`` rows at a time."""
    tokens = response_token_logprobs(model, micro.batch, temperature=1.0, chunk_size=chunk_size, with_entropy=False)
    sums, counts = sequence_logp_sums(tokens.logp, tokens.sequence_index, 2 * micro.pairs)
    return sums, counts, tokens.logp


def dpo_micro_loss(model: torch.nn.Module, micro: DPOMicroBatch, *, step_pairs: float, chunk_size: int,
                   **options: Any) -> MicroResult:
    """This micro-batch's share of the step's preference loss (sum of shares = step mean),
    with its pair metrics weighted by its pairs; ``options``: see ``loss_options``."""
    sums, counts, token_logps = sequence_logps(model, micro, chunk_size)
    reference = micro.reference_logps_N
    loss, metrics = preference_optimization_loss(
        sums[0::2], sums[1::2], None if reference is None else reference[0::2],
        None if reference is None else reference[1::2], chosen_tokens_P=counts[0::2], rejected_tokens_P=counts[1::2],
        step_pairs=step_pairs, **options)
    if micro.pairs == 0:  # filler micro-batch: keep the graph connected for FSDP's collectives
        loss = loss + 0.0 * token_logps.sum()
    return MicroResult(loss, float(micro.pairs), metrics)


@torch.no_grad()
def score_pairs(model: torch.nn.Module, pairs: Sequence[PreferencePair], config: DPOConfig, info: DistInfo,
                pad_token_id: int, *, phase: str = "dpo held-out pass") -> torch.Tensor:
    """Summed log-probs [P, 2] (chosen, rejected) of every pair under ``model`` in eval mode,
    pairs shared over ranks in lock-step; every rank gets the whole tensor. Rank 0 shows the
    pass as progress ``phase``, counting its pairs."""
    mine = lockstep_micro_batches([pair_length(p, config.train.packing) for p in pairs],
                                  config.train.micro_batch_tokens, config.train.packing, info)
    values = [0.0] * (2 * len(pairs))
    was_training = model.training
    model.eval()
    try:
        with Progress(sum(len(indices) for indices in mine), phase, enabled=info.is_main and config.run.progress,
                      keys=(), unit="pairs") as progress:
            for indices in mine:
                micro = dpo_micro_batch(pairs, indices, None, config.train.packing, pad_token_id,
                                        shares_prompt(config)).to(info.device)
                with autocast_context(config.train.precision, info.device):
                    sums, _, _ = sequence_logps(model, micro, config.train.logits_chunk_size)
                for k, value in enumerate(sums.float().cpu().tolist()):
                    values[2 * indices[k // 2] + k % 2] = value
                progress.update(len(indices))
    finally:
        model.train(was_training)
    return torch.tensor(all_reduce_sum(values, info), dtype=torch.float32).reshape(-1, 2)


def reference_logps(model: torch.nn.Module, train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
                    config: DPOConfig, info: DistInfo, run_dir: Path, weights_id: str,
                    pad_token_id: int) -> ReferenceLogps | None:
    """The reference's summed log-probs of every pair: read from ``run_dir/reference_logps.pt``
    when its fingerprint matches, else one no-grad pass of the starting model (LoRA: adapter
    off) and saved there. None for SimPO (reference-free). Call before restoring a checkpoint."""
    if config.dpo.loss_type == "simpo":
        return None
    fingerprint = reference_fingerprint(weights_id, train_pairs, val_pairs, config.train.precision)
    path = Path(run_dir) / REFERENCE_FILE
    if config.dpo.reference_cache:
        cached = read_reference_cache(path, fingerprint, len(train_pairs), len(val_pairs), info)
        if cached is not None:
            if info.is_main:
                say(f"dpo: reference log-probs reused from {path}")
            return cached
    context = model.disable_adapter() if config.lora.enabled else contextlib.nullcontext()
    with context:
        scored = score_pairs(model, list(train_pairs) + list(val_pairs), config, info, pad_token_id,
                             phase="dpo reference log-probs")
    reference = ReferenceLogps(scored[:len(train_pairs)], scored[len(train_pairs):])
    if config.dpo.reference_cache and info.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"fingerprint": fingerprint, "train": reference.train, "val": reference.val}, temporary)
        os.replace(temporary, path)
    return reference


def reference_fingerprint(weights_id: str, train_pairs: Sequence[PreferencePair], val_pairs: Sequence[PreferencePair],
                          precision: str) -> str:
    """What the reference log-probs depend on: starting weights, every side's tokens and mask
    (train then held-out, in order) and the precision they are computed in."""
    digest = hashlib.sha256(f"v1|{weights_id}|{precision}|{len(train_pairs)}|{len(val_pairs)}".encode())
    for pair in list(train_pairs) + list(val_pairs):
        for side in (pair.chosen, pair.rejected):
            digest.update(repr((side.input_ids, side.loss_mask)).encode())
    return digest.hexdigest()[:20]


def read_reference_cache(path: Path, fingerprint: str, train: int, val: int, info: DistInfo) -> ReferenceLogps | None:
    """The cached reference when rank 0 finds one with this fingerprint (sent to every rank)."""
    values = [0.0] * (1 + 2 * (train + val))
    if info.is_main and path.is_file():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a torn or foreign file is recomputed
            saved = {}
        if saved.get("fingerprint") == fingerprint:
            values = [1.0] + torch.cat([saved["train"].reshape(-1), saved["val"].reshape(-1)]).tolist()
    values = all_reduce_sum(values, info)
    if values[0] < 1.0:
        return None
    scored = torch.tensor(values[1:], dtype=torch.float32).reshape(-1, 2)
    return ReferenceLogps(scored[:train], scored[train:], reused=True)


@torch.no_grad()
def evaluate(model: torch.nn.Module, pairs: Sequence[PreferencePair], reference: ReferenceLogps | None,
             config: DPOConfig, info: DistInfo, pad_token_id: int, *, at_start: bool = False) -> dict[str, float]:
    """Held-out metrics over every pair: ``val/loss``, ``val/rewards/*``, ``val/logps/*``,
    ``val/pairs``, ``val/mean_logp_accuracy`` (reference-free: the policy's per-token mean
    log-prob is higher for the chosen side) and ``val/rewards/accuracies/<group>``.
    ``at_start``: before the first update the policy is the reference, whose held-out
    log-probs are already known: no pass is run."""
    if at_start and reference is not None:
        logps = reference.val
    else:
        logps = score_pairs(model, pairs, config, info, pad_token_id)
    tokens = pair_token_counts(pairs)
    reference_P2 = None if reference is None else reference.val
    ref_chosen, ref_rejected = (None, None) if reference_P2 is None else (reference_P2[:, 0], reference_P2[:, 1])
    options = loss_options(config)
    _, metrics = preference_optimization_loss(logps[:, 0], logps[:, 1], ref_chosen, ref_rejected,
                                              chosen_tokens_P=tokens[:, 0], rejected_tokens_P=tokens[:, 1], **options)
    result = {f"val/{key}": metrics[key] for key in ("loss", *pair_metric_keys(config))}
    result["val/pairs"] = len(pairs)
    means = logps / tokens.clamp(min=1.0)
    result["val/mean_logp_accuracy"] = float((means[:, 0] > means[:, 1]).float().mean()) if len(pairs) else 0.0
    chosen_rewards, rejected_rewards, _, _ = preference_optimization_rewards(
        logps[:, 0], logps[:, 1], ref_chosen, ref_rejected, chosen_tokens_P=tokens[:, 0],
        rejected_tokens_P=tokens[:, 1], loss_type=options["loss_type"], beta=options["beta"])
    correct = (chosen_rewards > rejected_rewards).tolist()
    for group in sorted({p.group for p in pairs if p.group is not None}):
        picked = [right for p, right in zip(pairs, correct) if p.group == group]
        result[f"val/rewards/accuracies/{group}"] = sum(picked) / len(picked)
    return result


def step_metrics(plan: StepPlan, result: Any, state: TrainerState, pair_metrics: dict[str, float],
                 pairs: Sequence[PreferencePair], targets: Sequence[int]) -> dict[str, Any]:
    """The per-step metric line: the shared optimizer-step keys (``tokens_per_step`` =
    ``masked_token_count`` = response tokens of both sides, all ranks) plus the pair metrics."""
    tokens = sum(pairs[i].tokens for i in plan.sample_indices)
    trained = sum(targets[i] for i in plan.sample_indices)
    return optimizer_step_metrics(result, step=state.step, epoch=plan.epoch_progress, tokens=tokens,
                                  trained_tokens=trained, **pair_metrics)


def announce(config, info, model, train_pairs, val_pairs, total_steps, warmup_steps, resume_path) -> None:
    announce_run(f"dpo ({config.dpo.loss_type}, beta {config.dpo.beta})", config, info, model,
                 f"{len(train_pairs)} train / {len(val_pairs)} val pairs", sum(p.tokens for p in train_pairs),
                 total_steps, warmup_steps, resume_path)
