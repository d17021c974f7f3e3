"""Meeting users where their data and habits are: hub datasets through
``datasets.load_dataset``, ``data.columns``, the RL reward-field audit, TRL ``text`` rows, the
veRL parquet shape, TRL-style reward functions, PEFT adapters as models, W&B offline, library
output through ``logging``, and the config schema on the command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.cli import main
from posttrain.config import DataConfig, RLConfig, SFTConfig, validate_config
from posttrain.data.audit import load_prompt_data, load_sft_data, preflight
from posttrain.data.formats import read_rows
from posttrain.errors import ConfigError, DataError
from posttrain.rewards.output import PromptText
from posttrain.rewards.registry import TRLReward, build_reward, reward_fields

REPO = Path(__file__).resolve().parents[1]
VERL_ROWS = [
    {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 2 + 3?"}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"split": "train", "index": 0}},
    {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "What is 4 + 4?"}], "ability": "math",
     "reward_model": {"style": "rule", "ground_truth": "8"}, "extra_info": {"split": "train", "index": 1}},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- data sources
def _dataset_folder(root: Path) -> Path:
    """A folder laid out like a hub dataset repository: data/<split>-*.parquet."""
    from datasets import Dataset

    (root / "data").mkdir(parents=True)
    Dataset.from_list([{"question": "1+1?", "answer": "2"}, {"question": "2+2?", "answer": "4"}]).to_parquet(
        str(root / "data" / "train-00000-of-00001.parquet"))
    Dataset.from_list([{"question": "3+3?", "answer": "6"}]).to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return root


def test_dataset_folder_and_hub_id_go_through_load_dataset(tmp_path, monkeypatch):
    import datasets

    folder = _dataset_folder(tmp_path / "gsm_like")
    calls = []
    real = datasets.load_dataset

    def recording(name, config=None, **kwargs):
        calls.append((name, config, kwargs.get("split")))
        return real(str(folder) if name == "someorg/gsm" else name, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", recording)
    assert [row["answer"] for _, row in read_rows(folder)] == ["2", "4"]
    assert [row["answer"] for _, row in read_rows(f"{folder}:test")] == ["6"]
    monkeypatch.setattr("posttrain.data.formats.hub_status", lambda: (True, "hub.test"))  # as if the hub were there
    assert [(n, row["question"]) for n, row in read_rows("someorg/gsm@main:train[:1]")] == [(1, "1+1?")]
    assert calls == [(str(folder), None, "train"), (str(folder), None, "test"), ("someorg/gsm", "main", "train[:1]")]


def test_hub_dataset_without_a_hub_is_one_line(monkeypatch):
    monkeypatch.setattr("posttrain.data.formats.hub_status", lambda: (False, "huggingface.co"))
    with pytest.raises(DataError) as caught:
        list(read_rows("nobody-here/no-such-dataset:test"))
    message = str(caught.value)
    assert message.startswith("nobody-here/no-such-dataset:test: cannot load dataset 'nobody-here/no-such-dataset': "
                              "the Hugging Face hub (huggingface.co) is not reachable") and "\n" not in message
    with pytest.raises(DataError, match="data file missing/train.jsonl does not exist"):
        list(read_rows("missing/train.jsonl"))


# ----------------------------------------------------------------------------- columns, audit, row shapes
def test_columns_map_dotted_paths_before_the_sft_audit(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", [
        {"q": {"text": "Name a fruit."}, "a": ["Mango."]},
        {"q": {"text": "Name a colour."}, "a": ["Teal."]},
    ])
    data = DataConfig(train=str(path), columns={"prompt": "q.text", "completion": "a.0"})
    prepared = load_sft_data(path, tokenizer, data)
    assert prepared.audit.samples == 2 and not prepared.audit.hard_errors
    assert "Mango." in tokenizer.decode([t for t, m in zip(prepared.samples[0].input_ids, prepared.samples[0].loss_mask) if m])
    write_jsonl(path, [{"q": {"text": "x"}, "a": ["y"]}, {"q": {"body": "x"}, "a": ["y"]}])
    with pytest.raises(DataError, match=rf"^{path}:2: data.columns.prompt: no field 'q.text' in this row"):
        load_sft_data(path, tokenizer, data)


def test_rl_audit_refuses_rows_without_what_the_reward_reads(tokenizer, tmp_path):
    fields = reward_fields("math")
    assert fields == {"answer": "math"}
    some = write_jsonl(tmp_path / "some.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "solution": "4"}])
    with pytest.raises(DataError) as caught:
        load_prompt_data(some, tokenizer, reward_fields=fields)
    assert str(caught.value).startswith(f"{some}:2: no 'answer' field, which reward 'math' reads (fields: solution)")
    none = write_jsonl(tmp_path / "none.jsonl", [{"prompt": "1+1?", "solution": "2"}])
    with pytest.raises(DataError, match=rf"^{none}:1: no 'answer' field"):
        load_prompt_data(none, tokenizer, reward_fields=fields)
    mapped = load_prompt_data(none, tokenizer, reward_fields=fields, columns={"answer": "solution"})  # the fix it names
    blank = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": " "}])
    with pytest.raises(DataError, match=rf"^{blank}:2: 'answer' is empty, so reward 'math' could only score 0"):
        load_prompt_data(blank, tokenizer, reward_fields=fields)  # present but blank: as silent as missing
    assert mapped.prompts[0].metadata["answer"] == "2"
    composite = {"name": "composite", "terms": {"ok": {"reward": "code"}, "m": {"reward": "math", "answer_key": "gt"}}}
    assert reward_fields(composite) == {"tests": "code", "gt": "math"}


def test_trl_text_rows_train_every_token_and_say_so(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "lm.jsonl", [{"text": "The sky is blue."}, {"text": "Grass is green."}])
    prepared = load_sft_data(path, tokenizer, DataConfig(train=str(path)))
    sample = prepared.samples[0]
    assert sample.input_ids[:-1] == tokenizer("The sky is blue.")["input_ids"]
    assert sample.input_ids[-1] == tokenizer.eos_token_id
    assert sample.loss_mask == [0] + [1] * (len(sample.input_ids) - 1)
    lines = prepared.audit.summary_lines()
    assert any("language-modelling rows" in line and "loss on every token" in line and "lines 1, 2" in line for line in lines)
    assert prepared.audit.to_dict()["text_rows"] == {"count": 2, "lines": [1, 2]}


def test_verl_parquet_reads_without_a_mapping(tokenizer, tmp_path):
    from datasets import Dataset

    path = tmp_path / "verl.parquet"
    Dataset.from_list(VERL_ROWS).to_parquet(str(path))
    prepared = load_prompt_data(path, tokenizer, reward_fields=reward_fields("math"))
    first = prepared.prompts[0]
    assert first.metadata["answer"] == "5" and first.metadata["data_source"] == "openai/gsm8k"
    assert first.metadata["reward_model"]["ground_truth"] == "5" and first.conversational
    scores = build_reward("math")(["q"] * 2, ["2 + 3 = 5", "2 + 3 = 6"], [first.metadata] * 2).scores
    assert scores == [1.0, 0.0]


# ----------------------------------------------------------------------------- TRL reward functions
TRL_REWARDS = '''
import re

def accuracy_reward(completions, solution, **kwargs):
    """As in TRL's GRPO docs: conversational completions, the reference from a dataset column."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if c.strip() == s else 0.0 for c, s in zip(contents, solution)]

