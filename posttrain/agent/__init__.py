"""Agentic rollouts: multi-turn trajectories in which the model calls tools (a Python
interpreter in the sandbox, user functions, environments) and reads their results.

A trajectory is a list of segments ``(token_ids, kind, logprobs)`` with kind in
{prompt, sampled, env}; the trained mask is exactly ``kind == sampled`` (docs/AGENTIC.md)."""
