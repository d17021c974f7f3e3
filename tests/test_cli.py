"""The CLI: help lists commands, user errors are one line without traceback."""

import subprocess
import sys

import pytest

from posttrain.cli import main


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "chat" in out


def test_chat_missing_model_dir_is_one_line_no_traceback():
    result = run_cli("chat", "--model", "/no/such/dir", "hi")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: model /no/such/dir not found")
    assert "Traceback" not in result.stderr


def test_chat_renders_template_and_prints_greedy_reply(tiny_model_dir, capsys):
    """The reply equals plain transformers greedy decoding of the chat-templated prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["chat", "--model", tiny_model_dir, "--max-new-tokens", "6", "hello"]) == 0
    printed = capsys.readouterr().out

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert printed == expected + "\n"


@pytest.mark.parametrize("name, module, runner, config_class, section", [
    ("sft", "posttrain.train.sft", "run_sft", "SFTConfig", "data:\n  train: rows.jsonl\n"),
    ("rm", "posttrain.train.rm", "run_rm", "RMConfig", "data:\n  train: pairs.jsonl\n"),
    ("rl", "posttrain.train.rl", "run_rl", "RLConfig", "data:\n  train: prompts.jsonl\n"),
    ("eval", "posttrain.eval.runner", "run_eval", "EvalConfig", "tasks:\n  - name: humaneval\n"),
])
def test_training_commands_load_config_with_overrides_and_call_their_runner(tmp_path, monkeypatch, name, module,
                                                                             runner, config_class, section):
    """``posttrain NAME CONFIG key=value`` validates the file + overrides into the command's
    config and hands it to the trainer (replaced here by a recorder)."""
    import importlib

    seen = []
    monkeypatch.setattr(importlib.import_module(module), runner, seen.append)
    path = tmp_path / "c.yaml"
    path.write_text(section + "run:\n  name: from-file\n")
    assert main([name, str(path), "run.output_dir=elsewhere"]) == 0
    (config,) = seen
    assert type(config).__name__ == config_class
    assert (config.run.name, config.run.output_dir) == ("from-file", "elsewhere")


@pytest.mark.parametrize("name", ["sft", "rm", "rl"])
def test_a_config_directory_is_named_as_a_directory(tmp_path, capsys, name):
    assert main([name, str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: config file {tmp_path} is a directory; give one YAML config file\n"


def test_output_into_a_closed_pipe_ends_quietly():
    """`posttrain config rl | head -1`: the reader has gone; no BrokenPipeError traceback."""
    import os

    read_end, write_end = os.pipe()
    os.close(read_end)  # every write of the child fails with EPIPE
    try:
        child = subprocess.run([sys.executable, "-m", "posttrain", "config", "rl"], stdout=write_end,
                               stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert child.returncode == 141 and "Traceback" not in child.stderr, child.stderr
