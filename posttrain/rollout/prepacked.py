"""A generation copy of a model whose linear layers keep their weights transposed ([in, out],
contiguous): the layout CPU matmul kernels run fastest with at decode's small batches.

``nn.Linear`` computes ``x @ weight.T`` from a row-major [out, in] weight. On a CPU, at the few
rows a decode step has (8-64 sequences), that product runs about half as fast as the same
product against a contiguous [in, out] copy (``benchmarks/bench_generate.py`` prints both; at a
few hundred rows and more, as in training, the two are alike). vLLM's CPU backend prepacks its
weights for the same reason. The copy costs one more set of weights in memory, refreshed in
place after every update (``refresh``), and is used by the hf engine on CPU for full models
(``rollout.hf``); LoRA-wrapped and sharded models generate with their own modules.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class TransposedLinear(nn.Module):
    """``y = x @ weight_t (+ bias)``: an ``nn.Linear`` whose weight is stored as its transpose.

    weight_t: [in_features, out_features], contiguous; bias: [out_features] or None.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


def prepacked_copy(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``model`` for inference (eval mode, no gradients, in ``dtype`` if given) whose
    every ``nn.Linear`` is a ``TransposedLinear`` holding the same weights."""
    packed = copy.deepcopy(model)
    if dtype is not None:
        packed = packed.to(dtype)
    for name, module in list(packed.named_modules()):
        if type(module) is nn.Linear:
            parent_name, _, child = name.rpartition(".")
            setattr(packed.get_submodule(parent_name) if parent_name else packed, child, TransposedLinear(module))
    packed.requires_grad_(False)
    return packed.eval()


@torch.no_grad()
def refresh(packed: nn.Module, model: nn.Module) -> None:
    """Copy ``model``'s current weights into ``packed`` (made by ``prepacked_copy`` from a model of
    the same architecture), transposing linear weights, casting to ``packed``'s dtype."""
    for name, module in model.named_modules():
        target = packed.get_submodule(name) if name else packed
        if isinstance(target, TransposedLinear):
            target.weight_t.copy_(module.weight.detach().t())
            if target.bias is not None:
                target.bias.copy_(module.bias.detach())
            continue
        for key, param in module.named_parameters(recurse=False):
            getattr(target, key).copy_(param.detach())


def can_prepack(model: nn.Module) -> bool:
    """A full model on a CPU: not LoRA-wrapped (PEFT), not sharded (FSDP DTensors)."""
    if hasattr(model, "peft_config") or any(hasattr(p, "full_tensor") for p in model.parameters()):
        return False
    return next(model.parameters()).device.type == "cpu"
