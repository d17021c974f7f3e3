"""The GPU path, on a GPU: one SFT, reward-model and RL step in bf16; split invariance
(1x8 = 8x1 = packed) and chunked loss = plain logits within bf16 tolerance; LoRA; FSDP2 in
one process under torchrun (nccl); save, kill -9, resume; RL with the HF engine and the
shared-prompt layout; the code sandbox reward called from a process that holds a CUDA
context; ``posttrain_flex`` (compiled FlexAttention) against ``posttrain_varlen``.

Every test here is marked ``cuda`` and skipped without a GPU. ``benchmarks/gpu/check.sh``
runs them on one; its CPU dry run sets ``POSTTRAIN_CUDA_TESTS_ON_CPU=1``, which runs the same
tests on the CPU (trainers then pick the CPU and gloo by themselves, ``train.distributed``),
so the test code itself is exercised before any GPU time is spent. The CPU versions of these
checks, at tighter fp32/fp64 tolerances, are in test_sft, test_rm, test_rl, test_loop,
test_rl_shared_prompt, test_checkpoint, test_distributed and test_attention_flex.

The tokenizer comes from ``benchmarks/gpu/models/smollm2-135m`` (the SmolLM2 tokenizer files,
kept in the repository), not the bundled GGUF, which a bare GPU machine does not have.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama

from posttrain.data.batching import collate_packed, collate_padded
from posttrain.models.attention_flex import FLEX_ATTENTION, register_flex_attention
from posttrain.models.attention import VARLEN_ATTENTION
from posttrain.models.prepare import prepare_for_training
from posttrain.train.loop import sft_micro_batch_loss

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO / "benchmarks" / "gpu" / "models" / "smollm2-135m"


def _device() -> torch.device | None:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("POSTTRAIN_CUDA_TESTS_ON_CPU") == "1":
        return torch.device("cpu")
    return None


DEVICE = _device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE is None, reason="needs a CUDA GPU (POSTTRAIN_CUDA_TESTS_ON_CPU=1: run on the CPU)"),
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile"),
]
# Trainer runs with FlexAttention need CUDA (torch has no CPU backward for it).
ATTENTIONS = [None, pytest.param(FLEX_ATTENTION, marks=pytest.mark.skipif(not ON_CUDA, reason="flex trains on CUDA"))]


@pytest.fixture(scope="session")
def tokenizer():
    """Overrides conftest's: the tokenizer files kept in the repository (no GGUF needed)."""
    from posttrain.models import load_tokenizer

    return load_tokenizer(str(TOKENIZER_DIR))


@pytest.fixture
def flex_cpu_backward(monkeypatch):
    """On the CPU dry run, let eager flex_attention differentiate (see test_attention_flex)."""
    if not ON_CUDA:
        import torch.nn.attention.flex_attention as flex_module

        monkeypatch.setattr(flex_module, "_validate_device", lambda *tensors: None)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def finite_history(history: list[dict], key: str = "loss") -> list[float]:
    values = [h[key] for h in history if key in h]
    assert values and all(math.isfinite(v) for v in values), values
    return values


def used_the_device() -> None:
    if ON_CUDA:
        assert torch.cuda.max_memory_allocated() > 0


# ----------------------------------------------------------------------------- one step each


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_sft_steps_in_bf16(tiny_model_dir, tmp_path, attention):
    from test_sft import config_for

    from posttrain.train.sft import run_sft

    config = config_for(tiny_model_dir, tmp_path, precision="bf16", max_steps=2, eval_every=2)
    config.model.attn_implementation = attention
    result = run_sft(config)
    losses = finite_history(result.history)
    assert len(losses) == 2 and finite_history(result.history, "val/loss")
    assert (result.final_dir / "model.safetensors").is_file()
    used_the_device()