def format_reward(completions, **kwargs):
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.match(pattern, content) else 0.0 for content in contents]

def length_or_none(prompts, completions, **kwargs):
    return [None if p.startswith("skip") else float(len(c)) for p, c in zip(prompts, completions)]

def sees(prompts, completions, **kwargs):
    SEEN.append({"prompts": prompts, "completions": completions, **kwargs})
    return [0.0] * len(completions)

SEEN = []
'''


def test_trl_style_reward_functions(tmp_path, monkeypatch):
    (tmp_path / "trl_rewards.py").write_text(TRL_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    accuracy = build_reward("trl_rewards:accuracy_reward")
    assert isinstance(accuracy, TRLReward) and reward_fields("trl_rewards:accuracy_reward") == {"solution": "accuracy_reward"}
    messages = [{"role": "user", "content": "2+2?"}]
    prompts = [PromptText("2+2?", messages)] * 2
    out = accuracy(prompts, ["4", "5"], [{"solution": "4"}, {"solution": "4"}])
    assert out.scores == [1.0, 0.0] and out.components == {"accuracy_reward": [1.0, 0.0]}
    fmt = build_reward({"name": "trl_rewards:format_reward"})
    assert fmt(prompts, ["<think>a</think><answer>4</answer>", "4"], None).scores == [1.0, 0.0]
    plain = build_reward(str(tmp_path / "trl_rewards.py") + ":length_or_none")  # a file path works too
    out = plain(["skip me", "q"], ["abc", "abcd"], [{}, {}])
    assert out.scores == [0.0, 4.0] and out.details == [{"reward_none": True}, {}]
    import trl_rewards

    build_reward("trl_rewards:sees")(prompts[:1] + ["plain?"], ["x", "y"], [{"solution": "4", "id": 1}, {"id": 2}])
    seen = trl_rewards.SEEN[-1]
    assert seen["prompts"] == [messages, "plain?"]
    assert seen["completions"] == [[{"role": "assistant", "content": "x"}], "y"]
    assert seen["solution"] == ["4", None] and seen["id"] == [1, 2]
    sys.modules.pop("trl_rewards", None)


# ----------------------------------------------------------------------------- PEFT adapters
@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, tokenizer):
    from peft import LoraConfig, get_peft_model

    from tests.conftest import build_tiny_llama

    root = tmp_path_factory.mktemp("adapter")
    base = root / "base"
    build_tiny_llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)  # a trained adapter: non-zero delta
    model.save_pretrained(root / "adapter")  # adapter_config.json (base_model_name_or_path = base) + weights
    return root


def test_adapter_directory_is_a_model(adapter_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from posttrain.models import load_model, load_tokenizer

    adapter = adapter_dir / "adapter"
    assert not (adapter / "config.json").exists() and (adapter / "adapter_config.json").is_file()
    ids = torch.tensor([tokenizer("Hello there")["input_ids"]])
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(adapter_dir / "base"), adapter).eval()
    base = AutoModelForCausalLM.from_pretrained(adapter_dir / "base").eval()
    merged = load_model(str(adapter)).eval()
    with torch.no_grad():
        expected, plain, got = reference(ids).logits, base(ids).logits, merged(ids).logits
    assert torch.allclose(got, expected, atol=1e-5) and not torch.allclose(got, plain, atol=1e-3)
    assert load_tokenizer(str(adapter)).encode("Hello") == tokenizer.encode("Hello")  # the base's tokenizer


def test_chat_and_eval_accept_an_adapter(adapter_dir, tmp_path):
    from posttrain.chat import chat
    from posttrain.config import ChatConfig

    reply = chat(validate_config(ChatConfig, {"model": {"name": str(adapter_dir / "adapter")}, "max_new_tokens": 4}), "Hi")
    assert isinstance(reply, str)
    from posttrain.config import EvalConfig
    from posttrain.eval.runner import run_eval

    tasks = write_jsonl(tmp_path / "tasks.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    config = validate_config(EvalConfig, {
        "model": {"name": str(adapter_dir / "adapter")}, "device": "cpu", "run": {"output_dir": str(tmp_path)},
        "sampling": {"max_new_tokens": 4}, "tasks": [{"name": "jsonl", "path": str(tasks)}]})
    (result,) = run_eval(config, print_table=False)
    assert len(result.samples) == 1 and result.metrics["num_prompts"] == 1


def test_sft_on_an_adapter_exports_a_merged_model(adapter_dir, tmp_path, caplog):
    from posttrain.train.sft import run_sft

    config = validate_config(SFTConfig, {
        "model": {"name": str(adapter_dir / "adapter")},
        "lora": {"enabled": True, "r": 4, "merge_on_export": False},
        "data": {"train": str(REPO / "examples" / "data" / "sft_chat.jsonl"), "limit": 4, "max_length": 256},
        "run": {"output_dir": str(tmp_path), "name": "on_adapter", "progress": False, "tensorboard": False},
        "optim": {"lr": 1e-3}, "train": {"max_steps": 2, "global_batch_size": 2, "micro_batch_tokens": 512}})
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        result = run_sft(config)
    assert (result.final_dir / "config.json").is_file() and not (result.final_dir / "adapter_config.json").exists()
    assert "exporting the merged model" in caplog.text


# ----------------------------------------------------------------------------- W&B, logging
def test_wandb_backend_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from posttrain.train.logging import MetricsLogger, prepare_run_dir

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = validate_config(SFTConfig, {"data": {"train": "x.jsonl"}, "run": {"wandb": True, "name": "wb"}})
    run = prepare_run_dir(tmp_path, "wb", config, resuming=False)
    with MetricsLogger(run, tensorboard=False, wandb=True, wandb_project="posttrain-test") as logger:
        logger.log({"loss": 2.5, "lr": 1e-4, "note": "text"}, step=1)
        logger.log({"loss": 2.0, "lr": 1e-4}, step=2)
        wandb_run = logger._wandb._run
        assert wandb_run.project == "posttrain-test" and wandb_run.name == "wb"
        assert wandb_run.config["run"]["wandb"] is True  # the resolved config.yaml
    import wandb

    wandb.teardown()  # the W&B service flushes the offline run file when it stops
    run_id = (run.path / "wandb_id").read_text().strip()
    (offline,) = list((run.path / "wandb").glob(f"offline-run-*-{run_id}"))  # what `wandb sync` uploads
    recorded = (offline / f"run-{run_id}.wandb").read_bytes()
    assert b"loss" in recorded and b"2.5" in recorded and b"2.0" in recorded  # step 2's row: written at finish
    assert [json.loads(line)["loss"] for line in run.metrics.read_text().splitlines()] == [2.5, 2.0]


def test_library_output_goes_through_logging(tokenizer, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    prepared = load_prompt_data(path, tokenizer)
    posttrain_logger = logging.getLogger("posttrain")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    collect = Collect()
    posttrain_logger.addHandler(collect)
    level = posttrain_logger.level
    try:
        preflight(prepared)
        assert "data audit" in capsys.readouterr().out and any("data audit" in r for r in records)
        records.clear()
        posttrain_logger.setLevel(logging.WARNING)  # what an embedding application does to silence it
        preflight(prepared)
        assert capsys.readouterr().out == "" and records == []
    finally:
        posttrain_logger.setLevel(level)
        posttrain_logger.removeHandler(collect)


# ----------------------------------------------------------------------------- config on the command line
@pytest.mark.parametrize("command", ["sft", "rm", "rl", "eval", "pipeline", "dpo"])
def test_config_command_prints_the_full_schema(command, capsys):
    assert main(["config", command]) == 0
    text = capsys.readouterr().out
    parsed = yaml.safe_load(text)
    assert isinstance(parsed, dict) and "run" in parsed
    if command in ("sft", "rl", "dpo", "rm"):
        assert "  lr: " in text and "# float: peak learning rate" in text
        assert "columns: {}  # dict[str, str]: rename row fields" in text
        assert parsed["run"]["name"] == command and parsed["run"]["wandb"] is False


def test_trainer_help_points_to_the_schema_and_keys_point_across_sections(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    assert "posttrain config sft" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"unknown key 'train.lr' \(did you mean 'optim.lr'\?\)"):
        validate_config(SFTConfig, {"data": {"train": "x"}, "train": {"lr": 1e-4}})
    with pytest.raises(ConfigError, match=r"unknown key 'rollout.max_prompt_length' \(did you mean 'data.max_prompt_length'\?\)"):
        validate_config(RLConfig, {"data": {"train": "x"}, "rollout": {"max_prompt_length": 10}})
    with pytest.raises(ConfigError, match=r"unknown key 'optim.weight_decy' \(did you mean 'optim.weight_decay'\?\)"):
        validate_config(SFTConfig, {"data": {"train": "x"}, "optim": {"weight_decy": 1}})


def test_sft_with_no_arguments_names_the_one_missing_key(capsys):
    """Without a config file the defaults apply; the only thing missing is the data, named in one line."""
    assert main(["sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: config: data.train: a training data file is required"


def test_readme_has_the_coming_from_trl_verl_table():
    readme = (REPO / "README.md").read_text()
    assert "Coming from TRL or veRL" in readme and "reward_model.ground_truth" in readme
