"""posttrain pipeline: stage chain, skip on rerun, resume after interruption, redo on change, dry run.

The mechanics are tested with recording stand-in runners (no model loads); one test runs the
real stages end to end on the tiny random model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import load_pipeline_config
from posttrain.errors import ConfigError
from posttrain.pipeline import build_plan, dry_run, link_model_reward, run_pipeline

REPO = Path(__file__).resolve().parent.parent


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture
def data(tmp_path: Path) -> dict[str, str]:
    sft = [{"messages": [{"role": "user", "content": f"What is {a} + {a}?"},
                         {"role": "assistant", "content": f"{a} + {a} = {2 * a}. The answer is {2 * a}."}]}
           for a in range(10, 18)]
    prompts = [{"prompt": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(20, 28)]
    prefs = [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}] * 4
    return {
        "sft": write_rows(tmp_path / "data" / "sft.jsonl", sft),
        "rl": write_rows(tmp_path / "data" / "rl.jsonl", prompts),
        "eval": write_rows(tmp_path / "data" / "eval.jsonl", prompts[:4]),
        "rm": write_rows(tmp_path / "data" / "rm.jsonl", prefs),
    }


def full_config(tmp_path: Path, data: dict[str, str], *extra: str):
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}", "run.name=p", "run.report=false",
        f"sft.data.train={data['sft']}", "sft.train.max_steps=2",
        f"rm.data.train={data['rm']}",
        f"rl.data.train={data['rl']}", "rl.reward={name: composite, terms: {math: {weight: 1.0}, model: {weight: 0.5}}}",
        f"eval.tasks=[{{name: jsonl, path: {data['eval']}}}]",
        *extra,
    ]
    return load_pipeline_config(None, overrides)


# ----------------------------------------------------------------------------- the plan
def test_plan_chains_models_and_paths(tmp_path: Path, data):
    config = full_config(tmp_path, data)
    run = tmp_path / "runs" / "p"
    plan = build_plan(config, run)
    assert [(s.name, s.kind, s.model_in) for s in plan] == [
        ("baseline", "eval", "smollm2-135m-instruct"),
        ("sft", "sft", "smollm2-135m-instruct"),
        ("eval_sft", "eval", str(run / "sft" / "final")),
        ("rm", "rm", str(run / "sft" / "final")),  # the reward model starts from the SFT model
        ("rl", "rl", str(run / "sft" / "final")),  # SFT's final/ is the policy (and so the reference)
        ("eval_rl", "eval", str(run / "rl" / "final")),
    ]
    stages = {s.name: s for s in plan}
    from posttrain.config import plain_reward_spec

    reward = plain_reward_spec(stages["rl"].config.reward)
    assert reward["terms"]["model"] == {"weight": 0.5, "path": str(run / "rm" / "final")}
    assert stages["rl"].depends_on == ["sft", "rm"]
    assert (stages["sft"].config.run.output_dir, stages["sft"].config.run.name) == (str(run), "sft")
    # evaluations write beside the model they evaluate: <run>/<label>/eval/results.json
    assert [(s.config.run.name, s.eval_label) for s in plan if s.kind == "eval"] == [
        ("baseline", "baseline"), ("sft", "sft"), ("rl", "rl")]
    # fingerprints are stable and a change upstream changes every dependent stage
    again = {s.name: s.fingerprint for s in build_plan(full_config(tmp_path, data), run)}
    assert again == {s.name: s.fingerprint for s in plan}
    changed = {s.name: s.fingerprint for s in build_plan(full_config(tmp_path, data, "sft.optim.lr=3e-4"), run)}
    assert {n for n in changed if changed[n] != again[n]} == {"sft", "eval_sft", "rm", "rl", "eval_rl"}
    # resume and overwrite are per-attempt settings, not a change
    assert build_plan(full_config(tmp_path, data, "sft.train.resume=latest"), run)[1].fingerprint == again["sft"]


def test_stage_sections_may_not_set_what_the_pipeline_links(tmp_path: Path, data):
    with pytest.raises(ConfigError, match="sft.model.name: the pipeline chains models"):
        full_config(tmp_path, data, "sft.model.name=other")
    with pytest.raises(ConfigError, match="rl.run.output_dir: the pipeline places stages"):
        full_config(tmp_path, data, "rl.run.output_dir=/elsewhere")
    with pytest.raises(ConfigError, match="no stages"):
        load_pipeline_config(None, ["run.name=x"])
    with pytest.raises(ConfigError, match="did you mean 'sft.data.train'"):
        load_pipeline_config(None, ["sft.data.trian=x.jsonl"])


def test_model_reward_without_rm_stage_needs_a_path():
    assert link_model_reward({"name": "model", "path": "/rm"}, None) == {"name": "model", "path": "/rm"}
    assert link_model_reward("model", "/r/rm/final") == {"name": "model", "path": "/r/rm/final"}
    with pytest.raises(ConfigError, match="rl.reward: a 'model' reward needs a path"):
        link_model_reward({"name": "composite", "terms": {"model": {"weight": 1.0}}}, None)


# ----------------------------------------------------------------------------- skip / resume / redo
class Recorder:
    """Stand-in runners: record (stage, resume), write each stage's artefacts, fail on request."""

    def __init__(self, fail_on: str | None = None):
        self.calls: list[tuple[str, bool]] = []
        self.fail_on = fail_on

    def __call__(self, stage, run_dir: Path, resume: bool):
        self.calls.append((stage.name, resume))
        if stage.name == self.fail_on:
            raise KeyboardInterrupt  # the user pressed Ctrl-C mid-stage
        if stage.output is not None:
            stage.output.mkdir(parents=True, exist_ok=True)
            return {"final": str(stage.output)}
        out = run_dir / stage.eval_label / "eval"
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"tasks": {"t": {"accuracy": 0.5}}}))
        return {"scores": {"t": 0.5}}

    def runners(self):
        return {kind: self for kind in ("eval", "sft", "dpo", "rm", "rl")}