def test_reward_model_steps_in_bf16(tiny_model_dir, tmp_path):
    from test_rm import arithmetic_rows, config_for, write_rows

    from posttrain.train.rm import run_rm

    train = write_rows(tmp_path / "train.jsonl", arithmetic_rows(32))
    config = config_for(tmp_path, tiny_model_dir, train, train={"max_steps": 2, "precision": "bf16"})
    result = run_rm(config)
    assert len(finite_history(result.history)) == 2
    used_the_device()


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_rl_steps_with_the_hf_engine_and_shared_prompt(tiny_model_dir, tmp_path, attention):
    from test_rl import make_config, vowel_reward

    from posttrain.train.rl import run_rl

    config = make_config(tiny_model_dir, tmp_path, rl={"share_prompt": True}, train={"precision": "bf16"},
                         model={"attn_implementation": attention})
    assert config.rollout.engine == "hf"
    result = run_rl(config, reward_fn=vowel_reward)
    assert len(finite_history(result.history)) == 2
    assert all(h["grad_norm"] > 0 for h in result.history)
    used_the_device()


# ----------------------------------------------------------------------------- invariances


def use_attention(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    prepare_for_training(model, attn_implementation=VARLEN_ATTENTION if attention == FLEX_ATTENTION else attention,
                         gradient_checkpointing=False)
    if attention == FLEX_ATTENTION:  # set directly: prepare_for_training refuses it on a CPU
        model.config._attn_implementation = register_flex_attention()
    return model


def gradients(model, batches, tokens, sequences) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    total = 0.0
    for batch in batches:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = sft_micro_batch_loss(model, batch.to(DEVICE), loss_agg_mode="token-mean",
                                        step_trained_tokens=tokens, step_sequences=sequences, chunk_size=5).loss
        loss.backward()
        total += float(loss.detach())
    return total, torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_split_invariance_in_bf16_and_flex_equals_varlen(tokenizer, flex_cpu_backward):
    from test_loop import make_samples, step_counts

    samples = make_samples(8, seed=2)
    tokens, sequences = step_counts(samples)
    model = build_tiny_llama(tokenizer, vocab_size=512).to(DEVICE)
    use_attention(model, "sdpa")
    one_by_eight = gradients(model, [collate_padded(samples, 0)], tokens, sequences)
    eight_by_one = gradients(model, [collate_padded([s], 0) for s in samples], tokens, sequences)
    results = {"8x1": eight_by_one}
    for attention in (VARLEN_ATTENTION, FLEX_ATTENTION):
        use_attention(model, attention)
        results[f"packed/{attention}"] = gradients(model, [collate_packed(samples)], tokens, sequences)
        results[f"packed 3 micro-batches/{attention}"] = gradients(
            model, [collate_packed(samples[:3]), collate_packed(samples[3:5]), collate_packed(samples[5:])],
            tokens, sequences)
    for name, (loss, grads) in results.items():
        assert loss == pytest.approx(one_by_eight[0], rel=1e-2), name
        assert relative_error(grads, one_by_eight[1]) < 2e-2, name


def test_chunked_loss_equals_plain_logits_in_bf16(tokenizer):
    import torch.nn.functional as F
    from test_loop import make_samples, step_counts

    samples = make_samples(3, seed=1)
    for s in samples:
        s.weights = None
    batch = collate_padded(samples, pad_token_id=0).to(DEVICE)
    tokens, sequences = step_counts(samples)
    model = use_attention(build_tiny_llama(tokenizer, vocab_size=512).to(DEVICE), "sdpa")
    chunked, chunked_grads = gradients(model, [batch], tokens, sequences)
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    targets = batch.input_ids[:, 1:].clone()
    targets[batch.loss_mask[:, 1:] == 0] = -100
    plain = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=-100, reduction="sum") / tokens
    plain.backward()
    plain_grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert chunked == pytest.approx(plain.item(), rel=1e-2)
    assert relative_error(chunked_grads, plain_grads) < 2e-2


