"""The Python API (``posttrain.api``, reached as ``import posttrain as pt``): configs as paths,
dicts or typed objects with overrides, Python reward callables (posttrain's and TRL's
conventions, weighted), result objects, and dry runs that load no model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import posttrain as pt
from posttrain.config import SFTConfig
from posttrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SFT_DATA = str(REPO / "examples/data/sft_arithmetic.jsonl")
RL_TRAIN = str(REPO / "examples/data/rl_arithmetic_train.jsonl")
RL_EVAL = str(REPO / "examples/data/rl_arithmetic_eval.jsonl")
PAIRS = str(REPO / "examples/data/preference_arithmetic_train.jsonl")

TRL_CALLS: list[dict] = []


def always_one(completions, **kwargs):
    """TRL's convention: keyword columns, one float per completion."""
    TRL_CALLS.append({key: list(value) for key, value in kwargs.items() if key != "prompts"})
    return [1.0] * len(completions)


def half(prompts, completions, metadata):
    """posttrain's convention."""
    return [0.5] * len(completions)


def quiet(model_dir: str, out: Path, **sections) -> dict:
    config = {"model": {"name": model_dir}, "run": {"output_dir": str(out), "progress": False, "tensorboard": False}}
    config.update(sections)
    return config


def test_import_is_cheap_and_exposes_the_commands():
    code = ("import sys, posttrain as pt\n"
            "assert 'torch' not in sys.modules and 'posttrain.api' not in sys.modules\n"
            "import posttrain.pipeline, posttrain.eval.runner\n"  # the submodules named like two commands
            "assert callable(pt.pipeline) and callable(pt.eval) and pt.pipeline.build_plan and pt.eval.runner\n"
            "print(sorted(name for name in pt.__all__ if not name.startswith('_')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == str(sorted(["Plan", "Result", "dpo", "eval", "make_config", "pipeline", "push",
                                                     "rl", "rm", "sft"]))


def test_sft_from_a_dict_with_overrides_returns_the_run(tiny_model_dir, tmp_path):
    config = quiet(tiny_model_dir, tmp_path, data={"train": SFT_DATA, "val_fraction": 0.25, "limit": 16},
                   run={"name": "api_sft", "output_dir": str(tmp_path), "progress": False, "tensorboard": False})
    result = pt.sft(config, overrides={"train.max_steps": 2, "train.eval_every": 2, "optim.lr": 1e-3})
    assert isinstance(result, pt.Result) and result.command == "sft"
    assert result.run_dir == tmp_path / "api_sft" and result.final_model == result.run_dir / "final"
    assert (result.final_model / "model.safetensors").is_file()
    assert result.steps == 2 and result.metrics["step"] == 2 and math.isfinite(result.metrics["loss"])
    assert {"val/loss", "val/ppl"} <= set(result.scores)
    assert result.scores["val/ppl"] == pytest.approx(math.exp(result.scores["val/loss"]), rel=1e-6)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 2 and saved["optim"]["lr"] == 1e-3 and saved["data"]["limit"] == 16


def test_rl_with_weighted_python_rewards_in_both_conventions(tiny_model_dir, tmp_path):
    """``reward=[(trl_fn, 0.5), (posttrain_fn, 2.0)]``: each is called its own way and the step's
    reward is the weighted sum, 0.5 * 1.0 + 2.0 * 0.5 = 1.5 for every sample."""
    TRL_CALLS.clear()
    config = quiet(tiny_model_dir, tmp_path, data={"train": RL_TRAIN, "limit": 16, "eval": RL_EVAL, "eval_limit": 2},
                   rollout={"group_size": 2, "max_new_tokens": 4}, rl={"prompts_per_step": 2},
                   train={"max_steps": 1, "eval_before": True})
    config["run"]["name"] = "api_rl"
    result = pt.rl(config, reward=[(always_one, 0.5), (half, 2.0)])
    assert result.steps == 1 and (result.final_model / "model.safetensors").is_file()
    assert result.metrics["reward/mean"] == pytest.approx(1.5)
    assert result.metrics["reward/always_one"] == pytest.approx(1.0)
    assert result.metrics["reward/half"] == pytest.approx(0.5)
    assert TRL_CALLS and all(isinstance(answer, str) for call in TRL_CALLS for answer in call["answer"])
    assert result.scores and result.scores_before and set(result.scores) == set(result.scores_before)
    saved = yaml.safe_load((result.run_dir / "config.yaml").read_text())
    terms = saved["reward"]["terms"]  # the resolved config names the functions it trained with
    assert {name: (term["reward"], term["weight"]) for name, term in terms.items()} == {
        "always_one": ("test_api:always_one", 0.5), "half": ("test_api:half", 2.0)}


