"""Rewards for RL and evaluation: plain callables ``(prompts, completions, metadata) -> RewardOutput``.

Built-ins (``math``, ``code`` + the sandbox, ``format``, ``length``, ``composite``, ``model``)
are built from config with ``build_reward``; see ``registry.py``. Submodules import lazily so
``import posttrain.rewards`` stays cheap.
"""

from posttrain.rewards.output import RewardFn, RewardOutput
from posttrain.rewards.registry import build_reward

__all__ = ["RewardFn", "RewardOutput", "build_reward"]
