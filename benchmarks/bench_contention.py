"""Greedy generation beside busy processes: torch's default threads vs posttrain's thread policy.

Run: ``python benchmarks/bench_contention.py`` (a few minutes on an idle 2-core machine, 20 on
a busy one; ``--prompts`` and ``--max-new-tokens`` scale it). It times what the quickstart's
held-out evaluation does, scaled down: the bundled model (``smollm2-135m-instruct``, loaded
through ``posttrain.models`` in the dtype ``posttrain eval`` uses), the first ``--prompts``
held-out arithmetic prompts (``examples/data/rl_arithmetic_eval.jsonl``; default 8, where the
quickstart evaluates 100, so that six timed runs, some slowed several times over, stay short),
greedy, ``--max-new-tokens`` new tokens (default 48; 96 in the quickstart), all prompts in one
batch, with posttrain's HF engine (``posttrain.rollout.hf.HFEngine``).

Scenarios: alone, beside one busy single-threaded process, beside three (``--neighbours``).
Each neighbour is a Python busy loop started before the worker, so the policy sees it when it
samples the load, and stopped after. In each scenario every variant runs in a fresh process:

- ``default``: torch's own choice (one thread per core, OpenMP's default waiting), what every
  command did before the thread policy;
- ``policy``: ``posttrain.train.threads.configure_threads()`` called first, as every command does;
- ``one-thread`` (``--variants``): ``OMP_NUM_THREADS=1``;
- ``passive``: default threads with ``OMP_WAIT_POLICY=PASSIVE``.

The table gives the seconds of generation (model loading not counted), the threads used, the
1-minute load average when the worker started and ended (the machine is rarely idle: other
jobs' load shows there), and each variant's time over the ``default`` variant of the same
scenario and over ``default`` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "examples" / "data" / "rl_arithmetic_eval.jsonl"
VARIANT_ENV = {"default": {}, "policy": {}, "one-thread": {"OMP_NUM_THREADS": "1"},
               "passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def worker(args) -> dict:
    """One timed generation in this process; the policy is applied before torch loads."""
    plan_reason = "torch default"
    if args.worker == "policy":
        from posttrain.train.threads import configure_threads

        plan_reason = configure_threads().reason
    import torch

    from posttrain.data.render import render_prompt
    from posttrain.models import inference_dtype, load_model, load_tokenizer
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFEngine

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu", dtype=inference_dtype("cpu"))
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()[:args.prompts]]
    prompts = [render_prompt(row["prompt"], tokenizer) for row in rows]
    engine = HFEngine(model, tokenizer, batch_size=len(prompts))
    engine.generate(prompts[:1], SamplingParams(n=1, temperature=0.0, max_new_tokens=4))  # warm-up
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    completions = engine.generate(prompts, SamplingParams(n=1, temperature=0.0, max_new_tokens=args.max_new_tokens))
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "threads": torch.get_num_threads(), "plan": plan_reason,
            "wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_before": load_before,
            "load_after": os.getloadavg()[0], "new_tokens": sum(len(c.token_ids) for c in completions)}


def start_neighbours(count: int) -> list[subprocess.Popen]:
    """``count`` busy single-threaded processes (a Python loop each)."""
    return [subprocess.Popen([sys.executable, "-c", "while True:\n    pass"]) for _ in range(count)]


def stop_neighbours(neighbours: list[subprocess.Popen]) -> None:
    for process in neighbours:
        process.kill()
        process.wait()


def run_variant(variant: str, args) -> dict:
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "POSTTRAIN_THREADS")}
    environment.update(PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                       **VARIANT_ENV[variant])
    command = [sys.executable, __file__, "--worker", variant, "--prompts", str(args.prompts),
               "--max-new-tokens", str(args.max_new_tokens), "--model", args.model]
    done = subprocess.run(command, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    alone = {r["variant"]: r["seconds"] for r in results if r["neighbours"] == 0}
    header = (f"{'neighbours':>10}  {'variant':<10}  {'threads':>7}  {'gen s':>7}  {'vs default':>10}  "
              f"{'vs alone':>8}  {'load start/end':>14}  wait policy")
    lines = [header, "-" * len(header)]
    for r in results:
        same = next(x["seconds"] for x in results if x["neighbours"] == r["neighbours"] and x["variant"] == "default")
        base = alone.get("default")
        lines.append(f"{r['neighbours']:>10}  {r['variant']:<10}  {r['threads']:>7}  {r['seconds']:>7.1f}  "
                     f"{r['seconds'] / same:>9.2f}x  {(r['seconds'] / base if base else float('nan')):>7.2f}x  "
                     f"{r['load_before']:>6.2f}/{r['load_after']:<7.2f}  {r['wait_policy']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--neighbours", default="0,1,3", help="comma-separated numbers of busy processes")
    parser.add_argument("--variants", default="default,policy", help=f"comma-separated, from {', '.join(VARIANT_ENV)}")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds the neighbours run before a worker starts")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", choices=list(VARIANT_ENV), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANT_ENV]
    if unknown or "default" not in variants:
        raise SystemExit(f"--variants: choose from {', '.join(VARIANT_ENV)}, including default (got {args.variants})")
    print(f"{args.prompts} prompts, greedy, {args.max_new_tokens} new tokens, {os.cpu_count()} cores; "
          f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for count in (int(n) for n in args.neighbours.split(",")):
        neighbours = start_neighbours(count)
        try:
            time.sleep(args.settle if count else 0.0)
            for variant in variants:
                result = {"neighbours": count, "variant": variant, **run_variant(variant, args)}
                results.append(result)
                print(f"  {count} busy, {variant}: {result['seconds']:.1f} s with {result['threads']} threads "
                      f"(load {result['load_before']:.2f}; {result['plan']})", flush=True)
        finally:
            stop_neighbours(neighbours)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
