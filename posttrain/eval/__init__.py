"""Evaluation: prompt rows (``prompts``), the one held-out evaluation of generation that
``posttrain eval`` and RL's in-loop evaluation both call (``generate.evaluate_rows``), tasks
(HumanEval, reasoning-gym, JSONL, perplexity), pass@k, majority vote, and the ``posttrain eval``
runner (``runner.run_eval``; ``runner.evaluate`` for a model already in memory)."""
