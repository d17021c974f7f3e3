"""`posttrain inspect`: the coloured/bracketed mask view, the summary, the exit status, the files."""

from __future__ import annotations

import json
from pathlib import Path

from posttrain.cli import main

ROOT = Path(__file__).resolve().parent.parent
TOOL_USE = str(ROOT / "examples" / "data" / "tool_use.jsonl")
BROKEN = str(ROOT / "examples" / "data" / "broken.jsonl")
QWEN = str(ROOT / "tests" / "templates" / "qwen_tools.jinja")


def test_tool_use_file_with_tool_template_shows_mask_and_exits_0(tokenizer, capsys):
    assert main(["inspect", TOOL_USE, "--chat-template", QWEN, "-n", "2", "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[30;42m" in out and "\x1b[30;102m" in out  # trained tokens in green
    assert "‹assistant (trained)›" in out and "‹tool›" in out and "‹generation prompt›" in out
    assert "sample 1 · " in out and "sample 2 · " not in out
    assert "rows 6, samples 6" in out and "masked_token_ratio per sample: min" in out and "result: OK" in out


def test_plain_view_brackets_exactly_the_assistant_text(tokenizer, capsys):
    assert main(["inspect", TOOL_USE, "--chat-template", QWEN, "-n", "1", "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert "[[Yes: light rain is expected in Lisbon (80% chance), 17 °C. Take an umbrella.<|im_end|>]]" in out
    assert '[[<tool_call>↵\n{"name": "get_weather", "arguments": {"city": "Lisbon", "unit": "celsius"}}↵\n</tool_call><|im_end|>]]' in out
    assert "[[" not in out.split("‹tool›")[1].split("‹generation prompt›")[0]  # the tool result is context


def test_bundled_template_reports_dropped_tool_calls_per_line(tokenizer, capsys):
    assert main(["inspect", TOOL_USE, "-n", "0"]) == 1
    err = capsys.readouterr().err
    assert f"error: {TOOL_USE}:1: the chat template drops tool calls (messages[2] calls get_weather" in err
    assert main(["inspect", TOOL_USE, "-n", "0", "--skip-bad"]) == 1
    out = capsys.readouterr().out
    assert "bad rows skipped: 6  (lines 1, 2, 3, 4, 5, 6)" in out and "no usable training sample  <- hard error" in out


def test_broken_file_exits_1_naming_the_line(tokenizer, capsys):
    assert main(["inspect", BROKEN]) == 1
    err = capsys.readouterr().err
    assert f"{BROKEN}:3: malformed JSON" in err
    assert main(["inspect", BROKEN, "--skip-bad", "-n", "1"]) == 1
    out = capsys.readouterr().out
    assert "bad rows skipped: 2  (lines 3, 4)" in out and "unknown role 'narrator'" in out
    assert "empty masks: 1  (line 5)  <- hard error" in out and "result: 1 hard error(s)" in out


def test_json_html_and_dump(tokenizer, tmp_path, capsys):
    html_path, dump_path = tmp_path / "view.html", tmp_path / "dump.jsonl"
    code = main(["inspect", TOOL_USE, "--chat-template", QWEN, "--json", "--html", str(html_path), "--dump", str(dump_path)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)  # stdout is exactly one JSON object
    assert summary["ok"] and summary["samples"] == 6 and summary["hard_errors"] == 0
    assert len(summary["masked_token_ratio"]["histogram"]) == 10
    records = [json.loads(line) for line in dump_path.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(len(r["input_ids"]) == len(r["loss_mask"]) for r in records)
    assert sum(sum(r["loss_mask"]) for r in records) == summary["trained_tokens"]
    assert len(records[5]["weights"]) == len(records[5]["input_ids"]) and "weights" not in records[0]
    page = html_path.read_text()
    assert page.startswith("<!doctype html>") and 'class="tok trained"' in page and "<script" not in page
    assert main(["inspect", BROKEN, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_options_from_a_training_config(tokenizer, tmp_path, capsys):
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model:\n  chat_template: {QWEN}\ndata:\n  train: {TOOL_USE}\n  max_length: 300\n  train_tool_calls: false\n"
        "train:\n  epochs: 2\n"
    )
    assert main(["inspect", "--config", str(config), "-n", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["truncated"]["count"] > 0
    assert main(["inspect", "--config", str(config), "--max-length", "5000", "-n", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["truncated"]["count"] == 0
    assert main(["inspect", TOOL_USE, "--max-length", "1"]) == 2  # config validation: one-line error, status 2
    assert "data.max_length" in capsys.readouterr().err
