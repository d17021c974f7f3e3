"""The vLLM server rollout source (``posttrain.rollout.vllm_server``): a vLLM server in its own
process, driven token in / token out, weights pushed after an update (full weights and a LoRA
adapter alone), shared by two trainer processes, and a dead server as a one-line error.

One server is started for the module through the engine (``VLLMServerEngine.start``) on a
tiny Llama (head_dim 64, a size vLLM's CPU attention supports), with LoRA enabled so the LoRA
test can use it too. Marked ``vllm`` and skipped when vLLM is not importable (``make test`` in
the main environment); ``make test-vllm`` runs them in ``.venv-vllm``.

Tolerances: the server runs float32 on CPU; its log-probs and the trainer's differ by < 1e-5
(measured); the tests allow 1e-4.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from conftest import build_tiny_llama

from posttrain.rollout.base import SamplingParams
from posttrain.rollout.vllm_server import RolloutServerError, VLLMServerEngine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-4
TINY = {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 256}


@pytest.fixture(scope="module")
def policy(tokenizer):
    return build_tiny_llama(tokenizer, **TINY)


@pytest.fixture(scope="module")
def engine(policy, tokenizer, tmp_path_factory):
    os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"  # the LoRA test loads adapters on this server
    root = tmp_path_factory.mktemp("vllm_server")
    engine = VLLMServerEngine.start(policy, tokenizer, sync_dir=root / "sync", log_dir=root, seed=0,
                                    max_model_len=256, kv_cache_gb=1,
                                    extra_args=("--enable-lora", "--max-lora-rank", "8"), start_timeout_s=300,
                                    timeout_s=60)
    yield engine
    engine.close()


def _prompt(tokenizer, text):
    return tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                   tokenize=False), add_special_tokens=False)["input_ids"]


def _trainer_logprobs(model, prompt, ids, temperature=1.0):
    """The trainer's log-probs of ``ids`` after ``prompt``: log_softmax(logits / T)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
    logp = torch.log_softmax(logits / temperature, -1)[len(prompt) - 1: -1]
    return logp.gather(-1, torch.tensor(ids)[:, None]).squeeze(-1)


def _server_logprobs(engine, prompt, ids):
    """The server's log-probs of a fixed continuation ``ids`` (prompt log-probs at T = 1),
    under the model name the engine currently samples with (base or LoRA adapter)."""
    body = {"token_ids": prompt + ids, "model": engine.model_name,
            "sampling_params": {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 0}}
    response = engine.client.request("POST", "/inference/v1/generate", body)
    entries = response["prompt_logprobs"][len(prompt):]
    return torch.tensor([entry[str(token)]["logprob"] for entry, token in zip(entries, ids)])


def _perturb(model, match, seed, scale):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in model.named_parameters():
            if match in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def test_sampled_ids_and_logprobs_match_a_trainer_forward(engine, policy, tokenizer):
    prompts = [_prompt(tokenizer, "What is 2 + 3?"), _prompt(tokenizer, "Name a colour.")]
    params = SamplingParams(n=3, temperature=0.7, max_new_tokens=8, seed=1, return_logprobs=True)
    completions = engine.generate(prompts, params)
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    worst = 0.0
    for completion in completions:
        ids = completion.token_ids
        assert 1 <= len(ids) <= 8 and len(completion.logprobs) == len(ids)
        assert completion.finish_reason == ("stop" if ids[-1] == tokenizer.eos_token_id else "length")
        assert completion.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert completion.weight_version == engine.version == 0
        expected = _trainer_logprobs(policy, prompts[completion.prompt_index], ids, temperature=0.7)
        worst = max(worst, (torch.tensor(completion.logprobs) - expected).abs().max().item())
    print(f"sampled log-probs at T=0.7, max |server - trainer|: {worst:.2e}")
    assert worst < TOLERANCE, worst
    assert len({tuple(c.token_ids) for c in completions}) == 6  # no two samples share a seed
    again = engine.generate(prompts, params)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # seeded: reproducible


def test_a_stop_string_ends_the_completion_on_the_exact_sampled_ids(engine, tokenizer):
    prompt = _prompt(tokenizer, "Write a sentence.")
    params = SamplingParams(n=1, temperature=1.0, max_new_tokens=12, seed=21)
    full = engine.generate([prompt], params)[0]
    # a stop string the same seeded sample meets at its 4th token (or earlier, inside a token before it)
    stop = tokenizer.decode(full.token_ids[3:4]).strip() or tokenizer.decode(full.token_ids[3:4])
    stopped = engine.generate([prompt], replace(params, stop=(stop,)))[0]
    assert stopped.finish_reason == "stop" and 1 <= len(stopped.token_ids) <= 4
    assert stopped.token_ids == full.token_ids[:len(stopped.token_ids)]  # the ids as sampled, none re-encoded
    assert stop in tokenizer.decode(stopped.token_ids) and stop not in tokenizer.decode(stopped.token_ids[:-1])


