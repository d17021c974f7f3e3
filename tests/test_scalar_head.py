"""Scalar-head model (reward model / critic): loading, per-token values in every layout,
rendering up to the score token, and the HF-format round trip."""

from __future__ import annotations

import pytest
import torch

from posttrain.data.batching import collate
from posttrain.data.scored_sequence import ScoredSequence, render_for_scoring, score_index
from posttrain.errors import DataError, ModelLoadError
from posttrain.models.scalar_head import (
    export_pad_token_id,
    export_tokenizer,
    gather_scores,
    load_scalar_head_model,
    score_layer,
    score_positions,
    score_sequences,
    token_values,
)
from posttrain.models.attention import choose_attention
from posttrain.models.prepare import prepare_for_training

USER = [{"role": "user", "content": "What is 2 + 3?"}]


def reply(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def test_fresh_head_keeps_backbone_and_is_seeded(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    causal = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = load_scalar_head_model(tiny_model_dir, seed=3)
    again = load_scalar_head_model(tiny_model_dir, seed=3)
    other = load_scalar_head_model(tiny_model_dir, seed=4)
    backbone = dict(model.model.named_parameters())
    for name, value in causal.model.named_parameters():
        assert torch.equal(backbone[name], value), name
    head = score_layer(model).weight
    assert head.shape == (1, causal.config.hidden_size)
    assert torch.equal(head, score_layer(again).weight)
    assert not torch.equal(head, score_layer(other).weight)
    assert 0.005 < head.std().item() < 0.05  # N(0, 0.02^2)


def test_missing_model_is_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist|not found"):
        load_scalar_head_model(str(tmp_path / "nope"))


def test_score_index_is_last_trained_token():
    assert score_index([0, 1, 1, 0]) == 2
    with pytest.raises(ValueError):
        score_index([0, 0])


def test_render_for_scoring_ends_at_end_of_turn(tokenizer):
    from posttrain.data.render import render_prompt

    sequence = render_for_scoring(USER, reply("2 + 3 = 5."), tokenizer)
    assert sequence.input_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt_ids = render_prompt(USER, tokenizer)
    assert sequence.input_ids[: len(prompt_ids)] == prompt_ids
    assert sum(sequence.loss_mask[: len(prompt_ids)]) == 0
    assert all(sequence.loss_mask[len(prompt_ids):])
    assert tokenizer.decode(sequence.input_ids[len(prompt_ids):]) == "2 + 3 = 5.<|im_end|>"
    assert sequence.score_index == len(sequence.input_ids) - 1


def test_render_for_scoring_refuses_a_response_without_assistant(tokenizer):
    with pytest.raises(DataError, match="line 7: a scored response must end with an assistant message"):
        render_for_scoring(USER, [{"role": "user", "content": "x"}], tokenizer, line=7)


def _varlen_model(path, seed=0):
    model = load_scalar_head_model(path, seed=seed)
    prepare_for_training(model, attn_implementation=choose_attention(True, None), gradient_checkpointing=False)
    return model.eval()


def test_values_packed_equal_padded_equal_alone(tiny_model_dir, tokenizer):
    model = _varlen_model(tiny_model_dir)
    sequences = [render_for_scoring(USER, reply(text), tokenizer) for text in ("5", "2 + 3 = 5. The answer is 5.", "six")]
    pad = tokenizer.pad_token_id
    alone = []
    with torch.no_grad():
        for s in sequences:
            batch = collate([s], packing=False, pad_token_id=pad)
            alone.append(token_values(model, batch)[0])
        packed_batch = collate(sequences, packing=True, pad_token_id=pad)
        packed = token_values(model, packed_batch)
        padded_batch = collate(sequences, packing=False, pad_token_id=pad)
        padded = token_values(model, padded_batch)
    assert packed.shape == (1, sum(len(s.input_ids) for s in sequences))
    start = 0
    for k, s in enumerate(sequences):
        n = len(s.input_ids)
        torch.testing.assert_close(packed[0, start:start + n], alone[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(padded[k, :n], alone[k], atol=1e-5, rtol=1e-5)
        start += n
    expected = torch.stack([a[-1] for a in alone])
    for batch, values in ((packed_batch, packed), (padded_batch, padded)):
        rows, columns = score_positions(sequences, batch)
        torch.testing.assert_close(gather_scores(values, rows, columns), expected, atol=1e-5, rtol=1e-5)
    # the helper used for rewards agrees with the by-hand path, in both layouts
    for packing in (True, False):
        scores = score_sequences(model, sequences, pad_token_id=pad, batch_tokens=64, packing=packing)
        torch.testing.assert_close(torch.tensor(scores), expected, atol=1e-5, rtol=1e-5)


def test_values_are_differentiable_into_head_and_backbone(tiny_model_dir, tokenizer):
    model = _varlen_model(tiny_model_dir).train()
    sequences = [render_for_scoring(USER, reply("5"), tokenizer)]
    batch = collate(sequences, packing=True, pad_token_id=tokenizer.pad_token_id)
    values = token_values(model, batch)
    values[0, -1].backward()
    assert score_layer(model).weight.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0


def test_export_pad_is_not_end_of_turn(tokenizer):
    pad_id = export_pad_token_id(tokenizer)
    assert pad_id is not None and pad_id != tokenizer.eos_token_id
    exported = export_tokenizer(tokenizer)
    assert exported.pad_token_id == pad_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the original is untouched


def test_save_load_round_trip_and_plain_hf_agree(tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    exported = export_tokenizer(tokenizer)
    model = load_scalar_head_model(tiny_model_dir, seed=1, pad_token_id=exported.pad_token_id).eval()
    with torch.no_grad():
        score_layer(model).weight.mul_(50)  # make scores large enough that a mix-up would show
    model.save_pretrained(tmp_path / "rm")
    exported.save_pretrained(tmp_path / "rm")
    texts = ["5", "2 + 3 = 5. The answer is 5.", "I do not know, sorry."]
    sequences = [render_for_scoring(USER, reply(t), tokenizer) for t in texts]
    before = score_sequences(model, sequences, pad_token_id=exported.pad_token_id)
    reloaded = load_scalar_head_model(str(tmp_path / "rm"))
    after = score_sequences(reloaded, sequences, pad_token_id=exported.pad_token_id)
    assert before == after  # bit-identical
    assert len(set(round(s, 4) for s in before)) == 3
    # plain transformers, right-padded batch: its pooling reads the same token
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    padded = collate(sequences, packing=False, pad_token_id=exported.pad_token_id)
    with torch.no_grad():
        logits = hf(input_ids=padded.input_ids, attention_mask=padded.attention_mask).logits[:, 0]
    torch.testing.assert_close(logits, torch.tensor(before), atol=1e-5, rtol=1e-5)


def test_scored_sequence_collates_like_a_rendered_sample(tokenizer):
    sequence = ScoredSequence(input_ids=[1, 2, 3], loss_mask=[0, 1, 1])
    batch = collate([sequence, sequence], packing=True, pad_token_id=0)
    assert batch.cu_seq_lens.tolist() == [0, 3, 6]
    rows, columns = score_positions([sequence, sequence], batch)
    assert rows.tolist() == [0, 0] and columns.tolist() == [2, 5]


def test_stale_gguf_quantization_entry_is_ignored(tiny_model_dir, tmp_path):
    """A GGUF conversion cache whose config.json holds ``quantization_config: gguf`` over plain
    weights (written by an earlier posttrain) must not make the scalar-head model unsaveable."""
    import json
    import shutil

    stale = tmp_path / "stale"
    shutil.copytree(tiny_model_dir, stale)
    config = json.loads((stale / "config.json").read_text())
    config["quantization_config"] = {"dequantize": False, "gguf_file": "x.gguf", "quant_method": "gguf"}
    (stale / "config.json").write_text(json.dumps(config))
    model = load_scalar_head_model(str(stale))
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())
