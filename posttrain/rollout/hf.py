"""Rollouts with a transformers model: batched, left-padded, CPU or GPU.

Decoding runs in ``rollout.decode`` (finished sequences leave the batch), or in transformers'
``generate`` for truncated sampling (top-p / top-k) and for FSDP ranks in lock-step. On a CPU
the engine generates with a copy whose linear weights are stored transposed
(``rollout.prepacked``: about twice as fast at decode's batch sizes), refreshed after every update.

Completions are returned in prompt order, ``n`` per prompt, each trimmed after its first
end-of-sequence token (kept: the model must learn to emit it) or after the stop string that
ended it.

More savings that leave the sampled distribution as it is:
- shared prefill: the ``n`` copies of a prompt (or equal prompts passed separately, as an agent's
  first turns of one group) are prefilled once and the key/value cache is repeated to their rows
  (a group of 8 pays for one prompt instead of 8); in the decode loop, the prefix all prompts of
  a batch share (a chat template's system turn and tool schemas) is prefilled once as well;
- kept keys/values (``rollout.kv_reuse``, CPU): an agent's next turn extends the last turn's
  prompt and completion; the keys/values of the last call's rows are kept until the weights
  change, and a prompt that starts with a kept row's ids prefills only its rest;
- ``dtype``: generation may run on a copy of the policy in another dtype (bf16 on a CPU with
  bf16 matmuls, like vLLM serving bf16 weights), refreshed by ``update_weights`` after every
  update. ``separate_copy``: a copy even in the same dtype, so generation for the next steps
  can run while the trainer updates the policy (``rl.max_staleness`` > 0). The trainer still trains on the exact sampled ids at its own precision; the
  log-prob gap between the two is logged when the engine reports log-probs.

Progress: inside a phase of ``posttrain.log.Progress`` (an evaluation, a trainer's step) the
engine reports each finished batch of sequences (``sequences_generated``) and each decode step
(``heartbeat``), so a long generation shows its progress, on a terminal or in a log file.
"""

from __future__ import annotations

import contextlib
import copy
import inspect

import torch
from transformers import DynamicCache

from posttrain.log import current_phase, heartbeat, sequences_generated
from posttrain.rollout.base import Completion, SamplingParams
from posttrain.rollout.decode import decode, stop_string_hit
from posttrain.rollout.kv_reuse import KeptRows, build_cache, weights_stamp
from posttrain.rollout.prepacked import can_prepack, prepacked_copy, refresh


@contextlib.contextmanager
def _generation_attention(model):
    """Generate with SDPA and the KV cache even when the model trains with packed (varlen)
    attention and ``use_cache=False`` (``models.prepare.prepare_for_training``); restored after."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    saved_attn, saved_cache = getattr(config, "_attn_implementation", None), getattr(config, "use_cache", None)
    switch = saved_attn not in (None, "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
    if switch:
        config._attn_implementation = "sdpa"
    config.use_cache = True
    try:
        yield
    finally:
        if switch:
            config._attn_implementation = saved_attn
        config.use_cache = saved_cache


MIN_COMMON_PREFIX = 8  # tokens every prompt of a batch must share before they are prefilled once


def common_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading ids all ``sequences`` share.

    >>> common_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]), common_prefix_length([[1], [2]])
    (2, 0)
    """
    shortest = min(len(sequence) for sequence in sequences)
    for position in range(shortest):
        if any(sequence[position] != sequences[0][position] for sequence in sequences):
            return position
    return shortest


def same_prompt_as(prompt_ids: list[list[int]]) -> list[int]:
    """For each prompt, the index of the first prompt with the same ids: the prefill is shared
    by equal prompts whether they come as ``n`` copies or as separate entries (an agent's
    trajectories of one group, each asked with n=1).

    >>> same_prompt_as([[1, 2], [3], [1, 2], [3], [4]])
    [0, 1, 0, 1, 4]
    """
    first: dict[tuple[int, ...], int] = {}
    return [first.setdefault(tuple(ids), index) for index, ids in enumerate(prompt_ids)]