def test_full_weight_sync_matches_the_trainer(engine, policy, tokenizer):
    prompt = _prompt(tokenizer, "Count to three.")
    fixed = engine.generate([prompt], SamplingParams(n=1, temperature=1.0, max_new_tokens=10, seed=7))[0].token_ids
    before = _server_logprobs(engine, prompt, fixed)
    torch.testing.assert_close(before, _trainer_logprobs(policy, prompt, fixed), atol=TOLERANCE, rtol=0)
    _perturb(policy, "layers.1.", seed=5, scale=0.5)
    _perturb(policy, "embed_tokens", seed=6, scale=0.05)  # tied to lm_head: each sync's file holds lm_head.weight too
    version = engine.version
    engine.update_weights(policy)
    assert engine.version == version + 1
    after = _server_logprobs(engine, prompt, fixed)
    expected = _trainer_logprobs(policy, prompt, fixed)
    assert (expected - before).abs().max() > 100 * TOLERANCE  # the update moved these log-probs
    print(f"full sync, fixed continuation, max |server - trainer|: {(after - expected).abs().max():.2e}")
    torch.testing.assert_close(after, expected, atol=TOLERANCE, rtol=0)
    sampled = engine.generate([prompt], SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=3,
                                                       return_logprobs=True))
    for completion in sampled:
        assert completion.weight_version == engine.version
        torch.testing.assert_close(torch.tensor(completion.logprobs),
                                   _trainer_logprobs(policy, prompt, completion.token_ids, 0.8),
                                   atol=TOLERANCE, rtol=0)
    assert len(list((engine.sync_dir).glob("v*"))) == 1  # only the newest weights are kept


def test_lora_adapter_sync_matches_the_trainer(engine, policy, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(policy), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                            target_modules=["q_proj", "v_proj", "down_proj"]))
    lora_engine = VLLMServerEngine.connect(engine.client.url, lora, tokenizer, sync_dir=tmp_path / "sync")
    assert lora_engine.version == 0 and lora_engine.model_name == "policy-v0"
    prompt = _prompt(tokenizer, "Say hello.")
    fixed = lora_engine.generate([prompt], SamplingParams(n=1, temperature=1.0, max_new_tokens=10, seed=2))[0].token_ids
    before = _server_logprobs(lora_engine, prompt, fixed)
    torch.testing.assert_close(before, _trainer_logprobs(lora, prompt, fixed), atol=TOLERANCE, rtol=0)
    _perturb(lora, "lora_B", seed=9, scale=0.3)
    lora_engine.update_weights(lora)
    assert lora_engine.version == 1 and lora_engine.model_name == "policy-v1"
    assert sorted(path.name for path in (tmp_path / "sync").glob("adapter_v*")) == ["adapter_v1"]
    after = _server_logprobs(lora_engine, prompt, fixed)
    expected = _trainer_logprobs(lora, prompt, fixed)
    assert (expected - before).abs().max() > 100 * TOLERANCE  # the adapter moved these log-probs
    print(f"LoRA sync, fixed continuation, max |server - trainer|: {(after - expected).abs().max():.2e}")
    torch.testing.assert_close(after, expected, atol=TOLERANCE, rtol=0)
    sampled = lora_engine.generate([prompt], SamplingParams(n=2, temperature=1.0, max_new_tokens=8, seed=4,
                                                            return_logprobs=True))
    for completion in sampled:
        assert completion.weight_version == 1
        torch.testing.assert_close(torch.tensor(completion.logprobs),
                                   _trainer_logprobs(lora, prompt, completion.token_ids), atol=TOLERANCE, rtol=0)
    models = engine.client.request("GET", "/v1/models")
    assert {entry["id"] for entry in models["data"]} == {"policy", "policy-v1"}  # the old adapter unloaded
    lora_engine.close()


