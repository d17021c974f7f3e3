"""The HTML report: built from synthetic run directories; plots appear exactly when their metrics exist."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.errors import ConfigError
from posttrain.eval.metrics import wilson_interval
from posttrain.report import (
    before_after_rows,
    headline,
    pipeline_rows,
    eval_rows,
    find_stage_runs,
    load_report,
    render_html,
    summary_rows,
    write_report,
)


def write_jsonl(path: Path, records: list[dict], torn_tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records) + torn_tail)


def sft_metrics(steps: int = 5) -> list[dict]:
    records = [{"step": s, "epoch": s / steps, "lr": 1e-4 * (1 - s / steps), "loss": 2.0 / s, "grad_norm": 1.5 / s,
                "tokens_per_step": 100, "loss_agg_mode": "token-mean"} for s in range(1, steps + 1)]
    records.append({"step": steps, "val/loss": 0.9, "val/ppl": 2.46})
    return records


def rl_metrics(steps: int = 4) -> list[dict]:
    return [{"step": s, "loss": 0.01 * s, "lr": 1e-6, "reward/mean": 0.2 * s, "reward/std": 0.1,
             "reward/correct": 0.2 * s, "reward/format": 1.0, "acc": 0.2 * s, "kl": 0.001 * s,
             "entropy": "nan" if s == 2 else 0.5, "response_len/mean": 20 + s} for s in range(1, steps + 1)]


def eval_samples(correct: list[bool], completion_prefix: str, task: str = "arith") -> list[dict]:
    """Per-sample records as ``posttrain eval`` writes them (samples.jsonl)."""
    return [{"task": task, "id": str(i), "sample": 0, "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
             "completion": f"{completion_prefix} {2 * i if ok else -1}", "reference": str(2 * i),
             "score": float(ok), "correct": ok}
            for i, ok in enumerate(correct)]


def write_eval(stage_dir: Path, tasks: dict[str, dict], samples: list[dict], per_problem: dict | None = None,
               headline_task: str | None = None) -> None:
    """An eval/ directory as ``posttrain eval`` writes it: results.json + samples.jsonl."""
    (stage_dir / "eval").mkdir(parents=True, exist_ok=True)
    results = {"model": "m", "tasks": tasks, **({"per_problem": per_problem} if per_problem else {}),
               **({"headline_task": headline_task} if headline_task else {})}
    (stage_dir / "eval" / "results.json").write_text(json.dumps(results))
    write_jsonl(stage_dir / "eval" / "samples.jsonl", samples)


def accuracy_eval(correct: list[bool]) -> tuple[dict, dict]:
    """(metrics, per-problem scores) of one task as ``posttrain eval`` computes them (one
    completion per problem: Wilson's interval)."""
    accuracy = sum(correct) / len(correct)
    low, high = wilson_interval(sum(correct), len(correct))
    metrics = {"num_prompts": float(len(correct)), "accuracy": accuracy, "mean_score": accuracy,
               "accuracy/ci_low": low, "accuracy/ci_high": high}
    return metrics, {"ids": [str(i) for i in range(len(correct))], "accuracy": [float(c) for c in correct]}


@pytest.fixture
def pipeline_run(tmp_path: Path) -> Path:
    run = tmp_path / "quickstart"
    write_jsonl(run / "sft" / "metrics.jsonl", sft_metrics(), torn_tail='{"step": 6, "lo')
    write_jsonl(run / "rl" / "metrics.jsonl", rl_metrics())
    write_jsonl(run / "rl" / "samples.jsonl",
                [{"step": s, "prompt": "1+1?", "completion": f"answer {s}", "reward": s / 4} for s in range(1, 5)])
    (run / "pipeline.json").write_text(json.dumps({"stages": [
        {"name": "baseline", "kind": "eval", "status": "done", "wall_s": 30.0},
        {"name": "sft", "kind": "sft", "status": "done", "wall_s": 150.0},
        {"name": "rl", "kind": "rl", "status": "running"},
        {"name": "final", "kind": "eval", "status": "pending"}]}))
    for label, correct in (("baseline", [True, False, False, False]), ("sft", [True, True, False, False]),
                           ("rl", [True, True, True, False])):
        metrics, problems = accuracy_eval(correct)
        write_eval(run / label, {"arith": metrics}, eval_samples(correct, f"<b>{label}</b>"), {"arith": problems})
    return run


def images(page: str) -> dict[str, bytes]:
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    return {alt: base64.b64decode(data) for alt, data in found}


def test_pipeline_report_has_every_plot_whose_metrics_exist(pipeline_run: Path):
    page = render_html(load_report(pipeline_run))
    pngs = images(page)
    assert set(pngs) == {
        "held-out accuracy per stage", "Loss", "Learning rate", "Gradient norm (before clipping)",
        "Reward and accuracy per RL step", "KL to the reference", "Entropy", "Response length",
    }
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in pngs.values())
    # standalone: nothing fetched from elsewhere, no scripts
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert len(re.findall(r"<img ", page)) == len(pngs)


