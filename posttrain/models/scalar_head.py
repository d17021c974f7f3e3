"""A causal-LM backbone with a scalar head: the reward model, and the critic of PPO.

The reward model (Ouyang et al. 2022) and PPO's value model (Schulman et al. 2017): both are the language model with
its vocabulary projection replaced by a linear map ``hidden -> 1``. A reward model reads that
scalar at ONE token, the last token of the response (its end-of-turn token, where the whole
response has been seen; InstructGPT, Ouyang et al. 2022 §3.5). A critic reads it at every
response token (``token_values``).

Representation: the Hugging Face ``XxxForSequenceClassification`` class with
``num_labels=1`` (``LlamaForSequenceClassification`` for SmolLM2): ``model.<backbone>`` plus
``score`` (``Linear(hidden, 1, bias=False)``). Why this and not a home-made value head:

- the export is a plain HF directory: ``save_pretrained`` / ``from_pretrained`` /
  ``AutoModelForSequenceClassification`` read it, no custom code or extra file;
- initialising from any causal LM directory works unchanged (the backbone's weight names
  are the same; only ``score`` is new), for every architecture transformers ships with a
  sequence-classification class;
- the shared training machinery (``models.prepare.prepare_for_training``, LoRA,
  ``train.distributed.shard_model``, ``train.checkpoint``) already handles HF models.

What we do NOT use is HF's own pooling, which reads the rightmost non-padding token and so
cannot handle packed rows and gives only one value per row. ``token_values`` runs the whole
model (so FSDP's root hooks fire) and captures the ``score`` layer's per-token output with a
forward hook: ``[B, T]`` values; the caller picks the positions it needs. For plain HF users
of an exported model, ``export_tokenizer`` picks a padding token that is not the end-of-turn
token, so ``AutoModelForSequenceClassification`` on a right-padded batch of conversations
that end at their end-of-turn token reads the same score we do (tested).

The score token of a rendered conversation is its last trained token, and a sequence to
score ends there (``data.scored_sequence``: ``ScoredSequence``, ``render_for_scoring``).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Sequence

import torch

from posttrain.data.batching import MicroBatch, collate
from posttrain.data.scored_sequence import ScoredSequence
from posttrain.errors import ModelLoadError
from posttrain.models.prepare import model_inputs, train_top_blocks_only
from posttrain.data.batching import split_into_micro_batches
from posttrain.models.loading import (
    _load_failure_message,
    _quiet_transformers,
    adapter_base,
    load_model_config,
    merge_adapter,
)

# ----------------------------------------------------------------------------- model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def score_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The ``hidden -> 1`` head of a (possibly peft-wrapped) scalar-head model."""
    head = getattr(unwrap(model), "score", None)
    if head is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no 'score' head: not a scalar-head model")
    return head


def is_scalar_head_config(config: Any) -> bool:
    """True for a saved sequence-classification model with one output (a reward model)."""
    architectures = getattr(config, "architectures", None) or []
    return (any(name.endswith("ForSequenceClassification") for name in architectures)
            and getattr(config, "num_labels", None) == 1)


def load_scalar_head_model(
    spec: str,
    *,
    dtype: torch.dtype | None = torch.float32,
    seed: int = 0,
    pad_token_id: int | None = None,
) -> torch.nn.Module:
    """A scalar-head model from a model spec (alias, HF directory, .gguf file, hub id).

    A saved reward model (``XxxForSequenceClassification``, one label) is loaded as it is. A
    causal LM becomes the backbone of a new scalar head whose weights are drawn from
    N(0, initializer_range^2) with a generator seeded by ``seed`` (so two runs with the same
    seed start identically whatever else consumed the global RNG).

    Args:
        spec: model spec (``posttrain.models.resolve_model_dir``).
        dtype: parameter dtype (fp32 master weights for training).
        seed: seed of a new head's initialisation.
        pad_token_id: written into the config when given (HF pooling needs one for
            batches; see ``export_tokenizer``).

    Raises ModelLoadError (one line) for missing models and architectures without a
    sequence-classification class.
    """
    from transformers import AutoModelForSequenceClassification


    source, config = load_model_config(spec)  # without a stale GGUF quantization entry
    with _quiet_transformers():
        fresh_head = not is_scalar_head_config(config)
        if fresh_head:
            config.num_labels = 1
            config.problem_type = "regression"
        if pad_token_id is not None:
            config.pad_token_id = pad_token_id
        elif getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None) if isinstance(
                getattr(config, "eos_token_id", None), int) else 0
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source, config=config, dtype=dtype)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                raise ModelLoadError(
                    f"model {spec}: architecture {getattr(config, 'model_type', '?')} has no sequence-classification "
                    f"class in transformers, so it cannot carry a scalar head") from None
            raise ModelLoadError(_load_failure_message(spec, source, exc)) from None
        except Exception as exc:
            raise ModelLoadError(_load_failure_message(spec, source, exc)) from None
    if adapter_base(spec) is not None:  # a PEFT adapter directory: its base, adapter merged
        model = merge_adapter(model, spec)
    if fresh_head:
        head = score_layer(model)
        generator = torch.Generator().manual_seed(seed)
        std = float(getattr(config, "initializer_range", 0.02))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=generator, dtype=torch.float32) * std)
    return model