def _metric(engine, name: str) -> float:
    """One of the server's Prometheus metrics (``vllm:generation_tokens_total``...), summed over its labels."""
    text = engine.client.request("GET", "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def test_a_sync_during_generation_freezes_requests_and_reports_the_oldest_version(engine, policy, tokenizer):
    """Requests in flight during a sync pause, go on with the new weights, and their tokens are
    tagged with both versions by the server; the completion carries the oldest."""
    prompt = _prompt(tokenizer, "Tell a long story.")
    version = engine.version
    bodies = [engine._request_body(prompt, SamplingParams(n=1, temperature=1.0, max_new_tokens=200, seed=seed), 0,
                                   engine.model_name) for seed in range(4)]
    with ThreadPoolExecutor(len(bodies) + 1) as pool:
        ours = pool.submit(engine.generate, [prompt] * 4, SamplingParams(n=1, temperature=1.0, max_new_tokens=200,
                                                                       seed=9, return_logprobs=True))
        raw = [pool.submit(engine.client.request, "POST", "/inference/v1/generate", body) for body in bodies]
        # a busy CPU can take seconds to schedule them: wait until all 8 run and have made tokens, not for a time
        started, deadline = _metric(engine, "vllm:generation_tokens_total"), time.monotonic() + 60
        while time.monotonic() < deadline and (_metric(engine, "vllm:num_requests_running") < 2 * len(bodies)
                                               or _metric(engine, "vllm:generation_tokens_total") <= started):
            time.sleep(0.02)
        # freeze them mid-flight now: writing the weights takes longer than the rest of the
        # generation on a busy CPU; the sync's own pause then finds them frozen, as a long rollout would be
        engine.client.request("POST", "/pause?mode=keep")
        engine.update_weights(policy)
        spans = [future.result()["choices"][0]["weight_versions"] for future in raw]
        completions = ours.result()
    assert any([span["version"] for span in spans_of] == [str(version), str(version + 1)] for spans_of in spans), spans
    assert [c.weight_version for c in completions] == [version] * 4


TWO_RANKS = r"""
import json, os, sys
import torch
import torch.distributed as dist
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
from conftest import build_tiny_llama
from posttrain.models import load_tokenizer
from posttrain.rollout.base import SamplingParams
from posttrain.rollout.vllm_server import VLLMServerEngine

dist.init_process_group("gloo")
rank = dist.get_rank()
tokenizer = load_tokenizer()
policy = build_tiny_llama(tokenizer, **json.loads(os.environ["TINY"]))
engine = VLLMServerEngine.connect(os.environ["URL"], policy, tokenizer, sync_dir=os.environ["SYNC"])
prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": f"Rank {rank} asks."}],
                   add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
params = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=rank, return_logprobs=True)

def gaps(completions):
    out = []
    for c in completions:
        with torch.no_grad():
            logits = policy(input_ids=torch.tensor([prompt + c.token_ids])).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(-1, torch.tensor(c.token_ids)[:, None])
        out.append((torch.tensor(c.logprobs) - expected.squeeze(-1)).abs().max().item())
    return out

first = engine.generate([prompt], params)
result = {"rank": rank, "before": [c.weight_version for c in first], "gap_before": max(gaps(first))}
dist.barrier()  # as the RL loop's gradient all-reduce does: no rank still generates when rank 0 reloads
with torch.no_grad():
    generator = torch.Generator().manual_seed(11)
    for name, parameter in policy.named_parameters():
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
engine.update_weights(policy)
second = engine.generate([prompt], params)
result.update(after=[c.weight_version for c in second], version=engine.version, gap_after=max(gaps(second)),
              files=sorted(os.listdir(os.environ["SYNC"])))
print("RESULT " + json.dumps(result), flush=True)
dist.destroy_process_group()
"""


def test_two_trainer_processes_share_one_server(engine, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(TWO_RANKS)
    env = {**os.environ, "REPO": str(REPO), "PYTHONPATH": str(REPO), "URL": engine.client.url,
           "SYNC": str(tmp_path / "sync"), "TINY": json.dumps(TINY), "OMP_NUM_THREADS": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2", "HF_HUB_OFFLINE": "1"}
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = []
    for process in ranks:
        out, err = process.communicate(timeout=240)
        assert process.returncode == 0, err[-3000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    for result in results:
        assert result["before"] == [0, 0] and result["after"] == [1, 1] and result["version"] == 1
        assert result["gap_before"] < TOLERANCE and result["gap_after"] < TOLERANCE
        assert result["files"] == ["v1"]  # written once, by rank 0


def _free_port():
    from posttrain.rollout.vllm_server import free_port

    return free_port()


def test_a_server_that_exits_while_starting_is_one_line(policy, tokenizer, tmp_path):
    with pytest.raises(RolloutServerError) as caught:
        VLLMServerEngine.start(policy, tokenizer, sync_dir=tmp_path / "sync", log_dir=tmp_path, max_model_len=256,
                               extra_args=("--no-such-flag",), start_timeout_s=120)
    message = str(caught.value)
    assert "\n" not in message and "exited while starting" in message and "--no-such-flag" in message, message


def test_an_unreachable_server_url_is_one_line(policy, tokenizer, tmp_path):
    with pytest.raises(RolloutServerError) as caught:
        VLLMServerEngine.connect(f"http://127.0.0.1:{_free_port()}", policy, tokenizer, sync_dir=tmp_path)
    assert "\n" not in str(caught.value) and "no vLLM server answers" in str(caught.value)


def test_a_killed_server_is_one_line_error(engine, policy, tokenizer):
    """Last: it kills the module's server."""
    prompt = _prompt(tokenizer, "Still there?")
    engine.generate([prompt], SamplingParams(n=1, max_new_tokens=2))
    os.killpg(engine.process.process.pid, signal.SIGKILL)
    engine.process.process.wait(30)
    with pytest.raises(RolloutServerError) as caught:
        engine.generate([prompt, prompt], SamplingParams(n=2, max_new_tokens=4))
    message = str(caught.value)
    assert "\n" not in message and "stopped answering" in message and engine.client.url in message, message
    with pytest.raises(RolloutServerError, match="stopped answering"):
        engine.update_weights(policy)
