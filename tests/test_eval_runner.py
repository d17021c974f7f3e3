"""The eval runner: metrics by hand on canned completions, then the real path on a tiny model."""

import json
import math

import pytest
import torch

from posttrain.errors import ConfigError
from posttrain.eval.runner import evaluate_task, format_table
from posttrain.eval.tasks import load_jsonl
from posttrain.rollout.base import Completion, SamplingParams


class CannedEngine:
    """Returns fixed completion texts per prompt (n per prompt, in order)."""

    def __init__(self, texts_per_prompt):
        self.texts_per_prompt = texts_per_prompt
        self.seen = None

    def generate(self, prompt_ids, params):
        self.seen = prompt_ids
        out = []
        for i in range(len(prompt_ids)):
            for text in self.texts_per_prompt[i][: params.n]:
                out.append(Completion(i, [1] * len(text), text, "length" if text.endswith("...") else "stop"))
        return out


def test_metrics_by_hand(tmp_path, tokenizer):
    data = tmp_path / "math.jsonl"
    data.write_text('{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+3?", "answer": "5"}\n')
    task = load_jsonl(str(data))
    task.format_reward = __import__("posttrain.rewards.format", fromlist=["x"]).FormatReward(pattern=r"^####")
    engine = CannedEngine([["#### 2", "#### 3", "#### 2"], ["#### 5", "so 4...", "#### 4"]])
    result = evaluate_task(engine, tokenizer, task, SamplingParams(n=3, temperature=1.0), pass_k=(1, 2))
    m = result.metrics
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    # pass@2: prompt 0 (c=2 of 3) -> 1; prompt 1 (c=1) -> 1 - C(2,2)/C(3,2) = 2/3
    assert m["pass@2"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["maj@3"] == pytest.approx(0.5)  # "2" wins (right), "4" wins (wrong)
    assert m["format_rate"] == pytest.approx(5 / 6)
    assert m["response_len/clipped_frac"] == pytest.approx(1 / 6)
    assert [s["extracted"] for s in result.samples] == ["2", "3", "2", "5", "4", "4"]
    assert [s["sample"] for s in result.samples] == [0, 1, 2, 0, 1, 2]
    # the prompts went through the chat template
    assert tokenizer.decode(engine.seen[0]).rstrip().endswith("assistant")
    assert "1+1?" in tokenizer.decode(engine.seen[0])
    assert "pass@1=0.500" in format_table([result])


def test_perplexity_matches_transformers_loss(tmp_path, tiny_model, tokenizer):
    from posttrain.data.render import render_conversation
    from posttrain.eval.perplexity import perplexity

    messages = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, like the sea."}]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    result = perplexity(tiny_model, tokenizer, str(path))
    (sample,) = render_conversation(messages, tokenizer)
    ids = torch.tensor([sample.input_ids])
    labels = torch.where(torch.tensor([sample.loss_mask]) == 1, ids, torch.full_like(ids, -100))
    with torch.no_grad():
        reference = tiny_model(input_ids=ids, labels=labels).loss.item()
    assert result["tokens"] == sum(sample.loss_mask[1:])
    assert result["nll"] == pytest.approx(reference, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_config_errors_name_the_key(tmp_path):
    from posttrain.config import load_config
    from posttrain.config import EvalConfig

    with pytest.raises(ConfigError, match="tasks.0"):
        load_config(EvalConfig, None, ["tasks=[{name: reasoning_gym}]"])
    with pytest.raises(ConfigError, match="pass_k"):
        load_config(EvalConfig, None, ["tasks=[{name: humaneval}]", "pass_k=[2]"])
    with pytest.raises(ConfigError, match=r"tasks\.0\.(name|nme)"):
        load_config(EvalConfig, None, ["tasks=[{nme: humaneval}]"])


def test_posttrain_eval_end_to_end_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    from posttrain.cli import main

    chat = tmp_path / "val.jsonl"
    chat.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}]}) + "\n"
    )
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"""
run: {{name: tiny, output_dir: {tmp_path / 'runs'}}}
model: {{name: {tiny_model_dir}}}
device: cpu
sampling: {{n: 2, temperature: 1.0, max_new_tokens: 6, seed: 0}}
pass_k: [1, 2]
limit: 2
tasks:
  - {{name: humaneval}}
  - {{name: reasoning_gym, dataset: basic_arithmetic}}
  - {{name: perplexity, path: {chat}}}
"""
    )
    assert main(["eval", str(config), "code_timeout=5"]) == 0
    printed = capsys.readouterr().out
    assert "humaneval" in printed and "rg/basic_arithmetic" in printed and "ppl/val.jsonl" in printed
    out_dir = tmp_path / "runs" / "tiny" / "eval"
    results = json.loads((out_dir / "results.json").read_text())
    assert set(results["tasks"]) == {"humaneval", "rg/basic_arithmetic", "ppl/val.jsonl"}
    he = results["tasks"]["humaneval"]
    assert he["num_prompts"] == 2 and he["num_samples"] == 4 and he["pass@1"] == 0.0  # random weights
    assert he["pass@1/ci_low"] == 0.0 and he["pass@1/ci_high"] == pytest.approx(0.6576, abs=1e-4)  # Wilson 0 of 2
    assert results["headline_task"] == "humaneval" and "ppl/val.jsonl" not in results["per_problem"]
    assert len(results["per_problem"]["humaneval"]["ids"]) == 2 and results["per_problem"]["humaneval"]["pass@2"] == [0.0, 0.0]
    assert results["tasks"]["ppl/val.jsonl"]["ppl"] > 1000  # a random model is nearly uniform over 49k tokens
    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8
    assert {"prompt", "completion", "extracted", "score", "reference"} <= set(samples[0])
    assert (out_dir / "config.yaml").exists()


