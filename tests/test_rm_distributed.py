"""Two CPU processes (torchrun, gloo, FSDP2) train the reward model exactly as one process
on the same global batch: same step losses, accuracies, gradient norms, held-out metrics and
final weights."""

from __future__ import annotations

import textwrap

import pytest
import torch
from distributed_harness import run_worker, small_vocab_model_dir

WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from posttrain.config import RMConfig, validate_config
    from posttrain.data.preference import PreferencePair
    from posttrain.data.scored_sequence import ScoredSequence
    from posttrain.train.rm import run_rm

    model_dir, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    def side(n):
        ids = torch.randint(3, 300, (n,), generator=g).tolist()
        return ScoredSequence(input_ids=ids, loss_mask=[0] * 3 + [1] * (n - 3))
    def pair(k):
        a, b = (int(x) for x in torch.randint(6, 30, (2,), generator=g))
        return PreferencePair(side(a), side(b), margin=0.1 * (k % 3), group="ab"[k % 2], line=k)
    # 11 pairs, 6 per step: the second step has 5, so one rank runs a filler micro-batch
    train = [pair(k) for k in range(11)]
    val = [pair(k) for k in range(5)]
    config = validate_config(RMConfig, {
        "model": {"name": model_dir}, "data": {"train": "unused.jsonl", "max_length": 64},
        "run": {"output_dir": out, "name": "run", "progress": False, "tensorboard": False},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"global_batch_size": 6, "micro_batch_tokens": 64, "max_steps": 3, "eval_every": 3},
        "rm": {"center_rewards_coef": 0.01, "group_key": "kind"},
    })
    result = run_rm(config, pairs=(train, val))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result.history))
""")


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    one, run_one = run_worker(WORKER, tmp_path, model_dir, 1, timeout=900)
    two, run_two = run_worker(WORKER, tmp_path, model_dir, 2, timeout=900)
    assert [h["step"] for h in one] == [h["step"] for h in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "accuracy", "margin", "reward/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert a["pairs_per_step"] == b["pairs_per_step"]
    assert [h["pairs_per_step"] for h in one] == [6, 5, 6]
    for key in ("val/loss", "val/accuracy", "val/margin", "val/pairs"):
        assert two[-1][key] == pytest.approx(one[-1][key], rel=1e-4, abs=1e-6), key
    weights_one = load_file(run_one / "final" / "model.safetensors")
    weights_two = load_file(run_two / "final" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], atol=2e-5, rtol=1e-4)