def test_shared_prompt_layout_equals_plain_packing_in_bf16(tokenizer, flex_cpu_backward):
    from test_rl_shared_prompt import make_groups

    from posttrain.models.logprobs import response_token_logprobs
    from posttrain.train.rl_layout import pack_micro_batches
    from rl_fixtures import layout

    samples = [s for g in make_groups() for s in g]
    results = {}
    for share, attention in ((False, VARLEN_ATTENTION), (True, VARLEN_ATTENTION), (True, FLEX_ATTENTION)):
        model = use_attention(build_tiny_llama(tokenizer).to(DEVICE), attention)
        [(chunk, batch)] = pack_micro_batches(samples, layout(4096, share))
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            tokens = response_token_logprobs(model, batch.to(DEVICE), temperature=0.7, chunk_size=3,
                                              with_entropy=False)
        tokens.logp.sum().backward()
        by_sample = dict(zip(map(id, chunk), tokens.logp.detach().split([len(s.response_ids) for s in chunk])))
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
        results[(share, attention)] = (torch.cat([by_sample[id(s)] for s in samples]), grads)
    reference_logp, reference_grads = results[(False, VARLEN_ATTENTION)]
    for key, (logp, grads) in results.items():
        torch.testing.assert_close(logp.float(), reference_logp.float(), rtol=2e-2, atol=2e-2, msg=str(key))
        assert relative_error(grads, reference_grads) < 2e-2, key


# ----------------------------------------------------------------------------- LoRA, FSDP2, resume


def test_lora_trains_only_the_adapters_in_bf16(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from test_sft import config_for

    from posttrain.train.sft import run_sft

    config = config_for(tiny_model_dir, tmp_path, precision="bf16", max_steps=2, eval_every=None)
    config.lora.enabled, config.lora.r = True, 4
    config.lora.target_modules = ["q_proj", "v_proj"]
    result = run_sft(config)
    finite_history(result.history)
    base, merged = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(str(result.final_dir / "model.safetensors"))
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed and all("q_proj" in n or "v_proj" in n for n in changed), sorted(changed)
    used_the_device()


SFT_WORKER = textwrap.dedent("""
    import json, os, signal, sys
    from types import SimpleNamespace
    import torch
    import posttrain.train.sft as sft_module
    import posttrain.train.steps as steps_module
    from posttrain.config import SFTConfig, validate_config

    model_dir, out = sys.argv[1], sys.argv[2]
    seen = {}
    real_init, real_shard, real_save = sft_module.init_distributed, steps_module.shard_model, sft_module.ckpt.save_checkpoint
    def init(*a, **k):
        info = real_init(*a, **k)
        seen.update(backend=info.backend, device=info.device.type, world_size=info.world_size)
        return info
    def shard(model, info):
        model = real_shard(model, info)
        seen["model_class"] = type(model).__name__
        return model
    def save_then_die(*a, **k):
        real_save(*a, **k)
        os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no exception handler: a real kill
    sft_module.init_distributed, steps_module.shard_model = init, shard
    if os.environ.get("KILL_AFTER_SAVE"):
        sft_module.ckpt.save_checkpoint = save_then_die
    g = torch.Generator().manual_seed(0)
    def sample(n):
        return SimpleNamespace(input_ids=torch.randint(1, 300, (n,), generator=g).tolist(),
                               loss_mask=[0] * 3 + [1] * (n - 3), weights=None)
    train = [sample(int(n)) for n in torch.randint(5, 40, (12,), generator=g)]
    config = validate_config(SFTConfig, {
        "model": {"name": model_dir}, "data": {"train": "unused.jsonl", "max_length": 64},
        "run": {"output_dir": out, "name": "run", "progress": False, "tensorboard": False},
        "optim": {"lr": 2e-3, "warmup_steps": 1},
        "train": {"global_batch_size": 4, "micro_batch_tokens": 64, "max_steps": 4, "save_every": 2,
                  "precision": "bf16", "resume": os.environ.get("RESUME") or None, "seed": 0},
    })
    result = sft_module.run_sft(config, samples=(train, []))
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps({"history": result.history, **seen}))
""")


def run_python(tmp_path: Path, model_dir, out: str, *, torchrun: bool = False, env: dict | None = None):
    """Run SFT_WORKER in a fresh process (optionally under torchrun, one process)."""
    script = tmp_path / "sft_worker.py"
    script.write_text(SFT_WORKER)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"] if torchrun
                else [sys.executable])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]),
                   "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([*launcher, str(script), str(model_dir), str(tmp_path / out)], env=environment,
                          capture_output=True, text=True, timeout=600, check=False)
    result = None
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    return done, result