def test_a_reward_callable_without_an_importable_name_is_registered():
    def closeness(prompts, completions, metadata):
        return [0.0] * len(completions)

    other = lambda completions, **kwargs: [0.0] * len(completions)  # noqa: E731
    spec = pt.api.reward_spec([closeness, other, ("math", 0.5), {"name": "format", "required_tags": ["answer"]}])
    assert spec == {"name": "composite", "terms": {
        "closeness": {"reward": "posttrain.api:python_rewards.closeness", "weight": 1.0},
        "reward": {"reward": "posttrain.api:python_rewards.reward", "weight": 1.0},
        "math": {"reward": "math", "weight": 0.5},
        "format": {"reward": "format", "required_tags": ["answer"], "weight": 1.0}}}
    assert pt.api.python_rewards.closeness is closeness and pt.api.python_rewards.reward is other
    assert pt.api.reward_spec(always_one) == "test_api:always_one"
    assert pt.api.reward_spec((always_one, 2)) == {"name": "composite", "terms": {
        "always_one": {"reward": "test_api:always_one", "weight": 2.0}}}
    with pytest.raises(ConfigError, match=r"^reward: a callable, a reward spec"):
        pt.api.reward_spec(42)
    with pytest.raises(ConfigError, match=r"^reward\[1\]: a callable"):
        pt.api.reward_spec([half, 3])
    with pytest.raises(ConfigError, match="^reward: sft takes no reward"):
        pt.make_config("sft", {"data": {"train": "x.jsonl"}}, reward=half)


def test_configs_from_a_path_a_dict_or_a_typed_object_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train: rows.jsonl\ntrain:\n  max_steps: 7\n")
    from_path = pt.make_config("sft", path, ["optim.lr=2e-5"])
    from_dict = pt.make_config("sft", {"data": {"train": "rows.jsonl"}, "train": {"max_steps": 7}}, {"optim.lr": 2e-5})
    typed = SFTConfig.model_validate({"data": {"train": "rows.jsonl"}, "train": {"max_steps": 7}})
    from_typed = pt.make_config("sft", typed, {"optim.lr": 2e-5})
    assert from_path == from_dict == from_typed and from_typed.optim.lr == 2e-5 and from_typed.train.max_steps == 7
    assert pt.make_config("sft", typed) is typed
    with pytest.raises(ConfigError, match="^override train.max_steps='x': train.max_steps: Input should be"):
        pt.make_config("sft", path, {"train.max_steps": "x"})
    path.write_text("data:\n  train: rows.jsonl\ntrain:\n  max_steps: x\n")
    with pytest.raises(ConfigError, match=f"^{path}: train.max_steps"):  # the file's error, not the override's
        pt.make_config("sft", path, {"optim.lr": 1e-5})
    with pytest.raises(ConfigError, match="^config: rl takes a RLConfig, not a SFTConfig"):
        pt.make_config("rl", typed)


