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
    config and hands it to the trainer (replaced here by a recorder) through the Python API."""
    import importlib
    from types import SimpleNamespace

    seen = []

    def record(config, **options):
        seen.append(config)
        return [] if name == "eval" else SimpleNamespace(run_dir=tmp_path, final_dir=None, steps=0, history=[],
                                                         val_metrics={}, eval_after={}, eval_before={})

    monkeypatch.setattr(importlib.import_module(module), runner, record)
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


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_a_training_command_without_a_config_file_takes_overrides_over_the_defaults(tmp_path, capsys):
    """No YAML: ``posttrain sft data.train=x.jsonl ...``; /dev/null and an empty file are empty
    configs; flags and overrides in any order."""
    data = str(REPO / "examples/data/sft_arithmetic.jsonl")
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    for argv in (["sft", f"data.train={data}", "--dry-run", f"run.output_dir={tmp_path}", "data.limit=4"],
                 ["sft", "/dev/null", "--dry-run", f"data.train={data}", f"run.output_dir={tmp_path}", "data.limit=4"],
                 ["sft", "--dry-run", str(empty), f"data.train={data}", f"run.output_dir={tmp_path}", "data.limit=4"]):
        assert main(argv) == 0, argv
        out = capsys.readouterr().out
        assert f"  data      {data}: 4 samples; validation: none" in out
        assert out.splitlines()[-1] == "config OK: `posttrain sft` would train 1 step"
    assert main(["sft", "data.limit=4"]) == 2
    assert capsys.readouterr().err == "error: config: data.train: a training data file is required\n"


def test_an_override_error_names_the_override_not_the_file(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: rows.jsonl\n")
    assert main(["sft", str(path), "--dry-run", "train.max_steps=many"]) == 2
    assert capsys.readouterr().err.startswith("error: override 'train.max_steps=many': train.max_steps: Input should be")
    path.write_text("data:\n  train: rows.jsonl\ntrain:\n  max_steps: many\n")
    assert main(["sft", str(path), "optim.lr=1e-5"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: train.max_steps: Input should be")


def test_pipeline_takes_overrides_after_dry_run(tmp_path, capsys):
    """``pipeline CONFIG --dry-run key=value`` parses (argparse alone rejected it)."""
    assert main(["pipeline", str(REPO / "configs/quickstart.yaml"), "--dry-run", f"run.output_dir={tmp_path}",
                 "run.name=ordered"]) == 0
    assert f"pipeline {tmp_path}/ordered (dry run" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["pipeline", str(REPO / "configs/quickstart.yaml"), "--dry-run", "stray"])
    assert "unrecognized arguments: stray" in capsys.readouterr().err


def test_config_prints_readable_types(capsys):
    assert main(["config", "eval"]) == 0
    out = capsys.readouterr().out
    assert "reward: null  # str | CompositeReward | NamedReward | None: " in out
    assert "Annotated" not in out and "Discriminator" not in out and "<function" not in out


def test_rollout_server_dry_run_exports_the_model_and_prints_the_server_line(tiny_model_dir, tmp_path):
    python = tmp_path / "vllm-python"
    python.write_text("#!/bin/sh\n")
    out = run_cli("rollout-server", "--model", tiny_model_dir, "--out", str(tmp_path / "served"), "--port", "8123",
                  "--python", str(python), "--lora-rank", "8", "--dry-run", "--", "--max-num-seqs", "64")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "served" / "model" / "model.safetensors").is_file()
    server = next(line for line in out.stdout.splitlines() if line.startswith("server: "))
    for part in (str(python), "vllm.entrypoints.openai.api_server", "--port 8123", "--enable-scale-out",
                 "--logprobs-mode processed_logprobs", "--enable-lora", "--max-lora-rank 8", "--max-num-seqs 64"):
        assert part in server, part
    assert "rollout.server_url=http://" in out.stdout


def test_rollout_server_refuses_a_missing_python_in_one_line(tmp_path):
    out = run_cli("rollout-server", "--python", str(tmp_path / "nope" / "python"), "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: rollout-server --python: {tmp_path / 'nope' / 'python'} does not exist (make vllm-env creates .venv-vllm)"]
