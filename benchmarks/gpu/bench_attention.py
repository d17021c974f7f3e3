"""Packed attention on one device: ``posttrain_varlen`` (SDPA per sequence) against
``posttrain_flex`` (one compiled FlexAttention call with a block mask), forward + backward,
for plain packing and for the shared-prompt layout, and the shared-prompt layout against
plain packing of the same groups (``data.batching``). Shapes: the attention of the model
given (heads, kv heads, head dim), bf16 on CUDA. Run: ``python
benchmarks/gpu/bench_attention.py --model DIR --json OUT`` (``benchmarks/gpu/check.sh`` does).

Each case is timed over ``--repeats`` calls after ``--warmup`` (which includes compiling the
kernel and building the mask); the block mask is rebuilt on every call, as in training (one
mask per micro-batch, shared by the layers).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from posttrain.data.batching import collate_packed, collate_shared_prompt
from posttrain.models import attention_flex
from posttrain.models.attention_flex import flex_packed_attention
from posttrain.models.attention import varlen_sdpa_attention


def layouts(tokens: int, prompt: int, group: int, seed: int = 0):
    """(plain packed batch of documents, shared-prompt batch, the same groups plainly packed)."""
    from types import SimpleNamespace

    rng = random.Random(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(min(rng.randint(tokens // 32, tokens // 4), tokens - sum(lengths)))
    docs = collate_packed([SimpleNamespace(input_ids=[1] * n, loss_mask=[1] * n) for n in lengths])
    completion = max(1, (tokens // 2 - prompt) // group)
    groups = [([1] * prompt, [[1] * rng.randint(completion // 2, completion) for _ in range(group)]) for _ in range(2)]
    shared = collate_shared_prompt(groups)
    plain = collate_packed([SimpleNamespace(input_ids=p + c, loss_mask=[0] * len(p) + [1] * len(c))
                            for p, cs in groups for c in cs])
    return {"packed": docs, "shared_prompt": shared, "shared_prompt_as_plain_packing": plain}


def time_case(attention, batch, heads: int, kv_heads: int, head_dim: int, device, dtype, warmup: int, repeats: int):
    total = batch.num_tokens
    q = torch.randn(1, heads, total, head_dim, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, total, head_dim, device=device, dtype=dtype, requires_grad=True)
    cu = batch.cu_seq_lens.to(device)
    masks = None if batch.block_masks is None else [m.to(device) for m in batch.block_masks]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(warmup + repeats):
        attention_flex._last_mask = None  # a new micro-batch: the mask is built again
        sync()
        started = time.perf_counter()
        out, _ = attention(None, q, k, v, None, cu_seq_lens_q=cu, posttrain_block_masks=masks)
        out.sum().backward()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - started)
        q.grad = k.grad = v.grad = None
    return {"ms": 1000 * sum(times) / len(times), "tokens": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model directory (its config gives the attention shape)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--prompt", type=int, default=512, help="shared prompt length")
    parser.add_argument("--group", type=int, default=8, help="completions per prompt")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(args.model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":  # eager flex backward on a CPU, for the dry run (see tests/test_attention_flex.py)
        import torch.nn.attention.flex_attention as flex_module

        flex_module._validate_device = lambda *tensors: None
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "shape": {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim}, "cases": {}}
    for name, batch in layouts(args.tokens, args.prompt, args.group).items():
        for label, attention in (("posttrain_varlen", varlen_sdpa_attention), ("posttrain_flex", flex_packed_attention)):
            case = time_case(attention, batch, heads, kv_heads, head_dim, device, dtype, args.warmup, args.repeats)
            results["cases"][f"{name}/{label}"] = case
            print(f"{name:<32} {label:<17} {case['tokens']:>6} tokens  {case['ms']:8.2f} ms fwd+bwd", flush=True)
    cases = results["cases"]
    for name in ("packed", "shared_prompt"):
        results[f"{name}/flex_speedup"] = cases[f"{name}/posttrain_varlen"]["ms"] / cases[f"{name}/posttrain_flex"]["ms"]
    best = min(cases["shared_prompt/posttrain_flex"]["ms"], cases["shared_prompt/posttrain_varlen"]["ms"])
    plain = min(cases["shared_prompt_as_plain_packing/posttrain_flex"]["ms"],
                cases["shared_prompt_as_plain_packing/posttrain_varlen"]["ms"])
    results["shared_prompt_vs_plain_speedup"] = plain / best
    print(f"flex / varlen speed-up: packed {results['packed/flex_speedup']:.2f}x, shared prompt "
          f"{results['shared_prompt/flex_speedup']:.2f}x; shared prompt vs plain packing of the same groups "
          f"{results['shared_prompt_vs_plain_speedup']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
