"""Getting a loaded model ready to train, and running it: LoRA, freezing all but the top
blocks, attention backend and gradient checkpointing, parameter counts, and the forward pass
that stops before the output projection (logits only where they are trained)."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from posttrain.data.batching import MicroBatch
from posttrain.models.attention import VARLEN_ATTENTION, register_varlen_attention

def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers CausalLM inside an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def train_top_blocks_only(model: torch.nn.Module, blocks: int,
                          also_train: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """Freeze everything but the top ``blocks`` decoder blocks, the final norm and the
    modules in ``also_train`` (a scalar head), in place; returns ``model``.

    Autograd then stops at the lowest trainable block: a step costs one forward plus about
    ``blocks / L`` of a backward (partial fine-tuning for small hardware). ``blocks=0``
    trains the norm (and ``also_train``) only. Raises ValueError outside ``0..L``.
    """
    decoder = unwrap_causal_lm(model).get_decoder()
    layers = list(getattr(decoder, "layers", None) or [])
    if not layers:
        raise ValueError(f"cannot find the decoder blocks of {type(decoder).__name__}")
    if not 0 <= blocks <= len(layers):
        raise ValueError(f"the model has {len(layers)} decoder blocks, got {blocks}")
    keep_modules = layers[len(layers) - blocks:] + [getattr(decoder, "norm", None), *also_train]
    keep = {id(p) for module in keep_modules if module is not None for p in module.parameters()}
    for parameter in model.parameters():
        if id(parameter) not in keep:
            parameter.requires_grad_(False)
    return model


def apply_lora(model: torch.nn.Module, *, r: int, alpha: float, dropout: float,
               target_modules: Sequence[str] | str, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters; only adapter weights stay trainable.

    ``task_type="SEQ_CLS"`` for scalar-head models (reward model, critic): peft then also
    trains a full copy of the ``score`` head and ``merge_and_unload`` puts it back.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type=task_type,
        target_modules=target_modules if isinstance(target_modules, str) else list(target_modules),
    )
    return get_peft_model(model, config)


def prepare_for_training(model: torch.nn.Module, *, attn_implementation: str,
                         gradient_checkpointing: bool) -> torch.nn.Module:
    """Set the attention backend, gradient checkpointing and train mode (in place)."""
    causal_lm = unwrap_causal_lm(model)
    if attn_implementation == VARLEN_ATTENTION:
        register_varlen_attention()
    elif attn_implementation in ("posttrain_flex", "auto"):  # FlexAttention on CUDA (models/attention_flex.py)
        from posttrain.models.attention_flex import resolve_attention

        attn_implementation = resolve_attention(attn_implementation, next(model.parameters()).device)
    causal_lm.config._attn_implementation = attn_implementation
    causal_lm.config.use_cache = False
    if gradient_checkpointing:
        enable_activation_checkpointing(causal_lm)
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    return model


def enable_activation_checkpointing(causal_lm: torch.nn.Module) -> None:
    """Recompute each decoder block's activations in the backward pass (non-reentrant
    ``torch.utils.checkpoint``): ``activation_checkpointing_enable`` in transformers 5, where
    ``gradient_checkpointing_enable`` is its deprecated alias (removed in 6); the alias where
    that is all the installed version has."""
    enable = getattr(causal_lm, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters), counting tied weights once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable


def forward_hidden(model: torch.nn.Module, batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the CausalLM up to its final hidden states; no logits are computed.

    The full model's forward is called (so FSDP's root hooks run) with ``logits_to_keep``
    selecting no position; the decoder's output is captured with a forward hook.

    Returns:
        (hidden_BTH [B, T, H] after the final norm, lm_head weight [V, H]).
    """
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    captured: list[torch.Tensor] = []

    def keep_output(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = decoder.register_forward_hook(keep_output)
    try:
        model(**model_inputs(batch),
              logits_to_keep=torch.zeros(0, dtype=torch.long, device=batch.input_ids.device))
    finally:
        handle.remove()
    lm_head = causal_lm.get_output_embeddings()
    return captured[-1], lm_head.weight


def model_inputs(batch: MicroBatch) -> dict[str, Any]:
    """Keyword arguments of a transformers forward for ``batch``: packed rows carry their
    sequence bounds (and shared-prompt block masks) to the varlen attention, padded rows
    their attention mask."""
    kwargs: dict[str, Any] = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
    if batch.packed:
        kwargs.update(cu_seq_lens_q=batch.cu_seq_lens, cu_seq_lens_k=batch.cu_seq_lens,
                      max_length_q=batch.max_seq_len, max_length_k=batch.max_seq_len)
        if batch.block_masks is not None:
            kwargs["posttrain_block_masks"] = batch.block_masks
    else:
        kwargs["attention_mask"] = batch.attention_mask
    return kwargs