def make_head_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """After wrapping with LoRA (which freezes everything else), train the head in full too.

    peft's ``SEQ_CLS`` task already trains a copy of ``score`` (its "modules to save"); then
    nothing changes. Otherwise the head's own weights are unfrozen.
    """
    head = score_layer(model)
    if not any(parameter.requires_grad for parameter in head.parameters()):
        for parameter in head.parameters():
            parameter.requires_grad_(True)
    return model


def train_top_layers_only(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """Freeze the embeddings and all but the top ``layers`` decoder blocks; the final norm and
    the head stay trainable (``models.prepare.train_top_blocks_only``): partial fine-tuning for
    reward models and critics on small hardware. ``layers=0`` trains the head (and norm) only.
    """
    return train_top_blocks_only(model, layers, also_train=[score_layer(model)])


def token_values(model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
    """The head's output at every token of a micro-batch.

    Packed rows (``batch.cu_seq_lens``) go through the varlen attention path of
    ``train.loop`` (``cu_seq_lens_q/k``), padded rows use ``batch.attention_mask``.

    Returns:
        values_BT: [B, T] float32 (padding positions hold garbage: mask them).
    """
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output):
        captured.append(output)

    handle = score_layer(model).register_forward_hook(keep_output)
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    return captured[-1].squeeze(-1).float()


def gather_scores(values_BT: torch.Tensor, rows_N: torch.Tensor, columns_N: torch.Tensor) -> torch.Tensor:
    """``values_BT[rows_N[i], columns_N[i]]`` for each i: one score per sequence, shape [N]."""
    return values_BT[rows_N, columns_N]


# ----------------------------------------------------------------------------- score positions


def score_positions(sequences: Sequence[ScoredSequence], batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], columns [N]) of each sequence's score token in the collated ``batch``.

    Packed: one row, sequence i ends at ``cu_seq_lens[i + 1] - 1``. Padded: row i, column
    ``len(sequence i) - 1`` (right padding).
    """
    device = batch.input_ids.device
    if batch.packed:
        columns = batch.cu_seq_lens[1:].to(device=device, dtype=torch.long) - 1
        rows = torch.zeros_like(columns)
    else:
        columns = torch.tensor([s.score_index for s in sequences], dtype=torch.long, device=device)
        rows = torch.arange(len(sequences), dtype=torch.long, device=device)
    return rows, columns


@torch.no_grad()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[ScoredSequence],
    *,
    pad_token_id: int,
    batch_tokens: int = 4096,
    packing: bool = False,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> list[float]:
    """Scores of many sequences, in order, in micro-batches of about ``batch_tokens`` tokens.

    Inference helper (reward scoring, evaluation): eval mode is set for the duration.
    ``packing=True`` needs the ``posttrain_varlen`` attention (``train.loop``) or
    flash-attention on the model; padded batches work with any backend.
    """

    if not sequences:
        return []
    lengths = [len(s.input_ids) for s in sequences]
    groups = split_into_micro_batches(list(range(len(sequences))), lengths, batch_tokens, packing=packing)
    scores = [0.0] * len(sequences)
    was_training = model.training
    model.eval()
    try:
        for group in groups:
            group = sorted(group)
            members = [sequences[i] for i in group]
            batch = collate(members, packing=packing, pad_token_id=pad_token_id).to(device)
            context = (torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
                       if autocast_dtype is not None else contextlib.nullcontext())
            with context:
                values_BT = token_values(model, batch)
            rows, columns = score_positions(members, batch)
            for index, value in zip(group, gather_scores(values_BT, rows, columns).tolist()):
                scores[index] = float(value)
    finally:
        model.train(was_training)
    return scores


# ----------------------------------------------------------------------------- export


def export_pad_token_id(tokenizer: Any) -> int | None:
    """A padding token id that is not the end-of-turn (eos) token, if the vocabulary has one.

    HF's sequence-classification pooling reads the rightmost token that is not padding; if
    padding were the end-of-turn token (SmolLM2 pads with ``<|im_end|>``) it would skip the
    very token the score is read at.
    """
    end_ids = {tokenizer.eos_token_id}
    for name in ("pad_token", "unk_token", "bos_token"):
        token = getattr(tokenizer, name, None)
        token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
        if token_id is not None and token_id not in end_ids:
            return int(token_id)
    return None


def export_tokenizer(tokenizer: Any) -> Any:
    """A copy of ``tokenizer`` whose pad token is ``export_pad_token_id`` (when one exists)."""
    pad_id = export_pad_token_id(tokenizer)
    if pad_id is None or pad_id == tokenizer.pad_token_id:
        return tokenizer
    exported = copy.deepcopy(tokenizer)
    exported.pad_token = exported.convert_ids_to_tokens(pad_id)
    return exported
