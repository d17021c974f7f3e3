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
