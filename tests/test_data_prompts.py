"""RL prompt files go through the pre-flight audit: every malformed row is a one-line
DataError naming file:line, before any model loads (also through ``posttrain rl``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.data.audit import load_prompt_data, preflight, preflight_prompts
from posttrain.data.render import render_prompt
from posttrain.errors import DataError

GOOD = {"prompt": "What is 2 + 3?", "answer": "5"}


def write_lines(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "unclosed', r":2: malformed JSON"),
    ('["a", "list"]', r":2: a row must be a JSON object, got a list"),
    ({"question": "no prompt key", "answer": "1"}, r":2: an RL prompt row needs a 'messages' or 'prompt' key \(keys: answer, "
                                                   r"question\); map it with data.columns: \{prompt: question\} "
                                                   r"\(data.columns.prompt=question\)$"),
    ({"x": 1}, r":2: an RL prompt row needs a 'messages' or 'prompt' key \(keys: x\); map one with data.columns: "
               r"\{prompt: <field>\}$"),
    ({"prompt": 42}, r":2: prompt must be a string or a list of messages, got int"),
    ({"prompt": None}, r":2: prompt must be a string or a list of messages, got null"),
    ({"messages": ["hi"]}, r":2: messages\[0\]: a message must be an object, got a string"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r":2: messages\[0\]: unknown role 'robot'"),
    ({"prompt": ""}, r":2: prompt is empty$"),
    ({"prompt": "   \n"}, r":2: prompt is empty$"),
    ({"messages": []}, r":2: messages is empty$"),
    ({"messages": [{"role": "user", "content": ""}]}, r":2: messages is empty$"),
])
def test_malformed_prompt_rows_name_their_line(tokenizer, tmp_path, bad, message):
    path = write_lines(tmp_path / "prompts.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=message) as caught:
        load_prompt_data(path, tokenizer, max_prompt_length=512)
    text = str(caught.value)
    assert text.startswith(f"{path}:2: ") and "\n" not in text


def test_good_prompts_render_like_render_prompt_with_system_and_metadata(tokenizer, tmp_path):
    rows = [GOOD, {"messages": [{"role": "user", "content": "Hi"}], "tests": ["assert True"]},
            {"messages": [{"from": "system", "value": "Own."}, {"from": "human", "value": "Yo"}]}]
    path = write_lines(tmp_path / "p.jsonl", rows)
    prepared = load_prompt_data(path, tokenizer, system="Be brief.", max_prompt_length=512)
    assert [p.line for p in prepared.prompts] == [1, 2, 3]
    first = prepared.prompts[0]
    expected = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]
    assert first.messages == expected and first.metadata == {"answer": "5"}
    assert first.prompt_ids == render_prompt(expected, tokenizer)
    assert prepared.prompts[1].metadata == {"tests": ["assert True"]}
    assert prepared.prompts[2].messages[0] == {"role": "system", "content": "Own."}  # no second system message
    report = prepared.audit
    assert (report.rows, report.samples, report.tokens) == (3, 3, sum(len(p.prompt_ids) for p in prepared.prompts))
    printed = []
    preflight(prepared, print_fn=printed.append)
    assert "(RL prompts)" in printed[0] and printed[-1].startswith("  result: OK")


def test_too_long_prompts_are_dropped_and_counted_or_refused(tokenizer, tmp_path):
    long = {"prompt": "word " * 200}
    path = write_lines(tmp_path / "p.jsonl", [GOOD, long, GOOD])
    limit = len(render_prompt("word " * 200, tokenizer)) - 1
    prepared = load_prompt_data(path, tokenizer, max_prompt_length=limit)
    assert [p.line for p in prepared.prompts] == [1, 3] and [f.line for f in prepared.audit.dropped] == [2]
    assert prepared.audit.hard_errors == []
    with pytest.raises(DataError, match=rf"^{path}:2: prompt has {limit + 1} tokens, more than data.max_prompt_length={limit}$"):
        load_prompt_data(path, tokenizer, max_prompt_length=limit, too_long="error")
    only_long = write_lines(tmp_path / "long.jsonl", [long, long])
    with pytest.raises(DataError, match=r"no usable prompt in the file \(2 longer than data.max_prompt_length\)"):
        preflight_prompts(only_long, tokenizer, max_prompt_length=limit, print_fn=None)


def test_skip_bad_counts_bad_rows(tokenizer, tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [GOOD, {"prompt": ""}, "{oops", GOOD])
    prepared = load_prompt_data(path, tokenizer, max_prompt_length=512, skip_bad=True)
    assert [p.line for p in prepared.prompts] == [1, 4] and [f.line for f in prepared.audit.bad_rows] == [2, 3]


@pytest.mark.parametrize("which", ["train", "eval"])
def test_posttrain_rl_refuses_a_bad_prompt_file_in_one_line_before_loading_a_model(tiny_model_dir, tmp_path, capsys,
                                                                                  monkeypatch, which):
    from posttrain.train import rl as rl_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the prompt files were checked")

    monkeypatch.setattr(rl_module, "build_trainables", refuse)
    good = write_lines(tmp_path / "good.jsonl", [GOOD, GOOD])
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, {"prompt": 7, "answer": "1"}])
    config = tmp_path / "rl.yaml"
    files = {"train": good, "eval": good, which: bad}
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {files['train']}\n  eval: {files['eval']}\n"
                      f"run:\n  output_dir: {tmp_path / 'runs'}\n  progress: false\n")
    assert main(["rl", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {bad}:3: prompt must be a string or a list of messages, got int", err
    assert "Traceback" not in err


@pytest.mark.parametrize("answer, what", [
    (["4", "5"], "a list of 2 values"), ([], "empty"), ("NaN", "NaN"), ("Infinity", "infinite"), ({"value": 5}, "an object"),
    (True, r"a boolean \(true\)"), ([[5]], "a list inside a list"), ([" "], "a list holding an empty string"),
])
def test_math_references_of_a_type_no_answer_can_match_are_refused(tokenizer, tmp_path, answer, what):
    """Compared as text (``['4', '5']``, ``nan``, ``True``) such a reference pays no real answer."""
    from posttrain.rewards.registry import reward_fields

    bad = {"prompt": "What is 2 + 3?", "answer": answer} if not isinstance(answer, str) else None
    line = json.dumps(bad) if bad else '{"prompt": "What is 2 + 3?", "answer": ' + answer + "}"  # NaN: not JSON's own
    path = write_lines(tmp_path / "p.jsonl", [GOOD, line, GOOD])
    composite = {"name": "composite", "terms": {"math": {"weight": 1.0}, "length": {"weight": 0.1}}}
    for spec in ("math", composite):
        with pytest.raises(DataError, match=rf"p\.jsonl:2: 'answer' is {what}"):
            load_prompt_data(path, tokenizer, reward_fields=reward_fields(spec))


@pytest.mark.parametrize("answer", ["5", 5, 2.5, ["5"], [5]])
def test_math_references_of_one_value_pass(tokenizer, tmp_path, answer):
    from posttrain.rewards.math import MathReward
    from posttrain.rewards.registry import reward_fields

    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "answer": answer}])
    prepared = load_prompt_data(path, tokenizer, reward_fields=reward_fields("math"))
    metadata = prepared.prompts[0].metadata
    assert MathReward()(["q"], [rf"\boxed{{{answer[0] if isinstance(answer, list) else answer}}}"], [metadata]).scores == [1.0]


def test_posttrain_rl_refuses_a_multi_valued_reference_in_one_line(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from posttrain.train import rl as rl_module

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the prompt files were checked")

    monkeypatch.setattr(rl_module, "build_trainables", refuse)
    data = write_lines(tmp_path / "p.jsonl", [GOOD, {"prompt": "Roots of x^2 = 4?", "answer": [2, -2]}])
    config = tmp_path / "rl.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nrun:\n  output_dir: {tmp_path / 'runs'}\n")
    assert main(["rl", str(config)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {data}:2: 'answer' is a list of 2 values, but reward 'math' compares an answer with one string or "
        f"finite number (e.g. \"42\")")


def test_lone_surrogates_in_prompts_and_answers_stop_posttrain_rl_naming_the_line(tiny_model_dir, tmp_path, capsys):
    for bad in ('{"prompt": "What is 2 \\ud800+ 3?", "answer": "5"}', '{"prompt": "2+3?", "answer": "5\\udc00"}'):
        data = write_lines(tmp_path / "p.jsonl", [GOOD, bad])
        config = tmp_path / "rl.yaml"
        config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\nrun:\n  output_dir: {tmp_path / 'r'}\n")
        assert main(["rl", str(config)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {data}:2: ") and "a lone surrogate" in err and "\n" not in err, err
