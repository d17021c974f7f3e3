"""posttrain DPO vs TRL's DPOTrainer on this machine: trained tokens/s, peak memory, the
reference pass, and the per-step loss curves compared. Run: ``python benchmarks/bench_dpo.py``
(a few minutes on a CPU).

Same model (the bundled SmolLM2-135M-Instruct, loaded the same way), the same pairs with the
same token ids (rendered once by posttrain; TRL gets them as its own tokenised columns
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``, split where each side's loss mask
starts), the same pairs per step in the same order (no shuffling), the same max length,
precision, optimizer (AdamW 0.9/0.999, constant lr, no warmup, clip 1.0) and loss (DPO
sigmoid, beta 0.1, mean over the step's pairs). Each system runs in its own subprocess, so
its peak RSS (``ru_maxrss``) is its own.

Each at its best setting on this CPU: posttrain packs both sides of every pair padding-free
(one micro-batch per step, varlen attention, logits only at response positions) with the
reference log-probs computed once before training; TRL (no gradient checkpointing, its
padded collator) runs twice, with a resident reference model (its default, ``ref_model``)
and with ``precompute_ref_log_probs`` (``precompute``); the faster of the two is the
reference for speed and memory. Trained tokens = response tokens of both sides (what the
log-probs sum over). The first step of each run is excluded from rates (warm-up); the
reference passes are timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sft import _peak_rss_mib, measure_matmul_flops, rates, spawn_worker, trl_step_timer
from machine import machine_line  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- workers


def _load_pairs(path: str):
    from posttrain.data.preference import PreferencePair
    from posttrain.data.scored_sequence import ScoredSequence

    pairs = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        pairs.append(PreferencePair(ScoredSequence(row["chosen"], row["chosen_mask"]),
                                    ScoredSequence(row["rejected"], row["rejected_mask"])))
    return pairs


def worker_posttrain(args) -> dict:
    import torch

    import posttrain.train.dpo as dpo_module
    from posttrain.config import DPOConfig, validate_config

    pairs = _load_pairs(args.data)
    out = tempfile.mkdtemp(prefix="bench-posttrain-dpo-")
    config = validate_config(DPOConfig, {
        "run": {"name": "bench", "output_dir": out, "progress": False, "tensorboard": False},
        "data": {"train": args.data, "max_length": args.max_length},
        "optim": {"lr": args.lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "schedule": "constant",
                  "warmup_steps": 0, "max_grad_norm": 1.0},
        "train": {"max_steps": args.steps, "global_batch_size": args.batch, "shuffle": False,
                  "micro_batch_tokens": args.micro_batch_tokens, "packing": True, "precision": args.precision,
                  "seed": 0},
        "dpo": {"loss_type": "sigmoid", "beta": args.beta},
    })
    timings = {"reference_s": 0.0}
    real_reference = dpo_module.reference_logps

    def timed_reference(*a, **k):
        started = time.perf_counter()
        result = real_reference(*a, **k)
        timings["reference_s"] = time.perf_counter() - started
        return result

    dpo_module.reference_logps = timed_reference
    cpu_s: list[float] = []
    real_step = dpo_module.optimizer_step

    def timed_step(*a, **k):
        started = time.process_time()
        result = real_step(*a, **k)
        cpu_s.append(time.process_time() - started)
        return result

    dpo_module.optimizer_step = timed_step
    torch.manual_seed(0)
    result = dpo_module.run_dpo(config, pairs=(pairs, []))
    steps = [h for h in result.history if "loss" in h]
    return {"losses": [h["loss"] for h in steps], "step_s": [h["step_time_s"] for h in steps], "step_cpu_s": cpu_s,
            "reference_s": timings["reference_s"], "peak_rss_mib": _peak_rss_mib()}


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer

    from posttrain.models import load_model, load_tokenizer
    from posttrain.train.loop import tune_cpu_allocator

    tune_cpu_allocator()
    rows = []
    for pair in _load_pairs(args.data):
        start = pair.chosen.loss_mask.index(1)
        assert pair.chosen.input_ids[:start] == pair.rejected.input_ids[:start]
        rows.append({"prompt_ids": pair.chosen.input_ids[:start], "chosen_ids": pair.chosen.input_ids[start:],
                     "rejected_ids": pair.rejected.input_ids[start:]})
    dataset = Dataset.from_list(rows)
    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    model = load_model(dtype=torch.float32)
    model.config._attn_implementation = "sdpa"
    reference = {}

    class PretokenisedInOrderDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, *a, **k):
            return dataset  # already tokenised by posttrain: the same ids for both systems

        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

        def _precompute_ref_logps(self, *a, **k):
            started = time.perf_counter()
            result = super()._precompute_ref_logps(*a, **k)
            reference["s"] = reference.get("s", 0.0) + time.perf_counter() - started
            return result

    timer = trl_step_timer()
    trl_args = TRLConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-dpo-"), per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        bf16=args.precision == "bf16", logging_steps=1, save_strategy="no", report_to=[], eval_strategy="no",
        max_length=2 * args.max_length, beta=args.beta, loss_type=["sigmoid"],
        precompute_ref_log_probs=args.trl_mode == "precompute", precompute_ref_batch_size=args.batch,
        gradient_checkpointing=False, dataloader_num_workers=0, seed=0, use_cpu=True, disable_tqdm=True,
    )
    trainer = PretokenisedInOrderDPOTrainer(model=model, args=trl_args, train_dataset=dataset,
                                            processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    return {"losses": timer.losses, "step_s": timer.step_s, "step_cpu_s": timer.step_cpu_s,
            "reference_s": reference.get("s", 0.0),
            "peak_rss_mib": _peak_rss_mib()}


# ----------------------------------------------------------------------------- driver


def prepare_data(args, path: Path) -> list[tuple[int, int]]:
    """Render the first ``batch * steps`` pairs once with posttrain (chat template, audit);
    returns per-pair (tokens, trained response targets) of both sides."""
    from posttrain.config import DPOConfig, validate_config
    from posttrain.models import load_tokenizer
    from posttrain.data.preference import load_preference_data
    from posttrain.train.dpo import pair_targets

    config = validate_config(DPOConfig, {"data": {"train": args.data_file, "max_length": args.max_length,
                                                  "limit": args.batch * args.steps}})
    pairs, _ = load_preference_data(config.data, load_tokenizer(), seed=config.train.seed, verbose=False)
    with open(path, "w") as handle:
        for p in pairs:
            handle.write(json.dumps({"chosen": p.chosen.input_ids, "chosen_mask": p.chosen.loss_mask,
                                     "rejected": p.rejected.input_ids, "rejected_mask": p.rejected.loss_mask}) + "\n")
    return [(p.tokens, pair_targets(p)) for p in pairs]


def run_worker(kind: str, args, data_path: Path, trl_mode: str = "ref_model") -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--data", str(data_path), "--trl-mode", trl_mode,
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--precision", args.precision, "--lr", str(args.lr), "--beta", str(args.beta),
               "--micro-batch-tokens", str(args.micro_batch_tokens)]
    return spawn_worker(kind, command, args.threads, TQDM_DISABLE="1")


def main() -> None:
    parser = argparse.ArgumentParser(description="posttrain DPO vs TRL DPOTrainer")
    parser.add_argument("--worker", choices=["posttrain", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--trl-mode", default="ref_model", choices=["ref_model", "precompute"], help=argparse.SUPPRESS)
    parser.add_argument("--data-file", default=str(REPO / "examples" / "data" / "preference_arithmetic_train.jsonl"))
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per side")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="posttrain's per-micro-batch budget")
    parser.add_argument("--trl-modes", default="ref_model,precompute", help="TRL reference modes; the best counts")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch/OpenMP threads for both systems (default: posttrain's own choice, "
                             "posttrain/train/threads.py: the cores other processes leave free at start)")
    parser.add_argument("--json", help="also write the figures to this file")
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
    workdir = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    data_path = workdir / "pairs.jsonl"
    per_pair = prepare_data(args, data_path)
    per_step = [tuple(map(sum, zip(*per_pair[k:k + args.batch]))) for k in range(0, len(per_pair), args.batch)]
    per_step = per_step[:args.steps]
    print(f"data: {len(per_pair)} pairs from {args.data_file}, {sum(t for t, _ in per_step)} tokens "
          f"({sum(n for _, n in per_step)} trained response tokens) in {len(per_step)} steps of {args.batch} pairs; "
          f"max_length {args.max_length} per side; {args.precision}; torch threads {args.threads}; "
          f"{machine_line()}")
    # the matmul rate before and after every system: this VM's speed drifts with its neighbours'
    # load, so each system's rate is also printed per GFLOP/s of the rate around its own run
    flops = [measure_matmul_flops(args.precision)]
    results = {"posttrain": run_worker("posttrain", args, data_path)}
    flops.append(measure_matmul_flops(args.precision))
    for mode in [m for m in args.trl_modes.split(",") if m]:
        results[f"trl/{mode}"] = run_worker("trl", args, data_path, trl_mode=mode)
        flops.append(measure_matmul_flops(args.precision))
    flops_before, flops_after = flops[0], flops[-1]
    for k, result in enumerate(results.values()):
        result["matmul_gflops_around"] = (flops[k] + flops[k + 1]) / 2e9

    print(f"\nmatmul rate ({args.precision}, 2048^2): before {flops_before / 1e9:.1f}, after "
          f"{flops_after / 1e9:.1f} GFLOP/s (a drop means other load grew during the runs)")
    print(f"{'system':<20}{'tokens/s':>10}{'trained tok/s':>15}{'trained tok/CPU-s':>19}{'ref pass s':>12}"
          f"{'peak RSS MiB':>14}{'wall s':>9}")
    table = {}
    for name, result in results.items():
        all_rate, trained_rate = rates(result, per_step)
        _, trained_cpu_rate = rates(result, per_step, "step_cpu_s")
        table[name] = {"tokens_per_s": all_rate, "trained_tokens_per_s": trained_rate,
                       "trained_tokens_per_cpu_s": trained_cpu_rate, **result}
        print(f"{name:<20}{all_rate:>10.1f}{trained_rate:>15.1f}{trained_cpu_rate:>19.1f}{result['reference_s']:>12.1f}"
              f"{result['peak_rss_mib']:>14.0f}{result['wall_s']:>9.0f}")
    summary = {"load_average": os.getloadavg()[0], "threads": args.threads, "systems": table,
               "matmul_flops_before": flops_before, "matmul_flops_after": flops_after}
    trl_names = [n for n in table if n.startswith("trl/")]
    if trl_names:
        ours = table["posttrain"]
        best = max(trl_names, key=lambda n: table[n]["trained_tokens_per_s"])
        ratio = ours["trained_tokens_per_s"] / table[best]["trained_tokens_per_s"]
        memory = ours["peak_rss_mib"] / table[best]["peak_rss_mib"]
        cpu_ratio = ours["trained_tokens_per_cpu_s"] / table[best]["trained_tokens_per_cpu_s"]
        drift_free = ((ours["trained_tokens_per_s"] / ours["matmul_gflops_around"])
                      / (table[best]["trained_tokens_per_s"] / table[best]["matmul_gflops_around"]))
        print(f"\nposttrain / fastest TRL ({best}): {ratio:.2f}x trained tokens/s (wall), {cpu_ratio:.2f}x per "
              f"CPU-second, peak RSS {memory:.2f}x (target: >= 2x speed at <= 1.0x memory); "
              f"{drift_free:.2f}x per GFLOP/s of the matmul rate measured around each run "
              f"({ours['matmul_gflops_around']:.0f} and {table[best]['matmul_gflops_around']:.0f} GFLOP/s)")
        summary["ratio_per_matmul_rate"] = drift_free
        diffs = [abs(a - b) for a, b in zip(ours["losses"], table[best]["losses"])]
        print("loss per step (posttrain | " + " | ".join(trl_names) + "):")
        for k, loss in enumerate(ours["losses"]):
            others = " | ".join(f"{table[n]['losses'][k]:.4f}" if k < len(table[n]["losses"]) else "-"
                                for n in trl_names)
            print(f"  step {k + 1}: {loss:.4f} | {others}")
        print(f"loss curves vs {best}: max absolute difference {max(diffs):.4f} nats, mean {sum(diffs) / len(diffs):.4f}")
        summary.update(best_trl=best, speed_ratio=ratio, cpu_speed_ratio=cpu_ratio, memory_ratio=memory, loss_abs_diff_max=max(diffs),
                       loss_abs_diff_mean=sum(diffs) / len(diffs))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
