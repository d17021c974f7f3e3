"""Two CPU processes (torchrun, gloo, FSDP2) give the same losses and weights as one process
on the same global batch; single-process helpers behave as identities."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch
from distributed_harness import run_worker, small_vocab_model_dir

from posttrain.train.distributed import (
    DistInfo,
    all_gather_objects,
    all_reduce_sum,
    broadcast_object,
    init_distributed,
    shard_model,
)

WORKER = textwrap.dedent("""
    import json, os, sys
    from types import SimpleNamespace
    import torch
    torch.set_num_threads(1)
    from posttrain.config import SFTConfig, validate_config
    from posttrain.train.sft import run_sft

    model_dir, out = sys.argv[1], sys.argv[2]
    g = torch.Generator().manual_seed(0)
    def sample(n):
        return SimpleNamespace(input_ids=torch.randint(1, 300, (n,), generator=g).tolist(),
                               loss_mask=[0] * 3 + [1] * (n - 3), weights=None)
    # 11 samples, batch 6: the second step has 5 samples, so one rank gets fewer micro-batches
    train = [sample(int(n)) for n in torch.randint(5, 40, (11,), generator=g)]
    val = [sample(17) for _ in range(3)]
    config = validate_config(SFTConfig, {
        "model": {"name": model_dir}, "data": {"train": "unused.jsonl", "max_length": 64},
        "run": {"output_dir": out, "name": "run", "progress": False, "tensorboard": False},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"global_batch_size": 6, "micro_batch_tokens": 64, "max_steps": 3, "eval_every": 3,
                  "save_every": 3, "loss_agg_mode": os.environ.get("AGG", "token-mean")},
    })
    if os.environ.get("LORA"):
        config.lora.enabled = True
        config.lora.r = 4
        config.lora.target_modules = ["q_proj", "v_proj", "down_proj"]
    result = run_sft(config, samples=(train, val))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result.history))
""")


def run_sft_worker(tmp_path: Path, model_dir: Path, nproc: int, agg: str, lora: bool = False) -> tuple[list[dict], Path]:
    return run_worker(WORKER, tmp_path, model_dir, nproc, name=f"out{nproc}{'-lora' if lora else ''}",
                      env={"AGG": agg, "LORA": "1" if lora else ""})


@pytest.mark.parametrize("agg", ["token-mean", pytest.param("seq-mean-token-mean", marks=pytest.mark.slow)])
def test_two_processes_match_one_process(tmp_path, tokenizer, agg):
    from safetensors.torch import load_file

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    one, run_one = run_sft_worker(tmp_path, model_dir, 1, agg)
    two, run_two = run_sft_worker(tmp_path, model_dir, 2, agg)
    assert [h["step"] for h in one] == [h["step"] for h in two] == [0, 1, 2, 3]
    assert two[0]["val/loss"] == pytest.approx(one[0]["val/loss"], rel=1e-5)  # before training
    one, two = one[1:], two[1:]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens_per_step"] == a["tokens_per_step"]
    assert two[-1]["val/loss"] == pytest.approx(one[-1]["val/loss"], rel=1e-5)
    w1 = load_file(str(run_one / "final" / "model.safetensors"))
    w2 = load_file(str(run_two / "final" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)
    # rank 0 wrote a gathered (full-shape) checkpoint
    saved = torch.load(run_two / "checkpoints" / "step_3" / "model.pt", weights_only=False)
    assert saved["model.embed_tokens.weight"].shape == (320, 64)


@pytest.mark.slow
def test_two_processes_match_one_process_with_lora(tmp_path, tokenizer):
    from safetensors.torch import load_file

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    one, run_one = run_sft_worker(tmp_path, model_dir, 1, "token-mean", lora=True)
    two, run_two = run_sft_worker(tmp_path, model_dir, 2, "token-mean", lora=True)
    for a, b in zip(one[1:], two[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    w1 = load_file(str(run_one / "final" / "model.safetensors"))
    w2 = load_file(str(run_two / "final" / "model.safetensors"))
    assert not any("lora" in name for name in w2)  # merged on export, also under FSDP
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5, msg=name)


def test_single_process_helpers_are_identities():
    info = init_distributed(device="cpu")
    assert info == DistInfo(0, 1, 0, torch.device("cpu"), None) and info.is_main and not info.distributed
    assert all_reduce_sum([1.5, 2.0], info) == [1.5, 2.0]
    assert all_gather_objects({"a": 1}, info) == [{"a": 1}]
    assert broadcast_object("x", info) == "x"
    module = torch.nn.Linear(2, 2)
    assert shard_model(module, info) is module