def test_posttrain_eval_shows_progress_lines_when_output_is_not_a_terminal(tmp_path, tiny_model_dir, capsys,
                                                                           monkeypatch):
    """Written to a log file (not a terminal), ``posttrain eval`` still says what it is doing:
    each task's generation counts its completions (a start line, lines at the interval, a
    last line), scoring and perplexity have a start and an end; stdout keeps only the table."""
    import posttrain.log
    from posttrain.cli import main

    monkeypatch.setattr(posttrain.log, "PLAIN_INTERVAL_S", 0.0)  # every report prints: the lines are countable
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + 1?", "answer": str(a + 1)}) + "\n" for a in range(5)))
    chat = tmp_path / "val.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(f"""
run: {{name: tiny, output_dir: {tmp_path / 'runs'}}}
model: {{name: {tiny_model_dir}}}
device: cpu
batch_size: 4
sampling: {{n: 2, temperature: 1.0, max_new_tokens: 3, seed: 0}}
tasks:
  - {{name: jsonl, path: {data}, label: sums, reward: math}}
  - {{name: perplexity, path: {chat}}}
""")
    assert main(["eval", str(config)]) == 0
    captured = capsys.readouterr()
    err = captured.err.splitlines()
    generate = [line.split("] ")[1].split()[0] for line in err if line.startswith("[eval sums: generate]")]
    assert generate[0] == "0/10" and generate[-1] == "10/10" and {"4/10", "8/10"} <= set(generate), err
    assert any(line.startswith("[eval sums: score 10 completions]  done in") for line in err), err
    assert any(line.startswith("[eval ppl/val.jsonl: perplexity]  done in") for line in err), err
    assert "[eval" not in captured.out and "sums" in captured.out

    monkeypatch.setattr(posttrain.log, "PLAIN_INTERVAL_S", 3600.0)
    assert main(["eval", str(config), "run.progress=false", "run.name=quiet"]) == 0
    assert "[eval" not in capsys.readouterr().err  # run.progress: false shows none


class SeededEngine:
    """Answers "2" (right for 1+1) or "3" by a coin that depends on the seed and the sample."""

    def generate(self, prompt_ids, params):
        import random

        rng = random.Random(params.seed)
        return [Completion(i, [1], "2" if rng.random() < 0.5 else "3", "stop")
                for i in range(len(prompt_ids)) for _ in range(params.n)]


def test_intervals_and_per_problem_scores_by_hand(tmp_path, tokenizer):
    """n = 1: accuracy's interval is Wilson's over the problems; per-problem scores keep the ids."""
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "1+1?", "answer": "2"}) + "\n" for i in range(4)))
    task = load_jsonl(str(data))
    result = evaluate_task(CannedEngine([["2"], ["3"], ["3"], ["3"]]), tokenizer, task,
                           SamplingParams(n=1, temperature=0.0), pass_k=(1,))
    m = result.metrics
    # Wilson 1/4: p = 0.25, z^2/n = 0.9604; centre 0.7302 / 1.9604 = 0.37247; half 0.32688
    assert m["accuracy"] == 0.25 and m["accuracy/ci_low"] == pytest.approx(0.04559, abs=1e-4)
    assert m["accuracy/ci_high"] == pytest.approx(0.69936, abs=1e-4)
    assert (m["pass@1/ci_low"], m["pass@1/ci_high"]) == (m["accuracy/ci_low"], m["accuracy/ci_high"])
    assert result.problems == {"ids": ["q0", "q1", "q2", "q3"], "accuracy": [1.0, 0.0, 0.0, 0.0],
                               "pass@1": [1.0, 0.0, 0.0, 0.0]}
    table = format_table([result])
    assert "accuracy [95% CI]" in table and "0.250 [0.046, 0.699]" in table and "95% interval over the n prompts" in table


def test_several_seeds_report_mean_spread_and_each_seed(tmp_path, tokenizer):
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n" for _ in range(6)))
    task = load_jsonl(str(data))
    sampling = SamplingParams(n=2, temperature=1.0)
    per_seed = [evaluate_task(SeededEngine(), tokenizer, task, sampling, pass_k=(1,), seeds=[seed]) for seed in (0, 1, 2)]
    result = evaluate_task(SeededEngine(), tokenizer, task, sampling, pass_k=(1,), seeds=[0, 1, 2])
    accuracies = [r.metrics["accuracy"] for r in per_seed]
    mean = sum(accuracies) / 3
    spread = (sum((a - mean) ** 2 for a in accuracies) / 2) ** 0.5
    assert result.metrics["accuracy"] == pytest.approx(mean) and result.metrics["accuracy/seed_std"] == pytest.approx(spread)
    assert result.metrics["seeds"] == 3 and result.metrics["num_samples"] == 36 and result.metrics["num_prompts"] == 6
    assert {seed: m["accuracy"] for seed, m in result.per_seed.items()} == dict(zip(("0", "1", "2"), accuracies))
    # a problem's score is its mean over seeds; the interval is over those problems
    assert result.problems["accuracy"] == pytest.approx(
        [sum(r.problems["accuracy"][i] for r in per_seed) / 3 for i in range(6)])
    assert result.metrics["accuracy/ci_low"] <= mean <= result.metrics["accuracy/ci_high"]
    assert [(s["seed"], s["sample"]) for s in result.samples if s["id"] == "1"] == [
        (0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]
    table = format_table([result])
    assert f"{mean:.3f}±{spread:.3f} [" in table
    assert (f"accuracy per seed: seed 0: {accuracies[0]:.3f}, seed 1: {accuracies[1]:.3f}, "
            f"seed 2: {accuracies[2]:.3f} (mean {mean:.3f}, spread {spread:.3f})") in table


def test_several_seeds_with_greedy_decoding_are_refused_in_one_line():
    from posttrain.config import EvalConfig, load_config

    with pytest.raises(ConfigError, match="sampling: seed lists 3 seeds but temperature is 0: greedy decoding"):
        load_config(EvalConfig, None, ["tasks=[{name: humaneval}]", "sampling.seed=[0, 1, 2]"])
    with pytest.raises(ConfigError, match="sampling.seed: a seed is listed twice"):
        load_config(EvalConfig, None, ["tasks=[{name: humaneval}]", "sampling.seed=[1, 1]", "sampling.temperature=1"])
    config = load_config(EvalConfig, None, ["tasks=[{name: humaneval}]", "sampling.seed=[0, 1]", "sampling.temperature=1"])
    assert config.sampling.seeds == [0, 1]
    assert load_config(EvalConfig, None, ["tasks=[{name: humaneval}]"]).sampling.seeds == [0]


def test_headline_task_names_a_task(tmp_path):
    from posttrain.config import EvalConfig, load_config
    from posttrain.eval.runner import check_headline_task

    tasks = "tasks=[{name: jsonl, path: a.jsonl, label: arith_tool}, {name: reasoning_gym, dataset: basic_arithmetic}]"
    assert check_headline_task(load_config(EvalConfig, None, [tasks])) == "arith_tool"
    named = load_config(EvalConfig, None, [tasks, "headline_task=rg/basic_arithmetic"])
    assert check_headline_task(named) == "rg/basic_arithmetic"
    with pytest.raises(ConfigError, match=r"headline_task: 'sub' is not a task of this config \(tasks: arith_tool, "
                                          r"rg/basic_arithmetic\)"):
        check_headline_task(load_config(EvalConfig, None, [tasks, "headline_task=sub"]))
