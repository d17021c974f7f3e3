"""Write the RL arithmetic prompts in the shapes veRL and TRL users already have.

    python examples/data/make_interop_examples.py     # writes the two files beside this script

From the first 200 rows of ``rl_arithmetic_form_train.jsonl``:

- ``verl_arithmetic.parquet``: veRL's RL data shape (veRL docs, "Prepare Data for Post-Training":
  ``data_source``, ``prompt`` as chat messages, ``ability``, ``reward_model: {style,
  ground_truth}``, ``extra_info``). ``posttrain rl`` reads it as it is: the ``math`` reward
  checks ``reward_model.ground_truth`` (``configs/verl_parquet_grpo.yaml``).
- ``trl_arithmetic.jsonl``: TRL's conversational prompt-only shape (TRL docs, "Dataset
  formats") with the reference in a ``solution`` column, scored by a reward function written
  for TRL's GRPOTrainer (``examples/rewards/trl_style.py``, ``configs/trl_jsonl_grpo.yaml``).

Deterministic: the same source rows give the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROWS = 200


def main() -> None:
    from datasets import Dataset

    source = [json.loads(line) for line in (HERE / "rl_arithmetic_form_train.jsonl").read_text().splitlines()[:ROWS]]
    verl = [{"data_source": "arithmetic", "prompt": [{"role": "user", "content": row["prompt"]}], "ability": "math",
             "reward_model": {"style": "rule", "ground_truth": row["answer"]},
             "extra_info": {"split": "train", "index": index}} for index, row in enumerate(source)]
    Dataset.from_list(verl).to_parquet(str(HERE / "verl_arithmetic.parquet"))
    with open(HERE / "trl_arithmetic.jsonl", "w", encoding="utf-8") as handle:
        for row in source:
            handle.write(json.dumps({"prompt": [{"role": "user", "content": row["prompt"]}],
                                     "solution": row["answer"]}) + "\n")
    print(f"wrote {HERE / 'verl_arithmetic.parquet'} and {HERE / 'trl_arithmetic.jsonl'} ({len(source)} rows each)")


if __name__ == "__main__":
    main()