def test_sft_only_run_skips_absent_metrics(tmp_path: Path):
    run = tmp_path / "sft-run"
    write_jsonl(run / "metrics.jsonl", [{"step": s, "loss": 1.0 / s, "lr": 1e-5} for s in range(1, 4)])
    report = load_report(run)
    assert [stage.name for stage in report.stages] == ["sft-run"]
    page = render_html(report)
    assert set(images(page)) == {"Loss", "Learning rate"}
    assert "Held-out evaluation" not in page and "Sample completions" not in page


def test_stage_order_follows_pipeline_state_and_torn_line_is_ignored(pipeline_run: Path):
    stages = find_stage_runs(pipeline_run)
    assert [stage.name for stage in stages] == ["sft", "rl"]
    assert len(stages[0].metrics) == 6  # 5 steps + 1 validation line; the torn 7th line is dropped
    steps, values = stages[1].series("entropy")
    assert steps == [1.0, 3.0, 4.0] and values == [0.5, 0.5, 0.5]  # the "nan" of step 2 is left out


def test_summary_rows_and_gain_in_points(pipeline_run: Path):
    report = load_report(pipeline_run)
    rows = summary_rows(report)
    assert rows[0]["stage"] == "sft" and rows[0]["steps"] == "5"
    assert rows[0]["loss"] == "2 → 0.4"  # 2/1 then 2/5
    assert rows[1]["reward"] == "0.2 → 0.8" and rows[1]["acc"] == "0.2 → 0.8"
    scores = eval_rows(report)
    # Wilson 1/4 by hand: p = 0.25, z^2/n = 0.9604, centre 0.7302/1.9604 = 0.3725,
    # half 1.96 * sqrt(0.046875 + 0.060023) / 1.9604 = 0.3269 -> [4.6%, 69.9%]
    assert [(r["model"], r["score"], r["95% CI"], r["n"]) for r in scores] == [
        ("baseline", "25.0%", "[4.6, 69.9]", "4"), ("sft", "50.0%", "[15.0, 85.0]", "4"),
        ("rl", "75.0%", "[30.1, 95.4]", "4")]
    # paired over the same 4 problems: rl vs baseline, b = 2 newly right of m = 2 changed:
    # pi in [0.025^(1/2), 1] = [0.1581, 1], the change 2 (2 pi - 1) / 4 in [-34.2, +50.0] points;
    # rl vs sft, b = 1 of 1: pi in [0.025, 1], the change in [(0.05 - 1) / 4, 1 / 4] = [-23.75, +25]
    assert scores[2]["vs first"] == "+50.0 pts [-34.2, +50.0] incl. 0"
    assert scores[2]["vs previous"] == "+25.0 pts [-23.8, +25.0] incl. 0" and scores[0]["vs first"] == "-"


def test_before_after_table_puts_changed_prompts_first_and_escapes_html(pipeline_run: Path):
    report = load_report(pipeline_run)
    labels, rows = before_after_rows(report.evals)
    assert labels == ["baseline", "sft", "rl"]
    # prompts 1 and 2 changed score between baseline and rl; 0 and 3 did not
    assert [row["prompt"] for row in rows] == ["What is 1 + 1?", "What is 2 + 2?", "What is 0 + 0?", "What is 3 + 3?"]
    assert rows[1]["baseline"] == ("<b>baseline</b> -1", 0.0) and rows[1]["rl"] == ("<b>rl</b> 4", 1.0)
    page = render_html(report)
    assert "<b>rl</b>" not in page and "&lt;b&gt;rl&lt;/b&gt; 4" in page


def test_cli_report_writes_page_and_prints_summary(pipeline_run: Path, capsys):
    assert main(["report", str(pipeline_run)]) == 0
    out = capsys.readouterr().out
    assert (pipeline_run / "report.html").is_file()
    assert "held-out evaluation" in out and "+50.0 pts" in out and "report:" in out
    assert ("held-out arith (n=4): baseline 25.0% [4.6, 69.9] -> sft 50.0% [15.0, 85.0] -> rl 75.0% [30.1, 95.4]; "
            "rl vs baseline +50.0 pts [-34.2, +50.0] incl. 0; rl vs sft +25.0 pts [-23.8, +25.0] incl. 0") in out
    assert "95% interval over the n problems" in out


