"""Rollouts with transformers' ``generate``: batched, left-padded, CPU or GPU.

Completions are returned in prompt order, ``n`` per prompt, each trimmed after its first
end-of-sequence token (kept: the model must learn to emit it) or after the stop string that
ended it.
"""

from __future__ import annotations

import contextlib

import torch

from posttrain.rollout.base import Completion, SamplingParams


@contextlib.contextmanager
def _generation_attention(model):
    """Generate with SDPA and the KV cache even when the model trains with packed (varlen)
    attention and ``use_cache=False`` (``train.loop.prepare_for_training``); restored after."""
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


class HFEngine:
    """Generates with the live policy module itself, so ``update_weights`` has nothing to copy."""

    def __init__(self, model, tokenizer, *, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)

    def update_weights(self, model) -> None:
        self.model = model

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]:
        expanded = [index for index in range(len(prompt_ids)) for _ in range(params.n)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        completions: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start : start + self.batch_size]
            completions.extend(self._generate_batch([prompt_ids[i] for i in chunk], chunk, params))
        return completions

    def _generate_batch(self, prompts: list[list[int]], indices: list[int], params: SamplingParams) -> list[Completion]:
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
        if sampling:
            kwargs.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        try:
            with _generation_attention(self.model):
                out = self.model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
                )
        finally:
            self.model.train(was_training)
        new_tokens = out.sequences[:, width:].cpu()
        logprobs = None
        if params.return_logprobs:
            logits = torch.stack(out.logits, dim=1).float().cpu()  # [B, new, V]
            logprobs = torch.log_softmax(logits, dim=-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [
            self._completion(index, new_tokens[row].tolist(), None if logprobs is None else logprobs[row].tolist(), params)
            for row, index in enumerate(indices)
        ]

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
            logprobs=None if logprobs is None else logprobs[:end],
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