def final_weights(tmp_path: Path, out: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(tmp_path / out / "run" / "final" / "model.safetensors"))


def test_fsdp2_one_process_under_torchrun_matches_plain(tmp_path, tokenizer):
    from distributed_harness import small_vocab_model_dir

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    plain_run, plain = run_python(tmp_path, model_dir, "plain")
    fsdp_run, fsdp = run_python(tmp_path, model_dir, "fsdp", torchrun=True)
    assert plain_run.returncode == 0, plain_run.stderr[-3000:]
    assert fsdp_run.returncode == 0, fsdp_run.stderr[-3000:]
    assert plain["backend"] is None and fsdp["world_size"] == 1
    assert fsdp["backend"] == ("nccl" if ON_CUDA else "gloo") and fsdp["device"] == DEVICE.type
    assert fsdp["model_class"].startswith("FSDP"), fsdp["model_class"]  # fully_shard swapped the class
    for a, b in zip(plain["history"], fsdp["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-2)
    a, b = final_weights(tmp_path, "plain"), final_weights(tmp_path, "fsdp")
    assert a.keys() == b.keys()
    for name in a:
        assert relative_error(b[name], a[name]) < 1e-2, name


def test_save_kill_resume_matches_the_straight_run(tmp_path, tokenizer):
    from distributed_harness import small_vocab_model_dir

    model_dir = small_vocab_model_dir(tmp_path, tokenizer)
    straight_run, straight = run_python(tmp_path, model_dir, "straight")
    assert straight_run.returncode == 0, straight_run.stderr[-3000:]
    killed, _ = run_python(tmp_path, model_dir, "resumed", env={"KILL_AFTER_SAVE": "1"})
    assert killed.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "resumed" / "run" / "checkpoints").iterdir())
    assert checkpoints == ["step_2"], checkpoints
    resumed_run, resumed = run_python(tmp_path, model_dir, "resumed", env={"RESUME": "latest"})
    assert resumed_run.returncode == 0, resumed_run.stderr[-3000:]
    assert [h["step"] for h in resumed["history"]] == [3, 4]
    by_step = {h["step"]: h for h in straight["history"]}
    for line in resumed["history"]:  # same data, same RNG; kernels may still differ in summation order
        assert line["loss"] == pytest.approx(by_step[line["step"]]["loss"], rel=1e-3)
        assert line["lr"] == by_step[line["step"]]["lr"]
    a, b = final_weights(tmp_path, "straight"), final_weights(tmp_path, "resumed")
    for name in a:
        assert relative_error(b[name], a[name]) < 1e-3, name


# ----------------------------------------------------------------------------- the sandbox


def test_code_reward_from_a_cuda_trainer(tiny_model_dir, tmp_path):
    from test_rl import make_config

    from posttrain.rewards.code import CodeReward
    from posttrain.train.rl import run_rl

    torch.zeros(1, device=DEVICE)  # this process now holds a CUDA context; the sandbox must still work
    reward = CodeReward(wall_seconds=5, cpu_seconds=5, memory_mb=512, max_workers=2)
    tests = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
    out = reward(["p"] * 3, ["def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
                             "import os\nos._exit(0)"], [{"tests": tests}] * 3)
    assert out.scores == [1.0, 0.0, 0.0]
    prompts = tmp_path / "code_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Write add(a, b) returning a + b. ({k})", "tests": tests}) + "\n"
                               for k in range(4)))
    config = make_config(tiny_model_dir, tmp_path, data={"train": str(prompts), "limit": 4}, reward="code",
                         train={"precision": "bf16", "max_steps": 1})
    result = run_rl(config)
    assert [h["reward/mean"] for h in result.history] == [0.0]  # a random model writes no passing add()
    used_the_device()