def test_report_of_a_directory_without_runs_is_a_one_line_user_error(tmp_path: Path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        write_report(tmp_path / "empty")
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory") and err.count("\n") == 1


def test_two_tasks_and_flat_eval_files(tmp_path: Path):
    """Gains are per task; a flat eval JSON (metrics at the top) in a single run directory also works."""
    run = tmp_path / "pipe"
    write_eval(run / "baseline", {"add": {"accuracy": 0.2}, "mul": {"accuracy": 0.1}}, [])
    write_eval(run / "rl", {"add": {"accuracy": 0.7}, "mul": {"accuracy": 0.05}}, [])
    rows = eval_rows(load_report(run))
    assert [(r["model"], r["task"], r["vs first"]) for r in rows] == [
        ("baseline", "add", "-"), ("baseline", "mul", "-"), ("rl", "add", "+50.0 pts"), ("rl", "mul", "-5.0 pts")]
    assert "held-out accuracy per stage" in images(render_html(load_report(run)))

    single = tmp_path / "single"
    write_jsonl(single / "metrics.jsonl", [{"step": 1, "loss": 1.0}])
    (single / "eval").mkdir()
    (single / "eval" / "gsm.json").write_text(json.dumps({"metrics": {"pass@1": 0.4}}))
    rows = eval_rows(load_report(single))
    assert [(r["model"], r["metric"], r["score"]) for r in rows] == [("gsm", "pass@1", "40.0%")]


def test_pipeline_table_shows_status_and_wall_time(pipeline_run: Path):
    rows = pipeline_rows(load_report(pipeline_run))
    assert [(r["stage"], r["status"], r["wall"]) for r in rows] == [
        ("baseline", "done", "30 s"), ("sft", "done", "2.5 min"), ("rl", "running", "-"), ("final", "pending", "-"),
        ("total", "", "3.0 min")]
    assert "<h2>Pipeline</h2>" in render_html(load_report(pipeline_run))


def agentic_like_run(tmp_path: Path, headline_task: str | None = None) -> Path:
    """Three tasks per stage as the agentic quickstart evaluates them: the tool task first, a
    subtraction control last; 100 problems each."""
    run = tmp_path / "agentic"
    correct = {  # per stage and task: which of 100 problems are right
        "baseline": {"arith_tool": [False] * 100, "arith_no_tool": [False] * 100, "subtraction": [False] * 100},
        "sft": {"arith_tool": [True] * 80 + [False] * 20, "arith_no_tool": [False] * 100,
                "subtraction": [True] * 14 + [False] * 86},
        "rl": {"arith_tool": [True] * 74 + [False] * 6 + [True] * 10 + [False] * 10, "arith_no_tool": [False] * 100,
               "subtraction": [True] * 10 + [False] * 90},
    }
    state = {"stages": [{"name": name, "kind": "eval", "status": "done"} for name in ("baseline", "sft", "rl")]}
    if headline_task:
        state["headline_task"] = headline_task
    run.mkdir(parents=True)
    (run / "pipeline.json").write_text(json.dumps(state))
    for label, tasks in correct.items():
        evaluated = {task: accuracy_eval(values) for task, values in tasks.items()}
        write_eval(run / label, {task: m for task, (m, _) in evaluated.items()}, [],
                   {task: problems for task, (_, problems) in evaluated.items()})
    return run


def test_the_headline_follows_the_first_task_and_says_which_changes_are_noise(tmp_path: Path):
    """The agentic quickstart's report once headlined the subtraction control (the last task);
    it follows the first task (the tool task), every task keeps its row with its interval, and
    a 4-point change on 100 problems (10 newly right, 6 newly wrong) is shown as noise."""
    report = load_report(agentic_like_run(tmp_path))
    line = headline(report)
    assert line.startswith("held-out arith_tool (n=100): baseline 0.0% [0.0, 3.7] -> sft 80.0% [71.1, 86.7] -> "
                           "rl 84.0% [75.6, 89.9]; rl vs baseline +84.0 pts ["), line
    assert "excl. 0; rl vs sft +4.0 pts [" in line and line.endswith("] incl. 0")
    rows = eval_rows(report)
    assert [(r["model"], r["task"]) for r in rows] == [
        (stage, task) for stage in ("baseline", "sft", "rl") for task in ("arith_tool", "arith_no_tool", "subtraction")]
    assert all(r["95% CI"].startswith("[") for r in rows)
    page = render_html(report)
    assert "<div class=gain>held-out arith_tool (n=100)" in page and "<div class=gain>held-out subtraction" not in page


def test_a_configured_headline_task_is_followed(tmp_path: Path):
    report = load_report(agentic_like_run(tmp_path, headline_task="subtraction"))
    assert headline(report).startswith("held-out subtraction (n=100): baseline 0.0% [0.0, 3.7] -> sft 14.0%")


def test_an_rl_runs_held_out_accuracy_from_its_metric_lines(tmp_path: Path, pipeline_run: Path):
    """RL logs its evaluations before the first step and after the last as metric lines: the
    Stages table shows first → last with the last one's interval, and the accuracy plot draws it."""
    run = tmp_path / "rl-run"
    lines = rl_metrics()
    lines.insert(0, {"step": 0, "eval/acc": 0.1, "eval/acc/ci_low": 0.028, "eval/acc/ci_high": 0.301, "eval/count": 20})
    lines.append({"step": 4, "eval/acc": 0.4, "eval/acc/ci_low": 0.219, "eval/acc/ci_high": 0.613, "eval/count": 20})
    write_jsonl(run / "metrics.jsonl", lines)
    report = load_report(run)
    (row,) = summary_rows(report)
    assert row["held-out acc"] == "0.1 → 0.4 [0.219, 0.613] n=20" and row["acc"] == "0.2 → 0.8"
    assert all("held-out acc" not in row for row in summary_rows(load_report(pipeline_run)))  # none logged there
    assert "Reward and accuracy per RL step" in images(render_html(report))
