"""``model`` reward: a trained reward model scores each (prompt, completion).

docs/PIPELINE.md, phase 2 -> phase 3: the reward model trained by ``posttrain rm`` (exported to
``runs/<name>/final/`` in Hugging Face format) becomes the reward of RL. Each completion is
rendered exactly as the reward model's training pairs were (``data.scored_sequence.render_for_scoring``:
the reward model's own chat template, the prompt, the completion as the assistant reply) and
the score is read at the reply's end-of-turn token. In config::

    reward:
      name: model
      path: runs/rm_quickstart/final

or as one term of a composite (``terms: {model: {weight: 1.0, path: ...}, math: {...}}``).

The prompt of row ``i`` is ``metadata[i]["prompt_messages"]`` (or ``["messages"]``) when it
holds a list of messages, else ``prompts[i]`` as one user message. Completions are text: the
reward model may have another tokenizer than the policy, so it re-renders (the policy's
sampled ids are not needed here). The model loads on the first call.

Scoring is lenient where training is strict: a completion whose rendering is not token-
consistent with its prompt (tokens merging across the boundary) is still scored, on the
tokens the template produces. A completion is untrusted text: special-token strings it
writes (``<|im_end|>``) are defused (``data.render.defuse_special_tokens``), so a policy
cannot end its reply early or forge a turn in the reward model's view; the prompt was checked
when its row was loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from posttrain.errors import ConfigError, UserError
from posttrain.rewards.output import RewardOutput, check_batch
from posttrain.data.formats import normalise_messages
from posttrain.data.render import defuse_special_tokens
from posttrain.models import load_tokenizer, resolve_model_dir
from posttrain.data.scored_sequence import render_for_scoring
from posttrain.models.scalar_head import is_scalar_head_config, load_scalar_head_model, score_sequences


@dataclass
class ModelReward:
    """Scores from a scalar-head reward model saved by ``posttrain rm``; a preference score,
    not a correctness check (``RewardOutput.correct`` stays None: no accuracy).

    Args:
        path: the reward model: a ``final/`` directory (or any model spec holding a
            ``XxxForSequenceClassification`` with one label).
        chat_template: Jinja file replacing the tokenizer's template (use the one the reward
            model was trained with, if it was overridden).
        batch_tokens: tokens per scoring forward pass (padded rows x longest row).
        device: "cpu", "cuda", ...; None = CUDA when available.
        precision: "fp32", or "bf16" autocast (GPU).
        name: component name (RL logs ``reward/<name>``).
    """

    path: str
    chat_template: str | None = None
    batch_tokens: int = 4096
    device: str | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    name: str = "model"
    _loaded: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError("path: the reward model directory is required (e.g. runs/rm_quickstart/final)")
        if not isinstance(self.batch_tokens, int) or self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens: must be a positive integer, not {self.batch_tokens!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"precision: must be fp32 or bf16, not {self.precision!r}")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ConfigError(f"chat_template: {self.chat_template} does not exist")
        self._check_is_reward_model()

    def _check_is_reward_model(self) -> None:
        from transformers import AutoConfig


        try:
            source = resolve_model_dir(self.path)
            config = AutoConfig.from_pretrained(source)
        except UserError as exc:
            raise ConfigError(f"path: {exc}") from None
        except Exception as exc:
            raise ConfigError(f"path: cannot read the model config in {self.path} ({type(exc).__name__})") from None
        if not is_scalar_head_config(config):
            found = ", ".join(getattr(config, "architectures", None) or ["unknown"])
            raise ConfigError(
                f"path: {self.path} is not a reward model ({found}); give the final/ directory written by posttrain rm")

    def _load(self):
        if self._loaded is None:
            import torch


            device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
            tokenizer = load_tokenizer(self.path, self.chat_template)
            model = load_scalar_head_model(self.path, dtype=torch.float32).to(device).eval()
            model.requires_grad_(False)
            pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else tokenizer.pad_token_id
            self._loaded = (model, tokenizer, device, pad_id)
        return self._loaded

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 metadata: Sequence[dict] | None = None) -> RewardOutput:
        import torch


        metadata = check_batch(prompts, completions, metadata)
        if not completions:
            return RewardOutput([], {self.name: []})
        model, tokenizer, device, pad_id = self._load()
        sequences = [
            render_for_scoring(prompt_messages(prompt, meta),
                               [{"role": "assistant", "content": defuse_special_tokens(completion, tokenizer)}],
                               tokenizer, line=i + 1, source="reward batch", strict=False,
                               allow_special_tokens_in_text=True)
            for i, (prompt, completion, meta) in enumerate(zip(prompts, completions, metadata))
        ]
        autocast = torch.bfloat16 if self.precision == "bf16" else None
        scores = score_sequences(model, sequences, pad_token_id=pad_id, batch_tokens=self.batch_tokens,
                                 device=device, autocast_dtype=autocast)
        return RewardOutput(scores, {self.name: list(scores)})


def prompt_messages(prompt: str, meta: dict) -> list[dict]:
    """The prompt as messages: ``meta["prompt_messages"]`` / ``meta["messages"]``, else one user turn.

    >>> prompt_messages("What is 2 + 2?", {})
    [{'role': 'user', 'content': 'What is 2 + 2?'}]
    >>> prompt_messages("ignored", {"prompt_messages": [{"role": "system", "content": "Be brief."},
    ...                                                  {"role": "user", "content": "2 + 2?"}]})[0]["role"]
    'system'
    """

    for key in ("prompt_messages", "messages"):
        value = meta.get(key)
        if isinstance(value, list) and value:
            return normalise_messages(value, f"reward metadata {key}")
    return normalise_messages(prompt, "reward prompt")
