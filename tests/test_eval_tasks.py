import json

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.eval.tasks import load_humaneval, load_jsonl, load_reasoning_gym


def test_humaneval_loader_subset_is_seeded_and_prompts_embed_the_problem():
    a = load_humaneval(limit=5, seed=1)
    b = load_humaneval(limit=5, seed=1)
    c = load_humaneval(limit=5, seed=2)
    assert [i.item_id for i in a.items] == [i.item_id for i in b.items] != [i.item_id for i in c.items]
    assert len(load_humaneval(limit=None, seed=None).items) == 164
    item = load_humaneval(limit=1, seed=None).items[0]
    assert item.item_id == "HumanEval/0"
    assert item.metadata["code_prefix"] in item.prompt[0]["content"]
    assert item.metadata["tests"][0].rstrip().endswith("check(has_close_elements)")


def test_reasoning_gym_loader_scores_its_own_answers():
    task = load_reasoning_gym("chain_sum", limit=4, seed=3)
    assert len(task.items) == 4 and task.name == "rg/chain_sum"
    answers = [f"<answer>{i.metadata['answer']}</answer>" for i in task.items]
    out = task.reward(["q"] * 4, answers, [i.metadata for i in task.items])
    assert out.scores == [1.0] * 4
    wrong = task.reward(["q"] * 4, ["<answer>nope</answer>"] * 4, [i.metadata for i in task.items])
    assert wrong.scores == [0.0] * 4
    assert task.items[0].prompt[0]["role"] == "system"


def test_reasoning_gym_unknown_dataset_is_a_config_error():
    with pytest.raises(ConfigError):
        load_reasoning_gym("no_such_dataset_xyz", limit=2)


def test_jsonl_loader_picks_math_or_code(tmp_path):
    math_file = tmp_path / "math.jsonl"
    math_file.write_text(
        "\n".join(json.dumps(r) for r in [{"prompt": "1+1?", "answer": "2"}, {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "answer": 4}])
    )
    task = load_jsonl(str(math_file))
    assert [i.prompt if isinstance(i.prompt, str) else len(i.prompt) for i in task.items] == ["1+1?", 1]
    assert task.reward(["a", "b"], ["#### 2", "5"], [i.metadata for i in task.items]).scores == [1.0, 0.0]
    code_file = tmp_path / "code.jsonl"
    code_file.write_text(json.dumps({"prompt": "write f", "tests": ["assert f() == 1"]}))
    code_task = load_jsonl(str(code_file))
    assert code_task.reward(["p"], ["def f():\n    return 1"], [code_task.items[0].metadata]).scores == [1.0]


def test_jsonl_loader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "x", "answer": 1}) + "\n" + json.dumps({"question": "y"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_jsonl(str(bad))
    neither = tmp_path / "neither.jsonl"
    neither.write_text(json.dumps({"prompt": "x"}) + "\n")
    with pytest.raises(ConfigError, match="reward"):
        load_jsonl(str(neither))