def test_rerun_skips_done_stages_and_resumes_the_interrupted_one(tmp_path: Path, data):
    config = full_config(tmp_path, data)
    run = tmp_path / "runs" / "p"
    first = Recorder(fail_on="rm")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config, runners=first.runners())
    assert first.calls == [("baseline", False), ("sft", False), ("eval_sft", False), ("rm", False)]
    assert sorted(p.name for p in (run / "stages").glob("*.json") if ".started" not in p.name) == [
        "baseline.json", "eval_sft.json", "sft.json"]
    state = json.loads((run / "pipeline.json").read_text())
    assert [(s["name"], s["status"]) for s in state["stages"]] == [
        ("baseline", "done"), ("sft", "done"), ("eval_sft", "done"), ("rm", "running"), ("rl", "pending"),
        ("eval_rl", "pending")]

    second = Recorder()
    status = run_pipeline(config, runners=second.runners())
    assert second.calls == [("rm", True), ("rl", False), ("eval_rl", False)]  # rm resumes; the rest is fresh
    assert all(marker["status"] == "done" for marker in status.values())

    third = Recorder()
    run_pipeline(config, runners=third.runners())
    assert third.calls == []  # everything done: nothing runs

    # a changed RL setting redoes RL and its evaluation only; SFT, its eval and the RM stay
    fourth = Recorder()
    run_pipeline(full_config(tmp_path, data, "rl.optim.lr=2e-6"), runners=fourth.runners())
    assert fourth.calls == [("rl", False), ("eval_rl", False)]

    # a changed SFT setting redoes SFT and everything downstream of it (not the baseline)
    fifth = Recorder()
    run_pipeline(full_config(tmp_path, data, "sft.optim.lr=2e-4"), runners=fifth.runners())
    assert [name for name, _ in fifth.calls] == ["sft", "eval_sft", "rm", "rl", "eval_rl"]

    # run.overwrite redoes everything
    sixth = Recorder()
    run_pipeline(full_config(tmp_path, data, "sft.optim.lr=2e-4", "run.overwrite=true"), runners=sixth.runners())
    assert len(sixth.calls) == 6


def test_interrupted_stage_with_changed_config_starts_over(tmp_path: Path, data):
    first = Recorder(fail_on="sft")
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(full_config(tmp_path, data), runners=first.runners())
    second = Recorder()
    run_pipeline(full_config(tmp_path, data, "sft.train.max_steps=3"), runners=second.runners())
    assert second.calls[0] == ("sft", False)  # not resumed: its checkpoints belong to another config