def _refuse_models(monkeypatch):
    """Any model built (every torch module starts in ``nn.Module.__init__``) fails the test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"a model was built during a dry run: {type(self).__name__}")

    monkeypatch.setattr(torch.nn.Module, "__init__", refuse)


@pytest.mark.parametrize("command, data", [
    ("sft", {"train": SFT_DATA, "limit": 8}),
    ("rm", {"train": PAIRS, "limit": 8}),
    ("dpo", {"train": PAIRS, "limit": 8}),
    ("rl", {"train": RL_TRAIN, "limit": 8, "eval": RL_EVAL, "eval_limit": 4}),
])
def test_dry_run_checks_everything_but_loads_no_model(command, data, tiny_model_dir, tmp_path, monkeypatch, capsys):
    _refuse_models(monkeypatch)
    config = quiet(tiny_model_dir, tmp_path, data=data, train={"max_steps": 3})
    plan = getattr(pt, command)(config, dry_run=True)
    assert isinstance(plan, pt.Plan) and str(plan).splitlines()[-1] == f"config OK: `posttrain {command}` would train 3 steps"
    assert f"  run       {tmp_path / plan.config.run.name}: new" in str(plan)
    assert not (tmp_path / plan.config.run.name).exists()  # nothing written
    assert "data audit" in capsys.readouterr().out  # the audit ran


def test_dry_run_refuses_what_the_run_would_refuse(tiny_model_dir, tmp_path, monkeypatch):
    _refuse_models(monkeypatch)
    config = quiet(tiny_model_dir, tmp_path, data={"train": SFT_DATA, "limit": 8}, train={"max_steps": 3})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    with pytest.raises(ConfigError, match="^run.name: .* already holds a run"):
        pt.sft(config, dry_run=True)
    assert "starts over" in str(pt.sft(config, overrides={"run.overwrite": True}, dry_run=True))
    with pytest.raises(ConfigError, match=r"^optim.warmup_steps \(5\) is not shorter than train.max_steps"):
        pt.sft(config, overrides={"optim.warmup_steps": 5, "run.overwrite": True}, dry_run=True)
    monkeypatch.setenv("WORLD_SIZE", "2")  # planned for torchrun's ranks
    with pytest.raises(ConfigError, match=r"^rl.prompts_per_step \(3\) is not a multiple of the 2 ranks"):
        pt.rl(quiet(tiny_model_dir, tmp_path, data={"train": RL_TRAIN}), overrides={"rl.prompts_per_step": 3},
              dry_run=True)


def test_a_pipeline_through_the_api_reports_its_final_model(tiny_model_dir, tmp_path):
    config = {"model": {"name": tiny_model_dir}, "run": {"name": "api_pipe", "output_dir": str(tmp_path)},
              "sft": {"data": {"train": SFT_DATA, "limit": 8}, "train": {"max_steps": 1},
                      "run": {"progress": False, "tensorboard": False}}}
    plan = pt.pipeline(config, dry_run=True)
    assert plan.errors == [] and plan.lines[-1] == "config OK: 1 stages"
    result = pt.pipeline(config, overrides={"run.report": False})
    assert result.final_model == tmp_path / "api_pipe" / "sft" / "final" and result.final_model.is_dir()
    assert result.metrics["sft/step"] == 1 and math.isfinite(result.metrics["sft/loss"])


def _api_calls(tree) -> list[str]:
    """Every ``pt.<command>(...)`` call of a parsed source, as ``ast.dump`` text (no positions)."""
    import ast

    return [ast.dump(node) for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "pt"]


def test_the_example_notebook_holds_the_scripts_cells():
    """examples/api_quickstart.ipynb is nbformat 4 JSON whose code cells make the same API calls
    and define the same reward as examples/api_quickstart.py (which the quickstart runs)."""
    import ast

    notebook = json.loads((REPO / "examples/api_quickstart.ipynb").read_text())
    assert notebook["nbformat"] == 4 and notebook["metadata"]["kernelspec"]["language"] == "python"
    for cell in notebook["cells"]:
        assert {"cell_type", "metadata", "source", "id"} <= set(cell)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
    code = "\n".join("".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code")
    cells, script = ast.parse(code), ast.parse((REPO / "examples/api_quickstart.py").read_text())
    calls = _api_calls(cells)
    assert len(calls) == 3 and calls == _api_calls(script)  # sft, rl, the dry run

    def reward(tree):
        return next(ast.dump(node) for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                    and node.name == "correct_sum")

    assert reward(cells) == reward(script)
