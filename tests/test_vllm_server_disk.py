"""A weight sync to a rollout server that cannot write its file (a full disk) is one line that
names the directory and the intact checkpoints; the engine keeps its version. Needs no vLLM:
the server's HTTP client is replaced by a recorder."""

from __future__ import annotations

import errno

import pytest

from conftest import build_tiny_llama
from posttrain.rollout import vllm_server
from posttrain.rollout.vllm_server import RolloutServerError, ServerClient, VLLMServerEngine


def test_a_full_disk_during_a_weight_sync_is_one_line(tokenizer, tmp_path, monkeypatch):
    import torch

    calls = []
    client = ServerClient("http://127.0.0.1:9", 1.0, checkpoint_hint="; the run's checkpoints in runs/x are intact")
    monkeypatch.setattr(client, "request", lambda *args, **kwargs: calls.append(args))
    engine = VLLMServerEngine(client, tokenizer, tmp_path / "sync", dtype=torch.float32)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full_disk)
    policy = build_tiny_llama(tokenizer, hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                              intermediate_size=128)
    with pytest.raises(RolloutServerError) as caught:
        engine.update_weights(policy)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("rollout: writing the weights for the vLLM server to ")
    assert "(No space left on device); the run's checkpoints in runs/x are intact" in message
    assert engine.version == 0 and calls == []  # nothing asked of the server
    assert vllm_server.RolloutServerError.__mro__[1].__name__ == "UserError"  # the CLI prints it as one line
