"""A decode loop that drops finished sequences from the batch (the hf engine's fast path).

transformers' ``generate`` keeps every row of a batch in every forward pass until the last row
ends: a batch whose completions mostly end after 20 tokens but one runs to 96 pays 96 full-batch
steps. ``decode`` samples the same distribution (logits / temperature, softmax, one draw from
the categorical; or argmax when greedy) and removes rows from the batch, their key/value cache included, once they
have ended (an end-of-sequence id, or a stop string in their text).

It covers what RL and evaluation use: plain temperature sampling or greedy, end ids, stop
strings, log-probs of the sampled ids. Truncated sampling (top-p / top-k) and ranks that must
run in lock-step (FSDP's ``synced_gpus``) stay on ``generate`` (``rollout.hf``).

Sampled ids are not the ones ``generate`` draws for the same seed (the random stream is used
in another order once rows leave the batch); the distribution is the same, and a seed gives the
same ids every time. ``benchmarks/bench_generate.py`` times both side by side.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def stop_string_hit(tokenizer, stops: tuple[str, ...]) -> Callable[[list[int]], bool]:
    """A check ``hit(tokens) -> bool``: the decoded text of ``tokens`` contains a stop string.

    Only the last tokens are decoded: a stop string that first appears at the newest token
    ends within its last ``len(stop)`` tokens (every token decodes to at least one character;
    a few more are decoded for tokens that are parts of one character).
    """
    window = max(len(stop) for stop in stops) + 8

    def hit(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-window:], skip_special_tokens=True)
        return any(stop in text for stop in stops)

    return hit


def sample_categorical(probs_AV: torch.Tensor) -> torch.Tensor:
    """One index per row of ``probs_AV`` [A, V] (rows sum to 1), drawn with probability
    ``probs_AV[a, v]``: by the inverse of each row's cumulative distribution at one uniform draw.

    The same distribution as ``torch.multinomial(probs, 1)``, which draws V exponentials per row
    (on a CPU, ~40 ms for 36 rows of a 49k vocabulary: a sixth of a decode step); this draws one
    number per row. The sums are in float64, so a token's interval is its probability to ~1e-16.
    Returns: [A] long.
    """
    cdf_AV = probs_AV.double().cumsum(dim=-1)
    draw_A1 = torch.rand(probs_AV.shape[0], 1, dtype=torch.float64, device=probs_AV.device) * cdf_AV[:, -1:]
    return torch.searchsorted(cdf_AV, draw_A1, right=True).squeeze(-1).clamp_(max=probs_AV.shape[-1] - 1)


@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
           temperature: float, eos_ids: set[int], cache=None, cache_keyword: str = "cache",
           stop_hit: Callable[[list[int]], bool] | None = None, return_logprobs: bool = False,
           on_step: Callable[[], None] | None = None, compact_fraction: float = 0.125,
           on_rows_leave: Callable[[list[int], list[int], object, torch.Tensor, list[list[int]]], None] | None = None,
           ) -> tuple[list[list[int]], list[list[float]] | None]:
    """Sample up to ``max_new_tokens`` ids after each left-padded prompt row.

    input_ids, attention_mask: [B, W] left-padded prompts.
    cache: a key/value cache of every row's first W - 1 tokens (the hf engine's shared
      prefill), or None (the prompts are prefilled here).
    Returns (tokens, logprobs): B lists of sampled ids, each ending at its first end id or at
    the token that completed a stop string (kept), or at ``max_new_tokens``; and the log-probs
    of those ids under softmax(logits / temperature) (temperature 0: plain softmax), or None.
    Finished rows leave the batch once they are at least ``compact_fraction`` of it (each
    removal copies the cache once, about one decode step's memory traffic).
    on_rows_leave(rows, batch_rows, cache, mask_AL, tokens): called as rows leave the batch and
    for the rows left at the end, with their original and their batch indices; the cache holds
    each row's prompt and all its sampled ids but the last (then, for a row that ended before
    it left, ids fed after its end).
    """
    positions_B = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    if cache is not None:
        out = model(input_ids=input_ids[:, -1:], attention_mask=attention_mask,
                    position_ids=positions_B[:, -1:], use_cache=True, **{cache_keyword: cache})
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions_B,
                    use_cache=True, logits_to_keep=1)
    cache = getattr(out, cache_keyword)
    logits_AV = out.logits[:, -1].float()
    positions_A = positions_B[:, -1].clone()
    mask_AL = attention_mask
    rows_A = torch.arange(input_ids.shape[0], device=input_ids.device)  # original row of each live row
    tokens: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    logprobs: list[list[float]] | None = [[] for _ in range(input_ids.shape[0])] if return_logprobs else None
    eos_A = torch.tensor(sorted(eos_ids), device=input_ids.device)
    ended_A = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        scaled_AV = logits_AV / temperature if temperature > 0 else logits_AV
        if temperature > 0:
            next_A = sample_categorical(torch.softmax(scaled_AV, dim=-1))
        else:
            next_A = scaled_AV.argmax(dim=-1)
        ended_now_A = torch.isin(next_A, eos_A)
        live = (~ended_A).nonzero().squeeze(-1).tolist()
        rows, ids = rows_A.tolist(), next_A.tolist()
        if logprobs is not None:
            chosen = torch.log_softmax(scaled_AV, dim=-1).gather(-1, next_A[:, None]).squeeze(-1).tolist()
        for index in live:
            tokens[rows[index]].append(ids[index])
            if logprobs is not None:
                logprobs[rows[index]].append(chosen[index])
            if stop_hit is not None and stop_hit(tokens[rows[index]]):
                ended_now_A[index] = True
        ended_A |= ended_now_A
        if on_step is not None:
            on_step()
        if bool(ended_A.all()) or step == max_new_tokens - 1:
            break
        if int(ended_A.sum()) >= max(1, compact_fraction * len(rows)):
            if on_rows_leave is not None:
                leaving = ended_A.nonzero().squeeze(-1).tolist()
                on_rows_leave([rows[index] for index in leaving], leaving, cache, mask_AL, tokens)
            keep_A = (~ended_A).nonzero().squeeze(-1)
            cache.batch_select_indices(keep_A)
            rows_A, mask_AL, positions_A, next_A = rows_A[keep_A], mask_AL[keep_A], positions_A[keep_A], next_A[keep_A]
            ended_A = ended_A[keep_A]
        mask_AL = torch.cat([mask_AL, mask_AL.new_ones(mask_AL.shape[0], 1)], dim=1)
        positions_A = positions_A + 1
        out = model(input_ids=next_A[:, None], attention_mask=mask_AL, position_ids=positions_A[:, None],
                    use_cache=True, **{cache_keyword: cache})
        cache = getattr(out, cache_keyword)
        logits_AV = out.logits[:, -1].float()
    if on_rows_leave is not None:
        on_rows_leave(rows_A.tolist(), list(range(len(rows_A))), cache, mask_AL, tokens)
    return tokens, logprobs