class HFEngine:
    """Generates with the live policy module itself (``update_weights`` has nothing to copy),
    or, given a ``dtype`` other than the policy's, with a copy in that dtype that
    ``update_weights`` refreshes in place.

    ``synced_gpus``: the policy is sharded over ranks (FSDP) that generate different prompts;
    every rank keeps running forward passes until all ranks' sequences are done (transformers'
    ``synced_gpus``). The ranks must then call ``generate`` with as many sequences each.
    """

    version = 0  # updates applied (update_weights calls)

    def __init__(self, model, tokenizer, *, batch_size: int = 64, synced_gpus: bool = False,
                 dtype: torch.dtype | None = None, share_prefill: bool = True, separate_copy: bool = False,
                 compact: bool = True, prepack: bool | None = None, share_common_prefix: bool = True,
                 reuse_kv: bool = True):
        self.dtype = None if dtype is None or _is_sharded(model) or _dtype_of(model) == dtype else dtype
        if separate_copy and _is_sharded(model):
            raise ValueError("a separate generation copy of an FSDP-sharded policy is not supported")
        self.prepack = can_prepack(model) and prepack is not False  # None: wherever it can (rollout.prepacked)
        self.separate_copy = separate_copy or self.dtype is not None or self.prepack
        if self.prepack:
            self.model = prepacked_copy(model, self.dtype)
        elif self.separate_copy:
            self.model = copy.deepcopy(model).to(self.dtype or _dtype_of(model)).eval()
        else:
            self.model = model
        self.share_prefill = share_prefill and not synced_gpus
        self.compact = compact  # rollout.decode: finished rows leave the batch (else transformers' generate)
        self.share_common_prefix = share_common_prefix  # the decode loop prefills a batch's common prefix once
        # keys/values of the last call's rows serve the next (kv_reuse); on a CPU only, where memory is
        # plentiful and prefill is most of an agent turn's cost
        self.reuse_kv = reuse_kv and not synced_gpus and next(self.model.parameters()).device.type == "cpu"
        self._kept: KeptRows | None = None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced_gpus = synced_gpus
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def update_weights(self, model) -> None:
        self._kept = None  # keys/values of the old weights
        if self.prepack:
            refresh(self.model, model)
        elif not self.separate_copy:
            self.model = model
        else:  # refresh the generation copy in place (load_state_dict casts to its dtype)
            self.model.load_state_dict(model.state_dict())
        self.version += 1

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        expanded = [index for index in range(len(prompt_ids)) for _ in range(params.n)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        same_as = same_prompt_as(prompt_ids)
        stamp = weights_stamp(self.model) if self.reuse_kv else 0
        kept = self._kept if self._kept is not None and self._kept.stamp == stamp else None
        self._kept = KeptRows(stamp) if self.reuse_kv else None  # this call's rows, for the next call
        completions: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start : start + self.batch_size]
            completions.extend(self._generate_batch([prompt_ids[i] for i in chunk], chunk, params,
                                                    [same_as[i] for i in chunk], kept))
            sequences_generated(len(chunk))
        return completions

    def _generate_batch(self, prompts: list[list[int]], indices: list[int], params: SamplingParams,
                        share_keys: list[int] | None = None, kept: KeptRows | None = None) -> list[Completion]:
        """indices: each row's prompt index; share_keys: rows with the same key have the same
        prompt (the prefill is shared among them), default ``indices``; kept: the last call's
        rows, whose keys/values a prompt that starts with their ids reuses."""
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            attention_mask[row, width - len(prompt) :] = 1
        sampling = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            pad_token_id=self.pad_id,
            eos_token_id=sorted(self.eos_ids),
            return_dict_in_generate=True,
            output_logits=params.return_logprobs,
        )
        if self.synced_gpus:
            kwargs["synced_gpus"] = True
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if current_phase() is not None:
            kwargs["stopping_criteria"] = _decode_step_heartbeat()
        was_training = self.model.training
        self.model.eval()
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        try:
            with _generation_attention(self.model):
                keys = indices if share_keys is None else share_keys
                compact = self.compact and not self.synced_gpus and params.top_p == 1.0 and not params.top_k
                cache = None
                if compact and kept is not None and kept.ids:
                    prefilled = self._reused_prefill(prompts, kept, device)
                    if prefilled is not None:
                        cache, input_ids, attention_mask = prefilled
                if cache is None and compact and self.share_prefill and self.share_common_prefix:  # any row layout
                    prefilled = self._common_prefix_prefill(prompts, keys, device)
                    if prefilled is not None:
                        cache, input_ids, attention_mask = prefilled
                if cache is None and self.share_prefill:
                    cache = self._shared_prefill(input_ids, attention_mask, keys)
                if compact:
                    tokens, logprobs = decode(
                        self.model, input_ids, attention_mask, max_new_tokens=params.max_new_tokens,
                        temperature=params.temperature, eos_ids=self.eos_ids, cache=cache,
                        cache_keyword=cache_keyword(self.model), return_logprobs=params.return_logprobs,
                        stop_hit=stop_string_hit(self.tokenizer, params.stop) if params.stop else None,
                        on_step=heartbeat if current_phase() is not None else None,
                        on_rows_leave=None if self._kept is None else (
                            lambda rows, batch_rows, cache, mask, tokens: self._kept.keep(
                                cache, batch_rows, mask, [prompts[r] + tokens[r][:-1] for r in rows])))
                    return [self._completion(index, tokens[row], None if logprobs is None else logprobs[row], params)
                            for row, index in enumerate(indices)]
                if cache is not None:
                    kwargs[cache_keyword(self.model)] = cache
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = None
        if params.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, new, V], before any logits processor
            if params.temperature > 0:  # the distribution sampled from, as the trainer computes it (logits / T)
                logits = logits / params.temperature
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [
            self._completion(index, new_tokens[row].tolist(), None if logprobs is None else logprobs[row].tolist(), params)
            for row, index in enumerate(indices)
        ]

    def _reused_prefill(self, prompts: list[list[int]], kept: KeptRows, device):
        """Each prompt's longest run of leading ids kept from the last call, its keys/values
        reused, right-aligned in R columns; then each prompt's rest but its last token prefilled
        in S columns (padding between, masked). None when some prompt shares fewer than
        ``MIN_COMMON_PREFIX`` ids with every kept row (a prompt from elsewhere: prefilled whole),
        or when prefilling the batch's distinct prompts after their common prefix costs less.

        Returns (cache, input_ids [B, R + S + 1], attention_mask [B, R + S + 1]) like
        ``_common_prefix_prefill``: every row's last prompt token in the last column, positions
        counted over unmasked columns."""
        picks = []
        for prompt in prompts:
            index, shared = kept.longest_shared(prompt[:-1])
            if shared < MIN_COMMON_PREFIX:
                return None
            picks.append((index, shared))
        heads = {tuple(prompt[:-1]) for prompt in prompts}
        common = common_prefix_length([list(head) for head in heads])
        common = common if common >= MIN_COMMON_PREFIX and self.share_common_prefix else 0
        to_prefill = sum(len(prompt) - 1 - length for prompt, (_, length) in zip(prompts, picks))
        if to_prefill >= common + sum(len(head) - common for head in heads):
            return None  # the prefix the prompts share with each other is the larger saving
        reused = max(length for _, length in picks)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        cache = build_cache(kept, picks, reused, DynamicCache, base.config, next(self.model.parameters()).dtype,
                            device)
        cached_BR = torch.zeros((len(prompts), reused), dtype=torch.long, device=device)
        for row, (_, length) in enumerate(picks):
            cached_BR[row, reused - length :] = 1
        cache, mask_BW = self._prefill_rests(cache, cached_BR, [prompt[length:-1] for prompt, (_, length)
                                                                in zip(prompts, picks)], device)
        return cache, *self._last_tokens(prompts, mask_BW)

    def _common_prefix_prefill(self, prompts: list[list[int]], keys: list[int], device):
        """Prefill the prefix every prompt shares (a chat template's system turn, a tool schema)
        once, then each distinct prompt's rest but its last token, and repeat the cache to the
        rows; None when the shared prefix is shorter than ``MIN_COMMON_PREFIX`` tokens.

        prompts: B token lists; keys: [B], equal for equal prompts (``same_prompt_as``).
        Returns (cache, input_ids [B, C + S + 1], attention_mask [B, C + S + 1]) for the decode
        loop: C shared columns, the rests right-aligned in S columns (padding between, masked),
        every row's last prompt token in the last column. Position ids count unmasked columns,
        so each token keeps the position it has in its own prompt; the rows are those a
        separate prefill of every prompt gives, up to floating-point rounding.
        """
        distinct = list(dict.fromkeys(keys))
        heads = [prompts[keys.index(key)][:-1] for key in distinct]
        common = common_prefix_length(heads)
        if common < MIN_COMMON_PREFIX:
            return None
        keyword = cache_keyword(self.model)
        out = self.model(input_ids=torch.tensor([heads[0][:common]], device=device),
                         attention_mask=torch.ones((1, common), dtype=torch.long, device=device),
                         position_ids=torch.arange(common, device=device)[None], use_cache=True, logits_to_keep=1)
        cache = getattr(out, keyword)
        cache.batch_select_indices(torch.zeros(len(distinct), dtype=torch.long, device=device))
        cache, mask_UW = self._prefill_rests(cache, torch.ones((len(distinct), common), dtype=torch.long, device=device),
                                             [head[common:] for head in heads], device)
        rows = torch.tensor([distinct.index(key) for key in keys], device=device)
        cache.batch_select_indices(rows)
        return cache, *self._last_tokens(prompts, mask_UW.index_select(0, rows))

    def _prefill_rests(self, cache, cached_XC: torch.Tensor, rests: list[list[int]], device):
        """Prefill each row's ``rests`` ids after the C columns ``cache`` holds (``cached_XC``: which
        of them are the row's), right-aligned in S columns. Returns (cache, mask [X, C + S])."""
        width = max(len(rest) for rest in rests)
        mask_XW = torch.cat([cached_XC, cached_XC.new_zeros((len(rests), width))], dim=1)
        if not width:
            return cache, mask_XW
        columns = cached_XC.shape[1]
        block_XS = torch.full((len(rests), width), self.pad_id, dtype=torch.long, device=device)
        for row, rest in enumerate(rests):
            if rest:
                block_XS[row, width - len(rest) :] = torch.tensor(rest, dtype=torch.long, device=device)
                mask_XW[row, columns + width - len(rest) :] = 1
        positions_XS = (mask_XW.cumsum(-1) - 1).clamp(min=0)[:, columns:]
        keyword = cache_keyword(self.model)
        out = self.model(input_ids=block_XS, attention_mask=mask_XW, position_ids=positions_XS, use_cache=True,
                         logits_to_keep=1, **{keyword: cache})
        return getattr(out, keyword), mask_XW

    def _last_tokens(self, prompts: list[list[int]], mask_BW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode loop's (input_ids, attention_mask) [B, W + 1]: a prefilled layout whose
        columns ``mask_BW`` describes, then every prompt's last token."""
        mask_BW = torch.cat([mask_BW, mask_BW.new_ones((len(prompts), 1))], dim=1)
        input_ids = torch.full(mask_BW.shape, self.pad_id, dtype=torch.long, device=mask_BW.device)
        input_ids[:, -1] = torch.tensor([prompt[-1] for prompt in prompts], dtype=torch.long, device=mask_BW.device)
        return input_ids, mask_BW

    def _shared_prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, indices: list[int]):
        """The key/value cache of every row's prompt but its last token, computed once per
        distinct prompt and repeated to the rows that share it; None when no prompt repeats.

        input_ids, attention_mask: [B, W] left-padded; indices: [B] prompt index of each row.
        Position ids follow generate's rule (attention-mask cumsum), so the cache equals the
        one generate would build itself.
        """
        distinct = list(dict.fromkeys(indices))
        if len(distinct) == len(indices) or input_ids.shape[1] < 2:
            return None
        first_row = torch.tensor([indices.index(i) for i in distinct], device=input_ids.device)
        ids_UW = input_ids.index_select(0, first_row)[:, :-1]
        mask_UW = attention_mask.index_select(0, first_row)[:, :-1]
        positions = (mask_UW.long().cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids_UW, attention_mask=mask_UW, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        cache = getattr(out, cache_keyword(self.model))
        cache.batch_select_indices(torch.tensor([distinct.index(i) for i in indices], device=input_ids.device))
        return cache

    def _completion(self, index: int, tokens: list[int], logprobs: list[float] | None, params: SamplingParams) -> Completion:
        finish = "length"
        end = len(tokens)
        if params.stop:
            end = self._stop_string_end(tokens, params.stop)
            finish = "stop" if end < len(tokens) or self._has_stop(tokens, params.stop) else "length"
        for position, token in enumerate(tokens[:end]):
            if token in self.eos_ids:  # the first eos ends it; what follows is padding, never sampled
                end, finish = position + 1, "stop"
                break
        tokens = tokens[:end]
        return Completion(
            prompt_index=index,
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finish_reason=finish,
            logprobs=None if logprobs is None else logprobs[:end], weight_version=self.version,
        )

    def _has_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(stop in text for stop in stops)

    def _stop_string_end(self, tokens: list[int], stops: tuple[str, ...]) -> int:
        """Smallest k such that tokens[:k] decodes to text containing a stop string (else len)."""
        if not self._has_stop(tokens, stops):
            return len(tokens)
        low, high = 1, len(tokens)
        while low < high:  # containment is monotone in k
            middle = (low + high) // 2
            if self._has_stop(tokens[:middle], stops):
                high = middle
            else:
                low = middle + 1
        return low


def cache_keyword(model) -> str:
    """The name a model's forward and ``generate`` give the key/value cache: ``cache`` in
    transformers 5 (where ``past_key_values`` is a deprecated alias, removed in 6), else
    ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _decode_step_heartbeat():
    """A stopping criterion that never stops a sequence and tells the current progress phase,
    once per decode step, that generation is still going (``posttrain.log.heartbeat``)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class DecodeStepHeartbeat(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            heartbeat()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([DecodeStepHeartbeat()])


def _dtype_of(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _is_sharded(model) -> bool:
    """FSDP2-sharded (DTensor) parameters: the engine must use the live module."""
    return any(hasattr(p, "full_tensor") for p in model.parameters())
