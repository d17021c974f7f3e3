"""`posttrain inspect`: the coloured/bracketed mask view, the summary, the exit status, the files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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


# ----------------------------------------------------------------------------- configs of every command, bad rows and wrong-way errors
HINT = "--skip-bad counts and skips bad rows"


def test_only_a_bad_row_carries_the_skip_bad_hint(tokenizer, tmp_path, capsys):
    """A missing file, a directory, an unreadable file or a setting cannot be skipped row by row."""
    good = json.dumps({"messages": [{"role": "user", "content": "Pick a fruit."}, {"role": "assistant", "content": "Mango."}]})
    (tmp_path / "folder").mkdir()
    (tmp_path / "latin1.json").write_bytes(b'[{"prompt": "caf\xe9", "completion": "ok"}]')
    (tmp_path / "long.jsonl").write_text(good + "\n")
    file_level = {
        str(tmp_path / "absent.jsonl"): f"error: data file {tmp_path / 'absent.jsonl'} does not exist",
        str(tmp_path / "folder"): f"error: {tmp_path / 'folder'}: not a datasets directory saved with save_to_disk",
        str(tmp_path / "latin1.json"): f"error: {tmp_path / 'latin1.json'}:1: not UTF-8 text (invalid continuation byte "
                                       f"(0xe9 0x22) at byte offset 16 of the file, column 17)",
    }
    for path, message in file_level.items():
        assert main(["inspect", path, "-n", "0"]) == 1
        err = capsys.readouterr().err
        assert err.startswith(message) and HINT not in err and err.count("\n") == 1
    assert main(["inspect", str(tmp_path / "long.jsonl"), "--max-length", "4", "--truncation", "error"]) == 1
    err = capsys.readouterr().err
    assert "more than data.max_length=4" in err and HINT not in err
    bad_row = tmp_path / "row.jsonl"
    bad_row.write_text(good + "\n" + good.replace("Mango.", "") + "\n")
    assert main(["inspect", str(bad_row), "-n", "0"]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: {bad_row}:2: messages[1]: empty assistant reply (blank content and no tool calls)\n"
                   f"(stopped at the first bad row; {HINT})\n")


def test_invalid_utf8_line_is_named_and_skipped(tokenizer, tmp_path, capsys):
    rows = [json.dumps({"messages": [{"role": "user", "content": f"Number {k}?"}, {"role": "assistant", "content": str(k)}]})
            for k in range(6)]
    data = "\n".join(rows).encode().replace(b"Number 4", b"Numb\xf0\x9f\x98er 4") + b"\n"  # a 4-byte lead cut short
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(data)
    offset = data.index(b"\xf0")
    column = offset - data.rindex(b"\n", 0, offset)
    assert main(["inspect", str(path), "-n", "0"]) == 1
    assert (f"error: {path}:5: not UTF-8 text (invalid continuation byte (0xf0 0x9f 0x98 0x65) at byte offset "
            f"{offset} of the file, column {column})") in capsys.readouterr().err
    assert main(["inspect", str(path), "-n", "0", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "rows 5, samples 5" in out and "bad rows skipped: 1  (line 5)" in out


def write_config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("shipped", ["sft_quickstart.yaml", "rm_quickstart.yaml", "grpo_quickstart.yaml",
                                     "ppo_quickstart.yaml", "quickstart.yaml"])
def test_every_shipped_training_config_is_accepted(tokenizer, capsys, shipped):
    assert main(["inspect", "--config", str(ROOT / "configs" / shipped), "--limit", "4", "-n", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ok"] and summary["rows"] == 4


def test_rl_reward_model_dpo_and_pipeline_configs_audit_their_own_data(tokenizer, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "What is 6 * 7?", "answer": "42"}, {"prompt": "   ", "answer": "0"},
        {"messages": [{"role": "user", "content": "Spell 'cat' backwards."}], "answer": "tac"}]) + "\n")
    rl = write_config(tmp_path / "rl.yaml", f"data:\n  train: {prompts}\n  eval: {prompts}\n  system: Answer briefly.\n"
                                            "rollout:\n  group_size: 4\nreward: math\nrl:\n  algorithm: rloo\n")
    assert main(["inspect", "--config", rl, "-n", "1", "--color", "never"]) == 1
    assert f"error: {prompts}:2: prompt is empty" in capsys.readouterr().err
    assert main(["inspect", "--config", rl, "-n", "1", "--color", "never", "--skip-bad", "--max-length", "30"]) == 0
    out = capsys.readouterr().out
    assert "Answer briefly." in out and "[[" not in out  # a prompt is context only
    assert "rows 2, prompts 2" in out and "bad rows skipped: 1  (line 2)" in out
    assert main(["inspect", "--config", rl, "--truncation", "drop"]) == 2
    assert "error: inspect: data.truncation does not apply to RL prompts" in capsys.readouterr().err

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "Capital of Chile?", "chosen": "Santiago.", "rejected": "Lima."},
        {"prompt": "Capital of Chile?", "chosen": "Santiago.", "rejected": "Santiago."}]) + "\n")
    rm = write_config(tmp_path / "rm.yaml", f"data:\n  train: {pairs}\nrm:\n  margin_key: null\n")
    assert main(["inspect", "--config", rm, "-n", "2", "--color", "never"]) == 1
    err = capsys.readouterr().err
    assert f"error: {pairs}:2: chosen and rejected are the same response" in err and HINT in err
    assert main(["inspect", "--config", rm, "-n", "2", "--color", "never", "--skip-bad"]) == 0
    out = capsys.readouterr().out
    assert "sample 0 (chosen)" in out and "[[Santiago.<|im_end|>]]" in out and "[[Lima.<|im_end|>]]" in out
    assert "rows 1, samples 2" in out and "bad rows skipped: 1  (line 2)" in out

    dpo = write_config(tmp_path / "dpo.yaml", f"data:\n  train: {pairs}\n  skip_bad: true\ndpo:\n  beta: 0.2\n")
    assert main(["inspect", "--config", dpo, "-n", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 2 and summary["bad_rows_skipped"]["count"] == 1

    pipeline = write_config(tmp_path / "pipe.yaml", f"rm:\n  data:\n    train: {pairs}\n    skip_bad: true\n"
                                                    f"rl:\n  data:\n    train: {prompts}\n")
    assert main(["inspect", "--config", pipeline, "-n", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
    assert main(["inspect", "--config", pipeline, "--stage", "rl", "-n", "0", "--json", "--skip-bad"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "prompts"
    assert main(["inspect", "--config", pipeline, "--stage", "sft"]) == 2
    assert "has no such training stage (stages: rm, rl)" in capsys.readouterr().err


@pytest.mark.parametrize("rows, kind, note", [
    ([{"prompt": "Capital of Chile?", "chosen": "Santiago.", "rejected": "Lima."}], "dpo",
     "its rows are preference pairs, audited as `posttrain dpo` (and rm) reads them"),
    ([{"prompt": "What is 6 * 7?", "answer": "42"}], "rl", "its rows are RL prompts, audited as `posttrain rl` reads them"),
])
def test_a_config_without_a_trainer_section_is_audited_as_its_rows_trainer(rows, kind, note, tokenizer, tmp_path,
                                                                           capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = write_config(tmp_path / "standalone.yaml", f"data:\n  train: {data}\noptim:\n  lr: 1.0e-6\n")
    assert main(["inspect", "--config", config, "-n", "0", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines()[0] == f"inspect: {config} names no trainer section; {note}"
    summary = json.loads(captured.out.splitlines()[0])
    assert summary["kind"] == ("prompts" if kind == "rl" else summary["kind"]) and summary["ok"]
    assert summary["samples" if kind == "dpo" else "rows"] == (2 if kind == "dpo" else 1)  # a pair is two samples


def test_rl_rows_with_a_question_column_get_the_data_columns_hint(tokenizer, tmp_path, capsys):
    data = tmp_path / "gsm.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "4"}) + "\n")
    config = write_config(tmp_path / "rl.yaml", f"data:\n  train: {data}\nreward: math\n")
    assert main(["inspect", "--config", config, "-n", "0"]) == 1
    assert capsys.readouterr().err.splitlines()[0] == (
        f"error: {data}:1: an RL prompt row needs a 'messages' or 'prompt' key (keys: answer, question); "
        f"map it with data.columns: {{prompt: question}} (data.columns.prompt=question)")
    config = write_config(tmp_path / "rl.yaml", f"data:\n  train: {data}\n  columns:\n    prompt: question\nreward: math\n")
    assert main(["inspect", "--config", config, "-n", "0"]) == 0


def test_inspect_data_doctests():
    import doctest

    from posttrain import inspect_data

    assert doctest.testmod(inspect_data).failed == 0
