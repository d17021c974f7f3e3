"""The hf engine's two decode paths side by side: transformers' ``generate`` (every row stays in
the batch until the last one ends) against ``posttrain.rollout.decode`` (finished rows leave the
batch), on the same prompts, in the same process, alternating, with the same thread count.

Two jobs, the ones the quickstart runs:
- ``rollout``: RL groups, ``--prompts`` prompts x ``--group-size`` samples at temperature 1,
  ``--rollout-tokens`` new tokens at most (the quickstart's GRPO step);
- ``eval``: greedy, ``--eval-prompts`` held-out prompts in one batch, ``--eval-tokens`` at most
  (the quickstart's evaluations). Greedy ids must be the same on both paths; the share that is
  identical is printed (a row can differ only where two logits tie within rounding).

Third, ``agentic``: the first turns of the agentic demos' evaluations, greedy, with the prefix
every prompt shares (the system turn; the tool schema with ``tool_format: chat_template``)
prefilled once against prefilled with every row; then whole agent trajectories of the same
prompts, each turn prefilled whole against reusing the keys/values of the last turn's rows.

Run: ``python benchmarks/bench_generate.py [--model DIR]`` (default: the bundled
SmolLM2-135M-Instruct; pass an SFT checkpoint to time the short answers a trained model gives).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from machine import machine_line

REPO = Path(__file__).resolve().parents[1]


def _prompts(tokenizer, count: int, offset: int = 0) -> list[list[int]]:
    from posttrain.data.render import render_prompt

    rows = [json.loads(line) for line in (REPO / "examples/data/rl_arithmetic_eval.jsonl").read_text().splitlines()]
    return [render_prompt(row["prompt"], tokenizer) for row in rows[offset : offset + count]]


def _time(engine, prompts, params, repeats: int) -> tuple[list[float], list]:
    seconds, out = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        out = engine.generate(prompts, params)
        seconds.append(time.perf_counter() - started)
    return seconds, out


def kernel_table(rows=(8, 36, 100, 1316), shapes=((576, 1536), (1536, 576), (576, 49152))) -> None:
    """The matmul of one linear layer at decode's and training's row counts: ``nn.Linear``'s
    row-major [out, in] weight against a contiguous [in, out] copy (``rollout.prepacked``)."""
    def best_of(run, repeats: int = 20) -> float:
        run()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            times.append(time.perf_counter() - started)
        return min(times)

    with torch.no_grad():
        for count in rows:
            for inputs, outputs in shapes:
                x, weight = torch.randn(count, inputs), torch.randn(outputs, inputs)
                transposed = weight.t().contiguous()
                linear = best_of(lambda: torch.nn.functional.linear(x, weight))
                packed = best_of(lambda: x @ transposed)
                rate = 2 * count * inputs * outputs / 1e9
                print(f"kernel  {count:5d} rows x [{inputs} -> {outputs}]: nn.Linear {linear * 1e3:7.2f} ms "
                      f"({rate / linear:4.0f} GFLOP/s), transposed copy {packed * 1e3:7.2f} ms "
                      f"({rate / packed:4.0f} GFLOP/s); {packed / linear:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: the bundled model)")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--group-size", type=int, default=6)
    parser.add_argument("--rollout-tokens", type=int, default=48)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.models import resolve_model_dir
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFEngine

    directory = args.model or str(resolve_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    print(machine_line())
    print(f"model {directory}, fp32, {torch.get_num_threads()} threads")
    kernel_table()
    jobs = {
        "rollout": (_prompts(tokenizer, args.prompts, offset=0),
                    SamplingParams(n=args.group_size, temperature=1.0, max_new_tokens=args.rollout_tokens, seed=0,
                                   return_logprobs=True)),
        "eval": (_prompts(tokenizer, args.eval_prompts),
                 SamplingParams(n=1, temperature=0.0, max_new_tokens=args.eval_tokens)),
    }
    engines = {"generate": HFEngine(model, tokenizer, batch_size=128, compact=False, prepack=False),
               "decode": HFEngine(model, tokenizer, batch_size=128, compact=True, prepack=True)}
    for job, (prompts, params) in jobs.items():
        results = {name: _time(engine, prompts, params, args.repeats) for name, engine in engines.items()}
        lengths = {name: statistics.mean(len(c.token_ids) for c in out) for name, (_, out) in results.items()}
        medians = {name: statistics.median(seconds) for name, (seconds, _) in results.items()}
        line = (f"{job:8s} {len(prompts)} prompts x {params.n}, <= {params.max_new_tokens} tokens: "
                f"generate {medians['generate']:.2f} s (mean length {lengths['generate']:.1f}, "
                f"max {max(len(c.token_ids) for c in results['generate'][1])}), "
                f"decode {medians['decode']:.2f} s (mean length {lengths['decode']:.1f}); "
                f"decode/generate {medians['decode'] / medians['generate']:.2f}x")
        if params.temperature == 0:
            same = sum(a.token_ids == b.token_ids for a, b in zip(results["generate"][1], results["decode"][1]))
            line += f"; greedy ids identical {same}/{len(prompts)}"
        print(line)
    agentic_prefill(model, tokenizer, args.repeats)
    agentic_turns(model, tokenizer, args.repeats)


def _agent(config_path: str, tokenizer, count: int):
    """An agentic demo's agent (its template, its tools) and its first ``count`` held-out prompts."""
    import copy

    from posttrain.agent.build import build_agent
    from posttrain.config import PipelineConfig, read_config_file, validate_config

    config = validate_config(PipelineConfig, read_config_file(REPO / config_path), config_path)
    tokenizer = copy.deepcopy(tokenizer)
    if config.model.chat_template:
        tokenizer.chat_template = (REPO / config.model.chat_template).read_text()
    agent = build_agent(config.rl.agent, tokenizer, max_new_tokens=config.rl.rollout.max_new_tokens)
    rows = [json.loads(line) for line in (REPO / "examples/data/agentic_eval.jsonl").read_text().splitlines()]
    return agent, [agent.prompt(row["messages"], None, {}, f"row{i}") for i, row in enumerate(rows[:count])]


