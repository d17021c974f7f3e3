"""Evaluation: tasks (HumanEval, reasoning-gym, JSONL, perplexity), pass@k, majority vote, and
the ``posttrain eval`` runner (also callable from trainers: ``runner.evaluate``)."""
