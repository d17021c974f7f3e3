"""Data mixtures (``data.mixture``, docs/DATA.md): a data setting as a list of sources, drawn by
weight share with the seed; per-source counts in the audit and the metrics; exact resume; the
single-path form unchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.config import PipelineConfig, RLConfig, RMConfig, SFTConfig, validate_config
from posttrain.data.audit import load_sft_data, preflight, preflight_prompts
from posttrain.data.mixture import (data_sources, default_source_name, mix_sources, mixture_counts, read_mixture,
                                    source_metrics)
from posttrain.errors import ConfigError, DataError
from posttrain.train import sft as sft_module
from posttrain.train.distributed import init_distributed
from posttrain.train.sft import run_sft

REPO = Path(__file__).resolve().parents[1]


def write_chat(path: Path, answers: list[str], *, prefix: str = "q") -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{prefix} {i}?"}, {"role": "assistant", "content": answer}]}
            for i, answer in enumerate(answers)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------- the draw, by hand
def test_counts_are_weight_shares_rounded_by_largest_remainder():
    assert mixture_counts([4, 6], [1.0, 3.0]) == [3, 7]  # T=10: 2.5 and 7.5; the tie goes to the first
    assert mixture_counts([2, 10], [1.0, 1.0], total=5) == [3, 2]  # 2.5 and 2.5
    assert mixture_counts([10, 10, 10], [1.0, 1.0, 1.0], total=10) == [4, 3, 3]  # 10/3 each: one row left over
    assert mixture_counts([5, 5], [1.0, 1.0], total=100) == [5, 5]  # data.limit caps, never grows, the mixture
    assert mixture_counts([3, 9], [0.1, 0.2]) == [4, 8]  # exact: 0.1/0.3 of 12 is 4, not 3.999...


def test_concatenation_without_weights_and_its_limit():
    assert mix_sources([2, 3], None, None, seed=0) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]
    assert mix_sources([2, 3], None, 3, seed=0) == [(0, 0), (0, 1), (1, 0)]


def test_weighted_draw_subsamples_without_replacement_and_repeats_whole_passes():
    draws = mix_sources([2, 10], [1.0, 1.0], None, seed=0)  # T=12: 6 rows each
    small = [row for source, row in draws if source == 0]
    large = [row for source, row in draws if source == 1]
    assert small == [0, 1, 0, 1, 0, 1]  # 6 of its 2 rows: three whole passes, in file order
    assert len(large) == 6 and len(set(large)) == 6 and large == sorted(large)  # 6 distinct of 10, in file order
    uneven = [row for source, row in mix_sources([4, 6], [1.0, 3.0], None, seed=3) if source == 1]
    assert uneven[:6] == [0, 1, 2, 3, 4, 5] and len(uneven) == 7 and 0 <= uneven[6] < 6  # 7 of 6: a pass + 1


def test_the_draw_is_a_function_of_the_seed():
    assert mix_sources([50, 50], [1.0, 1.0], 40, seed=7) == mix_sources([50, 50], [1.0, 1.0], 40, seed=7)
    assert mix_sources([50, 50], [1.0, 1.0], 40, seed=7) != mix_sources([50, 50], [1.0, 1.0], 40, seed=8)
    # one source's draw does not move when another source's size changes (same counts)
    first = [d for d in mix_sources([50, 50], [1.0, 1.0], 40, seed=7) if d[0] == 1]
    second = [d for d in mix_sources([60, 50], [1.0, 1.0], 40, seed=7) if d[0] == 1]
    assert first == second
    with pytest.raises(ValueError, match="no rows"):
        mix_sources([0, 5], [1.0, 1.0], None, seed=0)


def test_default_names_and_sources():
    assert default_source_name("data/chat.jsonl") == "chat"
    assert default_source_name("openai/gsm8k", "test") == "gsm8k_test"
    sources = data_sources([{"path": "a.jsonl", "weight": 1}, {"path": "org/ds", "split": "test[:10]", "weight": 2,
                                                               "limit": 5}], "data.train")
    assert [(s.name, s.spec, s.weight, s.limit, s.key) for s in sources] == [
        ("a", "a.jsonl", 1.0, None, "data.train[0]"), ("ds_test__10_", "org/ds:test[:10]", 2.0, 5, "data.train[1]")]
    assert data_sources("x.jsonl", "data.train")[0].spec == "x.jsonl"


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("setting, message", [
    (["a.jsonl", {"path": "b.jsonl", "weight": -1}], "c.yaml: data.train[1].weight: Input should be greater than 0"),
    (["a.jsonl", {"path": "b.jsonl", "wieght": 1}],
     "c.yaml: unknown key 'data.train[1].wieght' (did you mean 'data.train[1].weight'?)"),
    (["a.jsonl", 3], "c.yaml: data.train[1]: a source is a path or a mapping"),
    (5, "c.yaml: data.train: expected a path or a list of sources"),
    ([], "c.yaml: data.train: List should have at least 1 item"),
    (["a.jsonl", {"path": "b.jsonl", "weight": 2}], "c.yaml: data.train[0].weight: every source needs a weight, or none"),
    (["a.jsonl", "x/a.jsonl"], "c.yaml: data.train[1].name: 'a' also names source [0]"),
    (["a.jsonl", "a.jsonl"], "c.yaml: data.train[1]: the same source as [0]"),
    ([{"weight": 1}], "c.yaml: data.train[0].path: required"),
    ([{"path": "org/ds:test", "split": "train"}], "c.yaml: data.train[0].split: the path already names a split"),
])
def test_config_errors_name_the_key(setting, message):
    with pytest.raises(ConfigError) as caught:
        validate_config(SFTConfig, {"data": {"train": setting}}, "c.yaml")
    assert str(caught.value).startswith(message), str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_keys_of_val_eval_and_pipeline_stages():
    with pytest.raises(ConfigError, match=r"^c.yaml: data.eval\[1\].limit: Input should be greater than 0"):
        validate_config(RLConfig, {"data": {"train": "a.jsonl", "eval": ["e.jsonl", {"path": "f.jsonl", "limit": 0}]}},
                        "c.yaml")
    with pytest.raises(ConfigError, match=r"^c.yaml: data.val\[0\].name: String should match pattern"):
        validate_config(RMConfig, {"data": {"train": "a.jsonl", "val": [{"path": "v.jsonl", "name": "a b"}]}}, "c.yaml")
    with pytest.raises(ConfigError, match=r"^p.yaml: unknown key 'sft.data.train\[1\].limt'"):
        validate_config(PipelineConfig, {"sft": {"data": {"train": ["a.jsonl", {"path": "b", "limt": 1}]}}}, "p.yaml")


def test_a_single_path_stays_a_string():
    config = validate_config(SFTConfig, {"data": {"train": "a.jsonl"}})
    assert config.data.train == "a.jsonl"
    listed = validate_config(SFTConfig, {"data": {"train": ["a.jsonl", {"path": "b.jsonl"}]}})
    assert listed.data.train[0] == "a.jsonl" and listed.data.train[1].path == "b.jsonl"
    again = validate_config(SFTConfig, listed.model_dump(mode="json"))  # the resolved config.yaml reads back
    assert again.data.train == listed.data.train


def test_split_on_one_file_is_refused(tmp_path):
    path = write_chat(tmp_path / "a.jsonl", ["x"])
    with pytest.raises(ConfigError, match=r"data.train\[0\].split: .*a.jsonl is one file"):
        data_sources([{"path": str(path), "split": "test"}], "data.train")


# ----------------------------------------------------------------------------- the audit
def sft_data(**settings):
    return validate_config(SFTConfig, {"data": {"train": "unused.jsonl", "max_length": 128, **settings}}).data


def test_audit_counts_rows_kept_and_dropped_per_source(tmp_path, tokenizer):
    a = write_chat(tmp_path / "a.jsonl", ["one", "two", "three", "four"])
    b = write_chat(tmp_path / "b.jsonl", ["five", "six"], prefix="r")
    setting = [str(a), {"path": str(b), "name": "small"}]
    weighted = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 1.0, "name": "small"}]

    prepared = load_sft_data(weighted, tokenizer, sft_data(), seed=0)  # T = 6: 3 rows each
    report = prepared.audit
    assert [(c.name, c.read, c.drawn, c.distinct, c.kept, c.dropped) for c in report.sources] == [
        ("a", 4, 3, 3, 3, 0), ("small", 2, 3, 2, 3, 0)]
    assert len(prepared.samples) == report.samples == 6 and report.rows == 6
    assert [s.source for s in prepared.samples] == [str(a)] * 3 + [str(b)] * 3
    assert [s.line for s in prepared.samples][3:5] == [1, 2] and prepared.samples[5].line in (1, 2)  # a pass, then one
    lines = report.summary_lines()
    assert lines[0] == f"data audit: {a}" and f"data audit: {b}" in lines
    assert "data mixture: 2 sources, 6 rows drawn by weight (seed 0)" in lines
    assert (f"  small ({b}): weight 1 (50.0% of rows): read 2, drew 3 (each row 1.5x), kept 3 samples, "
            f"dropped 0 rows") in lines
    assert lines[-1].startswith("  result: OK")
    as_json = report.to_dict()
    assert [part["source"] for part in as_json["parts"]] == [str(a), str(b)]
    assert as_json["sources"][1]["drawn"] == 3 and as_json["ok"]

    # concatenation; a malformed row skipped (skip_bad) is a dropped row of its source
    with a.open("a") as handle:
        handle.write("{not json\n")
    concatenated = load_sft_data(setting, tokenizer, sft_data(skip_bad=True), seed=0)
    assert [(c.name, c.drawn, c.kept, c.dropped) for c in concatenated.audit.sources] == [
        ("a", 5, 4, 1), ("small", 2, 2, 0)]
    assert "data mixture: 2 sources, 7 rows concatenated" in concatenated.audit.summary_lines()
    # data.limit keeps the first rows of the concatenation: b is not read at all
    limited = load_sft_data(setting, tokenizer, sft_data(limit=3), seed=0)
    assert [(c.read, c.drawn) for c in limited.audit.sources] == [(3, 3), (0, 0)]
    assert [part.source for part in limited.audit.parts] == [str(a)]


def test_a_hard_error_names_the_file_of_its_source(tmp_path, tokenizer):
    a = write_chat(tmp_path / "a.jsonl", ["fine"])
    b = write_chat(tmp_path / "b.jsonl", ["word " * 200], prefix="r")  # longer than max_length
    prepared = load_sft_data([str(a), str(b)], tokenizer, sft_data(truncation="drop"), seed=0)
    with pytest.raises(DataError) as caught:
        preflight(prepared, print_fn=None)
    assert str(caught.value).startswith(f"{b}: no usable training sample in the file")
    assert f"posttrain inspect {b}`" in str(caught.value)


def test_a_weighted_source_that_would_draw_nothing_is_refused(tmp_path, tokenizer):
    a = write_chat(tmp_path / "a.jsonl", [str(i) for i in range(10)])
    b = write_chat(tmp_path / "b.jsonl", ["x"], prefix="r")
    with pytest.raises(DataError, match=r"^data.train\[1\] \(b\): weight 0.01 gives it none of the mixture's 4 rows"):
        read_mixture(data_sources([{"path": str(a), "weight": 1}, {"path": str(b), "weight": 0.01}], "data.train"),
                     limit=4, seed=0)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^data.train\[1\] \(.*empty.jsonl\): no rows to draw from"):
        read_mixture(data_sources([{"path": str(a), "weight": 1}, {"path": str(tmp_path / "empty.jsonl"), "weight": 1}],
                                  "data.train"), limit=None, seed=0)


def test_a_datasets_directory_split_and_per_source_limit(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    def rows(tag, n):
        return [{"messages": [{"role": "user", "content": f"{tag}{i}"}, {"role": "assistant", "content": "ok"}]}
                for i in range(n)]

    DatasetDict({"train": Dataset.from_list(rows("t", 5)), "test": Dataset.from_list(rows("e", 3))}).save_to_disk(
        str(tmp_path / "ds"))
    a = write_chat(tmp_path / "a.jsonl", ["x", "y", "z"])
    prepared = load_sft_data([{"path": str(tmp_path / "ds"), "split": "test"}, {"path": str(a), "limit": 2}],
                             tokenizer, sft_data(), seed=0)
    assert [(c.name, c.spec, c.read) for c in prepared.audit.sources] == [
        ("ds_test", f"{tmp_path / 'ds'}:test", 3), ("a", str(a), 2)]


# ----------------------------------------------------------------------------- trainers
def sft_config(model_dir, out, train_setting, **train):
    settings = dict(global_batch_size=4, micro_batch_tokens=256, max_steps=4, save_every=2, keep_last=2, seed=3)
    settings.update(train)
    return validate_config(SFTConfig, {
        "model": {"name": model_dir}, "data": {"train": train_setting, "max_length": 128},
        "run": {"output_dir": str(out), "name": "run", "progress": False, "tensorboard": False},
        "optim": {"lr": 3e-3, "warmup_steps": 1}, "train": settings,
    })


def two_files(tmp_path):
    a = write_chat(tmp_path / "a.jsonl", [f"The answer is {i}." for i in range(10)])
    b = write_chat(tmp_path / "b.jsonl", ["Yes.", "No."], prefix="r")
    return [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1}]


def test_sft_on_a_two_file_mixture_logs_its_sources_once(tiny_model_dir, tmp_path, capsys):
    result = run_sft(sft_config(tiny_model_dir, tmp_path, two_files(tmp_path)))
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines[0] == {"step": 0, "data/source/a/samples": 9, "data/source/b/samples": 3}  # 3:1 of 12 rows
    assert [line["step"] for line in lines[1:]] == [1, 2, 3, 4]
    assert not any(key.startswith("data/source/") for line in lines[1:] for key in line)
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines[1:])
    out = capsys.readouterr().out
    assert "data mixture: 2 sources, 12 rows drawn by weight (seed 3)" in out
    assert "`data/source/<name>/samples`" in (REPO / "docs" / "METRICS.md").read_text()


def test_resumed_mixture_run_equals_the_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    setting = two_files(tmp_path)
    straight = run_sft(sft_config(tiny_model_dir, tmp_path / "a", setting))
    real_save = sft_module.ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("simulated crash after the first checkpoint")

    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_sft(sft_config(tiny_model_dir, tmp_path / "b", setting))
    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", real_save)
    resumed = run_sft(sft_config(tiny_model_dir, tmp_path / "b", setting, resume="latest"))

    from safetensors.torch import load_file

    a = load_file(str(Path(straight.final_dir) / "model.safetensors"))
    b = load_file(str(Path(resumed.final_dir) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
    straight_loss = {line["step"]: line["loss"] for line in straight.history if "loss" in line}
    assert [(line["step"], line["loss"]) for line in resumed.history] == [(3, straight_loss[3]), (4, straight_loss[4])]
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]  # the sources line once, not again on resume


def test_sft_samples_of_a_mixture_follow_the_draw(tiny_model_dir, tmp_path, tokenizer):
    config = sft_config(tiny_model_dir, tmp_path, two_files(tmp_path), seed=5)
    train, val = sft_module.load_sft_samples(config, tokenizer, init_distributed("cpu"))
    assert val == [] and source_metrics(config.data.train, train) == {"data/source/a/samples": 9,
                                                                      "data/source/b/samples": 3}
    again, _ = sft_module.load_sft_samples(config, tokenizer, init_distributed("cpu"))
    assert [(s.source, s.line) for s in again] == [(s.source, s.line) for s in train]


def test_rl_prompts_from_two_files(tmp_path, tokenizer):
    first = tmp_path / "add.jsonl"
    first.write_text("".join(json.dumps({"prompt": f"What is {i + 20} + 17?", "answer": str(i + 37)}) + "\n" for i in range(6)))
    second = tmp_path / "sub.jsonl"
    second.write_text("".join(json.dumps({"prompt": f"What is {i + 50} - 13?", "answer": str(i + 37)}) + "\n" for i in range(4)))
    from posttrain.train.rl import load_prompts

    config = validate_config(RLConfig, {"data": {"train": [str(first), {"path": str(second), "limit": 2}],
                                                 "eval": [{"path": str(second), "weight": 1}], "eval_limit": 2},
                                        "reward": "math", "train": {"seed": 1}})
    train_rows, eval_rows = load_prompts(config, tokenizer, init_distributed("cpu"))
    assert [(row.source, row.line) for row in train_rows] == [(str(first), n) for n in range(1, 7)] + [
        (str(second), 1), (str(second), 2)]
    assert train_rows[6].where == f"{second}:1"
    assert len(eval_rows) == 2 and {row.source for row in eval_rows} == {str(second)}
    assert source_metrics(config.data.train, train_rows) == {"data/source/add/samples": 6, "data/source/sub/samples": 2}
    prepared = preflight_prompts([str(first), str(second)], tokenizer, print_fn=None)
    assert "data mixture: 2 sources, 10 rows concatenated" in prepared.audit.summary_lines()
    assert prepared.audit.summary_lines()[0] == f"data audit: {first} (RL prompts)"


def test_preference_pairs_from_a_mixture(tmp_path, tokenizer):
    from posttrain.data.preference import load_preference_data

    source = REPO / "examples" / "data" / "preference_arithmetic_train.jsonl"
    other = tmp_path / "other.jsonl"
    other.write_text("".join(source.read_text().splitlines(keepends=True)[100:103]))
    data = validate_config(RMConfig, {"data": {"train": [{"path": str(source), "weight": 1, "limit": 9},
                                                         {"path": str(other), "weight": 1}], "max_length": 256}}).data
    train, val = load_preference_data(data, tokenizer, seed=0, verbose=False)
    assert val == [] and len(train) == 12  # 6 + 6: the 3-row file twice over
    assert [pair.chosen.source for pair in train].count(str(other)) == 6


def test_pipeline_dry_run_names_each_source(tmp_path):
    from posttrain.pipeline import dry_run

    a = write_chat(tmp_path / "a.jsonl", ["x"])
    config = validate_config(PipelineConfig, {"run": {"output_dir": str(tmp_path)},
                                              "sft": {"data": {"train": [str(a), str(tmp_path / "missing.jsonl")]}}})
    report = dry_run(config)
    assert f"sft.data.train[1]: {tmp_path / 'missing.jsonl'} does not exist" in report.errors
    assert not [error for error in report.errors if "train[0]" in error]


def test_rl_run_on_a_mixture_logs_its_sources_once(tiny_model_dir, tmp_path):
    from posttrain.rewards.output import RewardOutput
    from posttrain.train.rl import run_rl

    def length_reward(prompts, completions, metadata):
        return RewardOutput([len(text) / 10 for text in completions], {})

    train = REPO / "examples" / "data" / "rl_arithmetic_train.jsonl"
    other = REPO / "examples" / "data" / "rl_arithmetic_eval.jsonl"
    config = validate_config(RLConfig, {
        "model": {"name": tiny_model_dir},
        "data": {"train": [{"path": str(train), "weight": 1, "limit": 6}, {"path": str(other), "weight": 2, "limit": 3}]},
        "rollout": {"group_size": 2, "max_new_tokens": 4}, "rl": {"prompts_per_step": 2},
        "train": {"max_steps": 1, "samples_every": None},
        "run": {"output_dir": str(tmp_path), "progress": False, "tensorboard": False},
    })
    result = run_rl(config, reward_fn=length_reward)
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    # T = 9 rows: shares 3 and 6; the 3-row file gives each row twice
    assert lines[0] == {"step": 0, "data/source/rl_arithmetic_train/samples": 3,
                        "data/source/rl_arithmetic_eval/samples": 6}
    assert [line["step"] for line in lines] == [0, 1]
