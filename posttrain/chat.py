"""``posttrain chat``: render one prompt with the chat template, generate, return the reply."""

from __future__ import annotations

from posttrain.config import ChatConfig
from posttrain.models import inference_dtype, load_model, load_tokenizer
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.hf import HFEngine


def chat(config: ChatConfig, prompt: str) -> str:
    tokenizer = load_tokenizer(config.model.name, chat_template=config.model.chat_template)
    model = load_model(config.model.name, dtype=inference_dtype("cpu"))  # chat generates on the CPU
    messages = ([{"role": "system", "content": config.system}] if config.system else []) + [
        {"role": "user", "content": prompt}
    ]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    params = SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens, seed=config.seed
    )
    (completion,) = HFEngine(model, tokenizer).generate([list(prompt_ids)], params)
    return completion.text.strip()
