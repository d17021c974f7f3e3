"""The model loader: alias, local HF directory, .gguf, hub id; one-line errors."""

import pytest

from posttrain.errors import ModelLoadError
from posttrain.models import DEFAULT_MODEL, load_model, load_tokenizer, resolve_model_dir


def test_default_alias_resolves_to_converted_cache_dir():
    path = resolve_model_dir(DEFAULT_MODEL)
    assert path.endswith(tuple(f"{DEFAULT_MODEL}-{c}" for c in "0123456789abcdef") ) or DEFAULT_MODEL in path
    import os

    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    assert os.path.isfile(os.path.join(path, "tokenizer.json"))


def test_default_tokenizer_has_real_chat_template(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tokenizer.pad_token is not None


def test_local_directory_loads(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir)
    assert model.config.num_hidden_layers == 2
    assert len(load_tokenizer(tiny_model_dir)) == len(tokenizer)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("/no/such/dir", "/no/such/dir not found"),
        ("./missing-model", "missing-model not found"),
        ("/no/such/file.gguf", "does not exist"),
    ],
)
def test_missing_local_specs_fail_in_one_line(spec, fragment):
    with pytest.raises(ModelLoadError) as info:
        load_model(spec)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_dir(str(tmp_path))


def test_unreachable_hub_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model-that-is-not-cached")
    message = str(info.value)
    assert "hub" in message and "some-org/some-model-that-is-not-cached" in message and "\n" not in message


def test_chat_template_file_replaces_template(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    tok = load_tokenizer(DEFAULT_MODEL, chat_template=template)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == "[user] x\n"
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(DEFAULT_MODEL, chat_template=tmp_path / "nope.jinja")


def test_gguf_cache_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    """The same GGUF bytes under another path or name (a symlinked venv, a copy) reuse one
    conversion; different bytes at the same path get their own."""
    from posttrain.models import loading as models

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    conversions = []

    def fake_convert(gguf_path, out_dir):
        conversions.append(gguf_path)
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(models, "convert_gguf", fake_convert)
    original = tmp_path / "venv-a" / "model.gguf"
    original.parent.mkdir()
    original.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    (tmp_path / "venv-b").symlink_to(tmp_path / "venv-a")
    copy = tmp_path / "elsewhere" / "renamed.gguf"
    copy.parent.mkdir()
    copy.write_bytes(original.read_bytes())

    first = resolve_model_dir(str(original))
    assert resolve_model_dir(str(tmp_path / "venv-b" / "model.gguf")) == first
    assert resolve_model_dir(str(copy)) == first
    assert len(conversions) == 1
    original.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 65)  # new content, same path
    assert resolve_model_dir(str(original)) != first and len(conversions) == 2


def test_generation_loads_fp32_on_a_cpu_that_would_emulate_bf16(monkeypatch):
    """The bundled GGUF converts to a bf16 checkpoint; on an AVX2-only CPU, generating in
    emulated bf16 took 759 s where fp32 took 20 s for the same eval."""
    import torch

    from posttrain.models import bf16_is_native, inference_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    # oneDNN calls bf16 supported on AVX512 without BF16 (emulated there: matmuls ran at half
    # fp32's rate on this project's AVX512 VM): its probe must not decide
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert not bf16_is_native("cpu") and inference_dtype("cpu") == torch.float32
    assert inference_dtype(None) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert bf16_is_native("cpu") and inference_dtype("cpu") is None  # keep the checkpoint's dtype
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert bf16_is_native("cpu")
    assert inference_dtype("cuda") is None
