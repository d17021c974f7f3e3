"""The rollout interface: token ids in, sampled token ids out.

Every engine (``hf``: transformers generate; ``vllm``: vLLM's offline engine) implements

    engine.generate(prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]
    engine.update_weights(model) -> None     # after a policy update (RL)
    engine.version: int                      # updates applied so far (0 = the starting weights)

Prompts arrive already rendered (``posttrain.data.render``); completions carry the exact
token ids the engine sampled, so RL trains on those ids and never re-tokenises text
(docs/ARCHITECTURE.md, "One tokenisation"). Text is decoded for rewards and logs only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature == 0`` means greedy; ``n`` completions per prompt."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        if self.n < 1 or self.max_new_tokens < 1 or self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")


@dataclass
class Completion:
    """One sampled completion of prompt ``prompt_index`` (index into the generate() input).

    ``token_ids`` are exactly the sampled ids, including the end-of-sequence token when the
    model emitted one (``finish_reason == "stop"``); ``logprobs`` (if requested) are the
    engine's log-probabilities of those ids at the sampling temperature: with top_p 1 and
    top_k 0 the distribution the trainer computes (``models.logprobs``); with truncation, vLLM's
    are of the truncated distribution and the hf engine's are not (docs/METRICS.md "Mismatch").
    ``weight_version`` is the engine's own count of weight updates (a server reports it per
    token span); the RL loop stamps samples with its own policy version (``train.rl_async``).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: list[float] | None = field(default=None)
    weight_version: int | None = None  # the policy version (updates applied) of the weights that sampled it


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams) -> list[Completion]: ...

    def update_weights(self, model) -> None: ...
