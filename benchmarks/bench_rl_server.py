"""The GRPO quickstart with the rollouts on a vLLM server, synchronous and asynchronous, beside
the in-process engine: time per step, the share of it spent generating, the engine/trainer
mismatch metrics and held-out accuracy after the run.

Run in the vLLM environment (``make vllm-env``)::

    .venv-vllm/bin/python benchmarks/bench_rl_server.py            # the quickstart's 40 steps
    .venv-vllm/bin/python benchmarks/bench_rl_server.py --steps 10 --variants server0 server1

Variants (``--variants``): ``hf`` (transformers generate on the policy module itself, the
quickstart as shipped), ``server0`` (``rollout.engine: vllm_server``, a server posttrain starts
on this machine, ``rl.max_staleness: 0``) and ``server1`` (the same with ``max_staleness: 1``:
the next step's rollouts are generated while the trainer updates). Each runs
``configs/grpo_quickstart.yaml`` in this process, one after the other, into a fresh run
directory under ``--out``; the mismatch correction is the default (``auto``: truncated IS for
the server). On a 2-core CPU the server and the trainer share the cores, so asynchronous
steps overlap two jobs that compete for them: the figure shows what that costs or saves here,
not what separate machines would give. The CPU's flags and the load average are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from machine import machine_line

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "hf": [],
    "server0": ["rollout.engine=vllm_server", "rl.max_staleness=0"],
    "server1": ["rollout.engine=vllm_server", "rl.max_staleness=1"],
}




def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarise(run_dir: Path) -> dict[str, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [line for line in lines if "step_time_s" in line]
    evals = [line for line in lines if "eval/acc" in line]
    counted = steps[1:] or steps  # the first step carries the start (compilation, the first batch)
    out = {
        "steps": len(steps),
        "step_s": mean([s["step_time_s"] for s in counted]),
        "generate_share": sum(s["time/generate"] for s in counted) / sum(s["step_time_s"] for s in counted),
        "weight_sync_s": mean([s.get("time/weight_sync", 0.0) for s in counted]),
        "acc_before": evals[0]["eval/acc"] if evals else float("nan"),
        "acc_after": evals[-1]["eval/acc"] if evals else float("nan"),
    }
    for key in ("mismatch/kl_k3", "mismatch/is_ratio/mean", "mismatch/truncated_frac", "logprob_gap/mean_abs",
                "staleness/mean"):
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = mean(values)
    for key, pick in (("mismatch/is_ratio/min", min), ("mismatch/is_ratio/max", max)):
        values = [s[key] for s in steps if key in s]
        if values:
            out[key] = pick(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the quickstart's)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default="runs/bench_rl_server")
    parser.add_argument("--json", default=None, help="write the table here too")
    args = parser.parse_args()
    os.chdir(REPO)
    from posttrain.config import RLConfig, load_config
    from posttrain.train.rl import run_rl

    stamp = time.strftime("%Y%m%d-%H%M%S")
    print(f"# GRPO quickstart, rollout engines side by side; {machine_line()}", flush=True)
    table: dict[str, dict[str, float]] = {}
    for name in args.variants:
        overrides = [f"run.output_dir={args.out}", f"run.name={name}-{stamp}", "run.progress=false",
                     f"rollout.server_python={sys.executable}", *VARIANTS[name]]
        if args.steps is not None:
            overrides += [f"train.max_steps={args.steps}", f"train.save_every={args.steps}"]
        config = load_config(RLConfig, "configs/grpo_quickstart.yaml", overrides)
        started = time.perf_counter()
        result = run_rl(config)
        table[name] = {**summarise(result.run_dir), "wall_s": time.perf_counter() - started}
        print(name, json.dumps(table[name]), flush=True)
    keys = ["steps", "step_s", "generate_share", "weight_sync_s", "acc_before", "acc_after", "mismatch/kl_k3",
            "mismatch/is_ratio/min", "mismatch/is_ratio/max", "mismatch/truncated_frac", "logprob_gap/mean_abs",
            "staleness/mean", "wall_s"]
    print("\n| variant | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for name, row in table.items():
        cells = [f"{row[k]:.4g}" if k in row else "-" for k in keys]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if "hf" in table:
        for name in table:
            if name != "hf":
                print(f"{name}: step time {table[name]['step_s'] / table['hf']['step_s']:.2f}x the in-process engine's")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
