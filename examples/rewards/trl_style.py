"""Reward functions written the way TRL's GRPOTrainer documentation writes them.

TRL docs, "GRPO Trainer: Using a custom reward function"
(https://huggingface.co/docs/trl/grpo_trainer#using-a-custom-reward-function): a reward gets
``prompts``, ``completions`` and every other dataset column as keyword arguments and returns
one float per completion (or None where it does not apply). For a conversational dataset each
completion is ``[{"role": "assistant", "content": ...}]``. posttrain calls them the same way:
``reward: examples/rewards/trl_style.py:accuracy_reward`` (``configs/trl_jsonl_grpo.yaml``).
"""

import re


def accuracy_reward(completions, solution, **kwargs):
    """1.0 when the last number of the reply equals the ``solution`` column, else 0.0.

    >>> accuracy_reward([[{"role": "assistant", "content": "2 + 2 = 4"}]], solution=["4"])
    [1.0]
    """
    contents = [completion[0]["content"] for completion in completions]
    rewards = []
    for content, answer in zip(contents, solution):
        numbers = re.findall(r"-?\d+", content)
        rewards.append(1.0 if numbers and numbers[-1] == str(answer).strip() else 0.0)
    return rewards


def format_reward(completions, **kwargs):
    """1.0 when the reply is one line ``a + b = c``, as the prompt asks.

    >>> format_reward([[{"role": "assistant", "content": "2 + 2 = 4"}]])
    [1.0]
    """
    pattern = r"^\s*\d+ \+ \d+ = -?\d+\.?\s*$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content) else 0.0 for content in contents]
