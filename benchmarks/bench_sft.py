"""posttrain SFT vs TRL's SFTTrainer on this machine: trained tokens/s, peak memory, MFU,
loss-curve agreement. Run: ``python benchmarks/bench_sft.py`` (a few minutes on a CPU).

Same model (the bundled SmolLM2-135M-Instruct, loaded the same way), the same token ids
and loss masks (rendered once by posttrain and handed to both; TRL gets them as a
pre-tokenised dataset with a ``labels`` column), the same batches in the same order (no
shuffling in either), the same global batch, max length, precision, optimizer (AdamW
0.9/0.999, constant lr, clip 1.0) and loss (token-mean over the step's trained tokens).
Each system runs in its own subprocess, so its peak RSS (``ru_maxrss``) is its own.

Each at its best setting on this CPU: posttrain packs padding-free (one micro-batch per
step, varlen attention, logits only at trained positions); TRL is run without gradient
checkpointing (its default is on) both with padding (``padding``) and with its
padding-free collator (``padding_free``); the faster TRL run is the reference. Both
processes get the same glibc allocator tuning (``train.loop.tune_cpu_allocator``) unless
``--no-allocator-tuning``. The first step of each run is excluded from rates (warm-up).

MFU = 6 * N * (all tokens/s) / (matmul FLOP/s measured here, in the run's precision):
N counts every parameter (embeddings included).

On a GPU (``--device cuda``, run by ``benchmarks/gpu/check.sh``): ``--model`` names a model
directory (a random-initialised one from ``benchmarks/gpu/random_model.py``), ``--synthetic N``
replaces the chat data by N token sequences whose consecutive groups of ``--batch`` sum to
exactly ``--max-length`` tokens (one packed micro-batch per optimizer step for posttrain, one
padding-free row for TRL's ``padding_free`` collator: the same tokens, in the same order),
memory is the peak of ``torch.cuda.max_memory_allocated`` and the matmul rate is measured on
the GPU with ``--matmul-size`` squares.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workers


def _load_samples(path: str):
    from types import SimpleNamespace

    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return [SimpleNamespace(input_ids=r["input_ids"], loss_mask=r["loss_mask"], weights=None) for r in rows]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_memory(args) -> dict:
    """Peak RSS, and on CUDA the peak of allocated GPU memory (MiB)."""
    import torch

    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else None
    return {"peak_rss_mib": _peak_rss_mib(), "peak_gpu_mib": gpu}


def worker_posttrain(args) -> dict:
    import torch

    from posttrain.config import SFTConfig, validate_config
    from posttrain.train.sft import run_sft

    samples = _load_samples(args.data)
    out = tempfile.mkdtemp(prefix="bench-posttrain-")
    config = validate_config(SFTConfig, {
        "run": {"name": "bench", "output_dir": out, "progress": False, "tensorboard": False},
        "model": {"name": args.model, "attn_implementation": args.attn or None},
        "data": {"train": args.data, "max_length": args.max_length},
        "optim": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"max_steps": args.steps, "global_batch_size": args.batch, "shuffle": False,
                  "micro_batch_tokens": args.micro_batch_tokens, "packing": True, "precision": args.precision,
                  "loss_agg_mode": "token-mean", "seed": 0},
    })
    if args.no_allocator_tuning:
        import posttrain.train.sft as sft_module

        sft_module.tune_cpu_allocator = lambda: False
    import posttrain.train.sft as sft_module

    cpu_s: list[float] = []
    real_step = sft_module.optimizer_step

    profile: dict = {}

    def timed_step(*a, **k):
        started = time.process_time()
        if len(cpu_s) == args.steps // 2:  # one step in the middle, under the profiler: where its time goes
            result, profile["split"] = profiled(lambda: real_step(*a, **k))
        else:
            result = real_step(*a, **k)
        cpu_s.append(time.process_time() - started)
        return result

    sft_module.optimizer_step = timed_step
    torch.manual_seed(0)
    result = run_sft(config, samples=(samples, []))
    steps = [h for h in result.history if "loss" in h]
    return {"losses": [h["loss"] for h in steps], "step_s": [h["step_time_s"] for h in steps],
            "step_cpu_s": cpu_s, "profile": profile.get("split"), **_peak_memory(args)}


# aten kernels by kind, for the profiled step's split (self time: each op's own time, no children)
KERNEL_KINDS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
                "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                              "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                              "aten::_flash_attention_forward", "aten::_flash_attention_backward")}


def profiled(run):
    """(run(), {kind: share of the profiled ops' self CPU time}) with ``torch.profiler``: matmul,
    attention, and everything else (norms, rotary, activations, the loss, the optimizer)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = run()
    times: dict[str, float] = {}
    for event in prof.key_averages():
        kind = next((k for k, names in KERNEL_KINDS.items() if event.key in names), "other")
        times[kind] = times.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(times.values()) or 1.0
    return result, {kind: value / total for kind, value in times.items()}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.loop import tune_cpu_allocator

    if not args.no_allocator_tuning:
        tune_cpu_allocator()
    samples = _load_samples(args.data)
    rows = [{"input_ids": s.input_ids, "labels": [t if m else -100 for t, m in zip(s.input_ids, s.loss_mask)]}
            for s in samples]
    dataset = Dataset.from_list(rows)
    tokenizer = load_tokenizer(args.model)
    torch.manual_seed(0)
    model = load_model(args.model, dtype=torch.float32)
    model.config._attn_implementation = args.trl_attn

    class InOrderSFTTrainer(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    timer = trl_step_timer()
    trl_args = TRLConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=args.precision == "bf16", logging_steps=1, save_strategy="no", report_to=[], eval_strategy="no",
        # padding-free without packing refuses max_length; the rows are already truncated to it
        max_length=None if args.trl_mode == "padding_free" else args.max_length, packing=False,
        padding_free=args.trl_mode == "padding_free", activation_checkpointing=False, dataloader_num_workers=0, seed=0,
        use_cpu=args.device == "cpu", disable_tqdm=True,
    )
    trainer = InOrderSFTTrainer(model=model, args=trl_args, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[timer])
    trainer.train()
    return {"losses": timer.losses, "step_s": timer.step_s, "step_cpu_s": timer.step_cpu_s, **_peak_memory(args)}


# ----------------------------------------------------------------------------- driver


def trl_step_timer():
    """A transformers ``TrainerCallback`` that records each optimizer step's wall and CPU
    seconds and the logged losses (TRL's trainers report through these hooks)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.step_cpu_s, self.losses, self._t, self._c = [], [], [], 0.0, 0.0

        def on_step_begin(self, *a, **k):
            self._t, self._c = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            self.step_s.append(time.perf_counter() - self._t)
            self.step_cpu_s.append(time.process_time() - self._c)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    return StepTimer()


def measure_matmul_flops(precision: str, seconds: float = 3.0, size: int = 2048, device: str = "cpu") -> float:
    """Sustained FLOP/s of square matmuls in the run's dtype on this machine (CPU or GPU), right now."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(10 if device == "cuda" else 1):
            a @ b
            count += 1
        sync()
    return 2 * size**3 * count / (time.perf_counter() - started)


def synthetic_data(args, path: Path) -> tuple[int, list[tuple[int, int]]]:
    """``args.synthetic`` token sequences (seeded): each consecutive group of ``args.batch``
    sums to exactly ``args.max_length`` tokens; the first quarter of each is an untrained
    prompt. Returns what ``prepare_data`` returns."""
    import random

    rng = random.Random(0)
    k = args.batch
    rows = []
    while len(rows) < args.synthetic:
        cuts = sorted(rng.sample(range(1, args.max_length // 16), k - 1)) if k > 1 else []
        lengths = [16 * (b - a) for a, b in zip([0, *cuts], [*cuts, args.max_length // 16])]
        lengths[-1] += args.max_length - sum(lengths)
        for n in lengths:
            prompt = max(1, n // 4)
            rows.append({"input_ids": [rng.randrange(100, 49000) for _ in range(n)],
                         "loss_mask": [0] * prompt + [1] * (n - prompt)})
    rows = rows[:args.synthetic]
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return len(rows), [(len(r["input_ids"]), sum(r["loss_mask"][1:])) for r in rows]


def prepare_data(args, path: Path) -> tuple[int, list[tuple[int, int]]]:
    """Render the first rows once with posttrain; returns (rows, per-sample (tokens, trained targets))."""
    from posttrain.config import DataConfig
    from posttrain.data import load_sft_data
    from posttrain.models import load_tokenizer

    if args.synthetic:
        return synthetic_data(args, path)
    tokenizer = load_tokenizer(args.model)
    prepared = load_sft_data(args.data_file, tokenizer,
                             DataConfig(train=args.data_file, max_length=args.max_length, limit=args.batch * args.steps))
    with open(path, "w") as handle:
        for s in prepared.samples:
            handle.write(json.dumps({"input_ids": list(s.input_ids), "loss_mask": list(s.loss_mask)}) + "\n")
    return len(prepared.samples), [(len(s.input_ids), sum(s.loss_mask[1:])) for s in prepared.samples]


def run_worker(kind: str, args, data_path: Path, trl_mode: str = "padding") -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data_path), "--trl-mode", trl_mode,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--precision", args.precision, "--lr", str(args.lr),
               "--micro-batch-tokens", str(args.micro_batch_tokens), "--device", args.device, "--model", args.model,
               "--trl-attn", args.trl_attn] + (["--attn", args.attn] if args.attn else [])
    if args.no_allocator_tuning:
        command.append("--no-allocator-tuning")
    return spawn_worker(kind, command, args.threads)


def spawn_worker(kind: str, command: list[str], threads: int, **env_extra: str) -> dict:
    """Run one system's worker in a fresh process (its own peak RSS, no shared caches) and
    return the JSON it prints last, plus ``wall_s``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": str(threads), **env_extra}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-4000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - started
    return result


def rates(result: dict, per_step: list[tuple[int, int]], key: str = "step_s") -> tuple[float, float]:
    """(all tokens/s, trained tokens/s) over steps 2.. (step 1 is warm-up); ``key`` picks
    wall-clock (``step_s``) or process CPU seconds (``step_cpu_s``, robust to other load)."""
    seconds = sum(result[key][1:])
    tokens = sum(t for t, _ in per_step[1:])
    trained = sum(n for _, n in per_step[1:])
    return tokens / seconds, trained / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description="posttrain SFT vs TRL SFTTrainer")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--trl-mode", default="padding", choices=["padding", "padding_free"], help=argparse.SUPPRESS)
    parser.add_argument("--data-file", default=str(REPO / "examples" / "data" / "sft_chat.jsonl"))
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="global batch (sequences per optimizer step)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="posttrain's per-micro-batch budget")
    parser.add_argument("--trl-modes", default="padding,padding_free", help="TRL collators to try; the best counts")
    parser.add_argument("--no-allocator-tuning", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads for both systems (default: posttrain's own choice, "
                             "posttrain/train/threads.py: the cores other processes leave free at start)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both systems train")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec for both systems")
    parser.add_argument("--synthetic", type=int, default=0,
                        help="use N synthetic sequences instead of --data-file (groups of --batch fill --max-length)")
    parser.add_argument("--attn", default=None, help="posttrain's model.attn_implementation (default: its own)")
    parser.add_argument("--trl-attn", default="sdpa", help="TRL's model attention implementation")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the squares timing the matmul rate")
    args = parser.parse_args()
    from posttrain.config import resolve_precision  # auto: bf16 where computed natively, else fp32 (as train.precision)

    args.precision = resolve_precision(args.precision)

    if args.worker:
        result = worker_posttrain(args) if args.worker == "posttrain" else worker_trl(args)
        print(json.dumps(result))
        return

    import torch

    if args.threads is None:  # the policy every posttrain command uses
        from posttrain.train.threads import current_plan

        args.threads = current_plan({}, torch_loaded=False).threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    data_path = workdir / "tokens.jsonl"
    rows, per_sample = prepare_data(args, data_path)
    per_step = [tuple(map(sum, zip(*per_sample[k:k + args.batch]))) for k in range(0, rows, args.batch)]
    per_step = per_step[:args.steps]
    from posttrain.models import load_model

    n_params = sum(p.numel() for p in load_model(args.model).parameters())
    print(f"data: {rows} rows from {args.data_file}, {sum(t for t, _ in per_step)} tokens "
          f"({sum(n for _, n in per_step)} trained) in {len(per_step)} steps of {args.batch}; "
          f"max_length {args.max_length}; {args.precision}; torch threads {torch.get_num_threads()}; "
          f"{machine_line()}")
    # the matmul rate before and after every system: a VM's speed drifts with its neighbours' load,
    # so each system's rate is also compared per GFLOP/s of the rate around its own run
    around = [measure_matmul_flops(args.precision, size=args.matmul_size, device=args.device)]
    results = {"posttrain": run_worker("posttrain", args, data_path)}
    around.append(measure_matmul_flops(args.precision, size=args.matmul_size, device=args.device))
    for mode in [m for m in args.trl_modes.split(",") if m]:
        results[f"trl/{mode}"] = run_worker("trl", args, data_path, trl_mode=mode)
        around.append(measure_matmul_flops(args.precision, size=args.matmul_size, device=args.device))
    for k, result in enumerate(results.values()):
        result["matmul_flops_around"] = (around[k] + around[k + 1]) / 2
    flops_before, flops_after = around[0], around[-1]
    flops = (flops_before + flops_after) / 2

    print(f"\nmatmul rate ({args.precision}, {args.matmul_size}^2 on {args.device}): {flops / 1e9:.1f} GFLOP/s "
          f"(before {flops_before / 1e9:.1f}, after {flops_after / 1e9:.1f})")
    print(f"{'system':<20}{'tokens/s':>10}{'trained tok/s':>15}{'trained tok/CPU-s':>19}{('peak GPU MiB' if args.device == 'cuda' else 'peak RSS MiB'):>14}"
          f"{'wall s':>9}")
    table = {}
    memory_key = "peak_gpu_mib" if args.device == "cuda" else "peak_rss_mib"
    for name, result in results.items():
        all_rate, trained_rate = rates(result, per_step)
        _, trained_cpu_rate = rates(result, per_step, "step_cpu_s")
        table[name] = {"tokens_per_s": all_rate, "trained_tokens_per_s": trained_rate,
                       "trained_tokens_per_cpu_s": trained_cpu_rate, **result}
        print(f"{name:<20}{all_rate:>10.1f}{trained_rate:>15.1f}{trained_cpu_rate:>19.1f}"
              f"{result[memory_key]:>14.0f}{result['wall_s']:>9.0f}")
    trl_names = [n for n in table if n.startswith("trl/")]
    ours = table["posttrain"]
    summary = {"matmul_flops": flops, "n_params": n_params, "systems": table, "device": args.device,
               "memory": memory_key, "model": args.model, "precision": args.precision, "max_length": args.max_length}
    if trl_names:
        best = max(trl_names, key=lambda n: table[n]["trained_tokens_per_s"])
        ratio = ours["trained_tokens_per_s"] / table[best]["trained_tokens_per_s"]
        memory = ours[memory_key] / table[best][memory_key]
        cpu_ratio = ours["trained_tokens_per_cpu_s"] / table[best]["trained_tokens_per_cpu_s"]
        drift_free = ((ours["trained_tokens_per_s"] / ours["matmul_flops_around"])
                      / (table[best]["trained_tokens_per_s"] / table[best]["matmul_flops_around"]))
        print(f"\nposttrain / best TRL ({best}): {ratio:.2f}x trained tokens/s (wall), {cpu_ratio:.2f}x per "
              f"CPU-second, peak RSS {memory:.2f}x; {drift_free:.2f}x per GFLOP/s of the matmul rate measured "
              f"around each run ({ours['matmul_flops_around'] / 1e9:.0f} and "
              f"{table[best]['matmul_flops_around'] / 1e9:.0f} GFLOP/s)")
        summary["speed_ratio_per_matmul_rate"] = drift_free
        diffs = [abs(a - b) / max(abs(b), 1e-9) for a, b in zip(ours["losses"], table[best]["losses"])]
        print("loss per step (posttrain | " + best + "):")
        for k, (a, b) in enumerate(zip(ours["losses"], table[best]["losses"])):
            print(f"  step {k + 1}: {a:.4f} | {b:.4f}")
        print(f"loss curves: mean relative difference {sum(diffs) / len(diffs):.2%}, max {max(diffs):.2%}")
        summary.update(best_trl=best, speed_ratio=ratio, cpu_speed_ratio=cpu_ratio, memory_ratio=memory,
                       loss_rel_diff_max=max(diffs))
    if ours.get("profile"):
        print("posttrain's profiled step (self CPU time by kind): " + ", ".join(
            f"{kind} {share:.0%}" for kind, share in sorted(ours["profile"].items(), key=lambda kv: -kv[1])))
    mfu = 6 * n_params * ours["tokens_per_s"] / flops
    print(f"posttrain MFU: 6 x {n_params / 1e6:.1f}M x {ours['tokens_per_s']:.1f} tokens/s / "
          f"{flops / 1e9:.1f} GFLOP/s = {mfu:.1%}")
    summary["posttrain_mfu"] = mfu
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
