"""posttrain: post-train language models (SFT, reward models, RL) from a laptop CPU to a GPU cluster."""

__version__ = "0.1.0"