def _agent_prompts(config_path: str, tokenizer, count: int) -> list[list[int]]:
    """The first-turn prompts an agentic demo's evaluation renders."""
    return [prompt.prompt_ids for prompt in _agent(config_path, tokenizer, count)[1]]


def agentic_turns(model, tokenizer, repeats: int, count: int = 50) -> None:
    """Whole greedy agent trajectories (call, tool output, answer) of the agentic demos'
    evaluations: each turn prefilled whole, or reusing the keys/values of the last turn's rows
    (``rollout.kv_reuse``). The trajectories must be the same."""
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFEngine

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=48)
    engines = {"prefill": HFEngine(model, tokenizer, batch_size=128, reuse_kv=False),
               "reuse": HFEngine(model, tokenizer, batch_size=128, reuse_kv=True)}
    for config in ("configs/agentic_quickstart.yaml", "configs/agentic_chat_template.yaml"):
        agent, prompts = _agent(config, tokenizer, count)
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        out = {}
        for _ in range(repeats):
            for name, engine in engines.items():
                started = time.perf_counter()
                out[name] = agent.run(engine, prompts, params)
                seconds[name].append(time.perf_counter() - started)
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        same = sum([s.token_ids for s in a.segments] == [s.token_ids for s in b.segments]
                   for a, b in zip(out["prefill"], out["reuse"]))
        turns = statistics.mean(t.turns for t in out["reuse"])
        print(f"agentic {Path(config).stem} trajectories: {len(prompts)} prompts, {turns:.1f} turns on average; "
              f"every turn prefilled {medians['prefill']:.2f} s, last turn's keys/values reused "
              f"{medians['reuse']:.2f} s: {medians['reuse'] / medians['prefill']:.2f}x; "
              f"trajectories identical {same}/{len(prompts)}")


def agentic_prefill(model, tokenizer, repeats: int, count: int = 50) -> None:
    """Greedy first turns of the agentic demos' evaluations, the prefix every prompt shares (the
    system turn; with chat_template also the tool schema) prefilled once or with every row."""
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFEngine, common_prefix_length

    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=48)
    engines = {"whole": HFEngine(model, tokenizer, batch_size=128, share_common_prefix=False, reuse_kv=False),
               "shared": HFEngine(model, tokenizer, batch_size=128, share_common_prefix=True, reuse_kv=False)}
    for config in ("configs/agentic_quickstart.yaml", "configs/agentic_chat_template.yaml"):
        prompts = _agent_prompts(config, tokenizer, count)
        results = {name: _time(engine, prompts, params, repeats) for name, engine in engines.items()}
        medians = {name: statistics.median(seconds) for name, (seconds, _) in results.items()}
        same = sum(a.token_ids == b.token_ids for a, b in zip(results["whole"][1], results["shared"][1]))
        print(f"agentic {Path(config).stem}: {len(prompts)} prompts of mean {statistics.mean(map(len, prompts)):.0f} "
              f"tokens, {common_prefix_length(prompts)} shared; prefill whole {medians['whole']:.2f} s, "
              f"shared prefix {medians['shared']:.2f} s: {medians['shared'] / medians['whole']:.2f}x; "
              f"greedy ids identical {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