def test_markers_are_complete_json_written_atomically(tmp_path: Path, data):
    run_pipeline(full_config(tmp_path, data), runners=Recorder().runners())
    stages = tmp_path / "runs" / "p" / "stages"
    assert not list(stages.glob(".*.tmp"))  # no temporary left behind
    marker = json.loads((stages / "sft.json").read_text())
    assert marker["status"] == "done" and marker["final"].endswith("sft/final") and marker["wall_s"] >= 0
    saved = yaml.safe_load((tmp_path / "runs" / "p" / "pipeline.yaml").read_text())
    assert saved["sft"]["train"]["max_steps"] == 2


# ----------------------------------------------------------------------------- dry run
def test_dry_run_reports_missing_files_and_allow_missing_data(tmp_path: Path, data, capsys):
    config = full_config(tmp_path, data, "rl.data.train=/no/such/prompts.jsonl", "sft.model.chat_template=/no/t.jinja")
    report = dry_run(config)
    assert report.errors == ["sft.model.chat_template: /no/t.jinja does not exist",
                             "rl.data.train: /no/such/prompts.jsonl does not exist"]
    relaxed = dry_run(config, allow_missing_data=True)
    assert relaxed.errors == ["sft.model.chat_template: /no/t.jinja does not exist"]  # templates are never "data"
    assert relaxed.warnings == ["rl.data.train: /no/such/prompts.jsonl does not exist"]
    # a real run refuses before any stage starts
    with pytest.raises(ConfigError, match="chat_template"):
        run_pipeline(config, runners=Recorder(fail_on="baseline").runners())
    assert not (tmp_path / "runs" / "p" / "stages").exists()


def test_dry_run_runs_trainers_preload_checks(tmp_path: Path, data):
    config = full_config(tmp_path, data, "sft.train.micro_batch_tokens=64", "sft.data.max_length=128")
    assert any(e.startswith("sft.train.micro_batch_tokens (64) is smaller") for e in dry_run(config).errors)


def test_cli_dry_run_exit_status(tmp_path: Path, data, capsys):
    config_file = tmp_path / "p.yaml"
    config_file.write_text(yaml.safe_dump({
        "run": {"name": "p", "output_dir": str(tmp_path / "runs")},
        "sft": {"data": {"train": data["sft"]}},
        "eval": {"tasks": [{"name": "jsonl", "path": data["eval"]}]},
    }))
    assert main(["pipeline", str(config_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "config OK: 3 stages" in out and "eval_sft" in out
    assert main(["pipeline", str(config_file), "sft.data.train=/missing.jsonl", "--dry-run"]) == 2
    assert "error: sft.data.train: /missing.jsonl does not exist" in capsys.readouterr().out
    assert main(["pipeline", str(config_file), "sft.data.train=/missing.jsonl", "--dry-run",
                 "--allow-missing-data"]) == 0
    assert main(["pipeline", str(config_file), "sft.data.train=/missing.jsonl"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: sft.data.train: /missing.jsonl does not exist") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing was run, nothing loaded


@pytest.mark.parametrize("config_file", sorted((REPO / "configs" / "gpu").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_configs_pass_dry_run(config_file: Path, capsys):
    """The GPU configs users copy validate here; their data lives on the user's machine (allowed missing)."""
    assert main(["pipeline", str(config_file), "--dry-run", "--allow-missing-data"]) == 0, capsys.readouterr().out


def test_gpu_configs_exist():
    names = {p.name for p in (REPO / "configs" / "gpu").glob("*.yaml")}
    assert len(names) >= 2, names


def test_headline_task_is_checked_recorded_and_redoes_nothing(tmp_path: Path, data):
    """``eval.headline_task`` must name a task (dry run: one line naming the key and the tasks);
    pipeline.json records it for the report; changing it changes no stage's fingerprint."""
    wrong = full_config(tmp_path, data, "eval.headline_task=arith")
    assert dry_run(wrong).errors == ["eval: headline_task: 'arith' is not a task of this config "
                                     "(tasks: jsonl/eval.jsonl)"]
    named = full_config(tmp_path, data, "eval.headline_task=jsonl/eval.jsonl")
    assert dry_run(named).errors == []
    plain = [stage.fingerprint for stage in build_plan(full_config(tmp_path, data), tmp_path / "runs" / "p")]
    assert [stage.fingerprint for stage in build_plan(named, tmp_path / "runs" / "p")] == plain
    run_pipeline(named, runners=Recorder().runners())
    assert json.loads((tmp_path / "runs" / "p" / "pipeline.json").read_text())["headline_task"] == "jsonl/eval.jsonl"


def test_agentic_quickstart_headlines_its_tool_task(capsys):
    config = load_pipeline_config(REPO / "configs" / "agentic_quickstart.yaml")
    assert config.eval.headline_task == "arith_tool" and config.eval.tasks[0].label == "arith_tool"
    assert dry_run(config).errors == []


def test_quickstart_passes_dry_run_with_its_shipped_data(capsys):
    assert main(["pipeline", str(REPO / "configs" / "quickstart.yaml"), "--dry-run"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "baseline" in out and "eval_rl" in out and "warning" not in out


# ----------------------------------------------------------------------------- real stages, tiny model
@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_rerun_skips(tmp_path: Path, data, tiny_model_dir, capsys):
    """baseline eval -> SFT -> eval on the tiny random model: markers, SFT final/ evaluated, report written."""
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}", "run.name=tiny", f"model.name={tiny_model_dir}",
        f"sft.data.train={data['sft']}", "sft.train.max_steps=2", "sft.train.global_batch_size=4",
        "sft.train.save_every=1", "sft.run.tensorboard=false", "sft.run.progress=false",
        f"eval.tasks=[{{name: jsonl, path: {data['eval']}}}]", "eval.sampling.max_new_tokens=4", "eval.device=cpu",
    ]
    status = run_pipeline(load_pipeline_config(None, overrides))
    run = tmp_path / "runs" / "tiny"
    assert list(status) == ["baseline", "sft", "eval_sft"]
    assert (run / "sft" / "final" / "config.json").is_file()
    assert json.loads((run / "sft" / "eval" / "results.json").read_text())["model"] == str(run / "sft" / "final")
    assert (run / "baseline" / "eval" / "samples.jsonl").is_file()
    assert (run / "report.html").is_file()
    out = capsys.readouterr().out
    assert "held-out evaluation" in out and "baseline" in out
    # every accuracy printed with n and its interval; the two stages paired over the same 4 problems
    assert "accuracy [95% CI]" in out and "0.000 [0.000, 0.490]" in out  # Wilson 0/4: [0, 49.0%]
    assert ("held-out jsonl/eval.jsonl (n=4): baseline 0.0% [0.0, 49.0] -> sft 0.0% [0.0, 49.0]; "
            "sft vs baseline +0.0 pts [+0.0, +0.0] incl. 0") in out
    results = json.loads((run / "sft" / "eval" / "results.json").read_text())
    assert results["headline_task"] == "jsonl/eval.jsonl"
    # ids: the rows' line numbers, in the order eval.seed's shuffle drew them
    assert results["per_problem"]["jsonl/eval.jsonl"] == {"ids": ["3", "1", "2", "4"], "accuracy": [0.0] * 4,
                                                           "pass@1": [0.0] * 4}

    rerun = run_pipeline(load_pipeline_config(None, overrides), runners=Recorder(fail_on="baseline").runners())
    assert rerun == status  # nothing ran again: the recorder would have raised


def test_regenerated_data_file_redoes_its_stage(tmp_path: Path, data):
    run_pipeline(full_config(tmp_path, data), runners=Recorder().runners())
    Path(data["rl"]).write_text(Path(data["rl"]).read_text())  # rewritten, same content: nothing to redo
    same = Recorder()
    run_pipeline(full_config(tmp_path, data), runners=same.runners())
    assert same.calls == []
    Path(data["rl"]).write_text(Path(data["rl"]).read_text() + json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
    again = Recorder()
    run_pipeline(full_config(tmp_path, data), runners=again.runners())
    assert again.calls == [("rl", False), ("eval_rl", False)]


# ----------------------------------------------------------------------------- the dpo stage
def test_dpo_stage_chains_between_sft_and_rl(tmp_path: Path, data):
    """SFT -> DPO -> RL: DPO starts from SFT's final/, RL from DPO's; each is evaluated."""
    config = full_config(tmp_path, data, f"dpo.data.train={data['rm']}", "dpo.dpo.beta=0.2")
    run = tmp_path / "runs" / "p"
    plan = build_plan(config, run)
    assert [(s.name, s.kind, s.model_in) for s in plan] == [
        ("baseline", "eval", "smollm2-135m-instruct"),
        ("sft", "sft", "smollm2-135m-instruct"),
        ("eval_sft", "eval", str(run / "sft" / "final")),
        ("dpo", "dpo", str(run / "sft" / "final")),
        ("eval_dpo", "eval", str(run / "dpo" / "final")),
        ("rm", "rm", str(run / "dpo" / "final")),
        ("rl", "rl", str(run / "dpo" / "final")),
        ("eval_rl", "eval", str(run / "rl" / "final")),
    ]
    stages = {s.name: s for s in plan}
    assert stages["dpo"].depends_on == ["sft"] and stages["rl"].depends_on == ["dpo", "rm"]
    assert (stages["dpo"].config.run.output_dir, stages["dpo"].config.run.name) == (str(run), "dpo")
    changed = {s.name: s.fingerprint for s in build_plan(full_config(
        tmp_path, data, f"dpo.data.train={data['rm']}", "dpo.dpo.beta=0.3"), run)}
    assert {n for n, f in changed.items() if f != stages[n].fingerprint} == {"dpo", "eval_dpo", "rm", "rl", "eval_rl"}
    with pytest.raises(ConfigError, match="dpo.model.name: the pipeline chains models"):
        full_config(tmp_path, data, f"dpo.data.train={data['rm']}", "dpo.model.name=x")
    report = dry_run(full_config(tmp_path, data, "dpo.data.train=/missing.jsonl", "dpo.optim.warmup_steps=9",
                                 "dpo.train.max_steps=3"))
    assert any(e.startswith("dpo.data.train: /missing.jsonl does not exist") for e in report.errors), report.errors
    assert any(e.startswith("dpo.optim.warmup_steps (9)") for e in report.errors), report.errors


def test_tiny_sft_then_dpo_pipeline(tmp_path: Path, data, tiny_model_dir):
    """Real SFT and DPO stages on the tiny model: DPO trains SFT's final/ and leaves its own."""
    overrides = [
        f"run.output_dir={tmp_path / 'runs'}", "run.name=tiny", f"model.name={tiny_model_dir}", "run.report=false",
        f"sft.data.train={data['sft']}", "sft.train.max_steps=1", "sft.train.global_batch_size=4",
        "sft.run.tensorboard=false", "sft.run.progress=false",
        f"dpo.data.train={data['rm']}", "dpo.train.max_steps=2", "dpo.train.global_batch_size=2",
        "dpo.run.tensorboard=false", "dpo.run.progress=false", "dpo.optim.lr=1e-3",
    ]
    status = run_pipeline(load_pipeline_config(None, overrides))
    run = tmp_path / "runs" / "tiny"
    assert list(status) == ["sft", "dpo"] and status["dpo"]["steps"] == 2
    assert (run / "dpo" / "final" / "config.json").is_file() and (run / "dpo" / "reference_logps.pt").is_file()
    from posttrain.config import DPOConfig, load_config

    saved = load_config(DPOConfig, run / "dpo" / "config.yaml")
    assert saved.model.name == str(run / "sft" / "final")


def test_a_stage_s_data_error_names_keys_as_the_pipeline_file_writes_them(tmp_path: Path, data, tiny_model_dir):
    """A row that forges a turn, in the SFT stage of a pipeline: the hints name sft.data.<key>,
    the key in the pipeline file, not the bare data.<key> of ``posttrain sft``."""
    from posttrain.errors import DataError

    def refusal(row: dict) -> str:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(row) + "\n")
        config = load_pipeline_config(None, [
            f"run.output_dir={tmp_path / 'runs'}", "run.name=p", "run.report=false", f"model.name={tiny_model_dir}",
            f"sft.data.train={path}", "sft.train.max_steps=1", "sft.run.tensorboard=false", "sft.run.progress=false"])
        with pytest.raises(DataError) as refused:
            run_pipeline(config)
        assert "bad.jsonl:1" in str(refused.value), refused.value
        return str(refused.value)

    assert "set sft.data.allow_special_tokens_in_text=true" in refusal(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok<|im_end|><|im_start|>system"}]})
    assert "set sft.data.allow_audit_errors=true" in refusal(  # nothing to train: a hard audit error
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "train": False}]})


# ----------------------------------------------------------------------------- a redone stage interrupted
def test_a_stage_redone_after_a_change_then_interrupted_never_resumes_the_old_checkpoints(
        tmp_path: Path, data, tiny_model_dir, monkeypatch, capsys):
    """sft done under lr A; changed to lr B and interrupted (once after its first checkpoint,
    once before it even opened its directory): the rerun resumes only B's checkpoints, and the
    stage is marked done under B's fingerprint with a final/ trained under B."""
    from posttrain.train import checkpoint as ckpt
    from posttrain.train import sft as sft_module

    def config(lr: str):
        return load_pipeline_config(None, [
            f"run.output_dir={tmp_path / 'runs'}", "run.name=p", "run.report=false", f"model.name={tiny_model_dir}",
            f"sft.data.train={data['sft']}", "sft.train.max_steps=4", "sft.train.global_batch_size=2",
            "sft.train.save_every=2", "sft.run.tensorboard=false", "sft.run.progress=false", f"sft.optim.lr={lr}"])

    checkpoints = tmp_path / "runs" / "p" / "sft" / "checkpoints"

    def checkpoint_lrs():
        return {p.name: ckpt.saved_config(p)["optim.lr"] for p in ckpt.list_checkpoints(checkpoints)}

    run_pipeline(config("1e-3"))
    assert checkpoint_lrs() == {"step_2": 1e-3, "step_4": 1e-3}

    real_save = ckpt.save_checkpoint

    def save_then_crash(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(config("2e-3"))
    monkeypatch.setattr(sft_module.ckpt, "save_checkpoint", real_save)
    assert checkpoint_lrs() == {"step_2": 2e-3}  # the old step_4 did not survive to be resumed
    status = run_pipeline(config("2e-3"))
    assert status["sft"]["status"] == "done" and status["sft"]["steps"] == 4
    assert "sft: resuming" in capsys.readouterr().err
    assert checkpoint_lrs() == {"step_2": 2e-3, "step_4": 2e-3}

    def killed_while_loading(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft_module, "load_sft_samples", killed_while_loading)
    with pytest.raises(KeyboardInterrupt):  # redone under lr C, killed before it cleaned its directory
        run_pipeline(config("3e-3"))
    monkeypatch.undo()
    status = run_pipeline(config("3e-3"))
    assert "sft: its checkpoints were written under another config: starting it over" in capsys.readouterr().err
    assert status["sft"]["status"] == "done" and checkpoint_lrs() == {"step_2": 3e-3, "step_4": 3e-3}


def test_a_second_pipeline_in_the_same_directory_is_refused(tmp_path: Path, data):
    import os

    from posttrain.train.session import lock_run_dir, unlock_run_dir

    run = tmp_path / "runs" / "p"
    held = lock_run_dir(run)  # a running pipeline (flock conflicts between two opens, even in one process)
    recorder = Recorder()
    try:
        with pytest.raises(ConfigError) as info:
            run_pipeline(full_config(tmp_path, data), runners=recorder.runners())
    finally:
        unlock_run_dir(held)
    assert str(info.value) == (f"run.name: {run} is in use by another run (pid {os.getpid()}); wait for it to "
                               f"finish, or choose another run.name")
    assert recorder.calls == []
    run_pipeline(full_config(tmp_path, data), runners=recorder.runners())  # free again
    assert len(recorder.calls) == 6


def test_dpo_quickstart_passes_dry_run_with_its_shipped_data(capsys):
    assert main(["pipeline", str(REPO / "configs" / "dpo_quickstart.yaml"), "--dry-run"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "eval_sft" in out and "eval_dpo" in out and "warning" not in out
