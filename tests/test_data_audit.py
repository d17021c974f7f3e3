"""The pre-flight audit: hand-computed stats, truncation/drop counts, hard errors and refusal."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from posttrain.config import DataConfig
from posttrain.data import load_sft_data, preflight
from posttrain.errors import DataError

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "tests" / "templates"


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def chat(user: str, reply: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply, **extra}]}


def templated(tokenizer, name_or_text: str):
    clone = copy.deepcopy(tokenizer)
    path = TEMPLATES / f"{name_or_text}.jinja"
    clone.chat_template = name_or_text if "{" in name_or_text else path.read_text()
    return clone


def test_stats_match_hand_counts(tokenizer, tmp_path):
    rows = [chat("What is 2+2?", "4"), chat("Name a colour.", "Blue, like the sky on a clear day.")]
    path = write_rows(tmp_path / "d.jsonl", rows)
    prepared = load_sft_data(path, tokenizer, DataConfig())
    totals, trained = [], []
    for row in rows:
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        totals.append(len(tokenizer.encode(text, add_special_tokens=False)))
        trained.append(len(tokenizer.encode(row["messages"][1]["content"] + "<|im_end|>", add_special_tokens=False)))
    report = prepared.audit
    assert (report.rows, report.samples, report.tokens, report.trained_tokens) == (2, 2, sum(totals), sum(trained))
    ratios = [t / n for t, n in zip(trained, totals)]
    stats = report.ratio_stats()
    assert stats["min"] == pytest.approx(min(ratios)) and stats["max"] == pytest.approx(max(ratios))
    assert stats["mean"] == pytest.approx(sum(ratios) / 2)
    expected_histogram = [0] * 10
    for ratio in ratios:
        expected_histogram[int(ratio * 10)] += 1
    assert stats["histogram"] == expected_histogram
    assert report.hard_errors == [] and [s.line for s in prepared.samples] == [1, 2]
    printed = []
    preflight(prepared, allow_errors=False, print_fn=printed.append)
    assert any(f"trained tokens {sum(trained)}" in line for line in printed) and printed[-1].startswith("  result: OK")
    summary = report.to_dict()
    assert summary["ok"] and summary["tokens"] == sum(totals) and json.loads(json.dumps(summary)) == summary


def test_truncation_counts_and_drops(tokenizer, tmp_path):
    long_prompt = "word " * 60
    rows = [chat("short question", "a long answer " * 20), chat(long_prompt, "late answer"), chat("q", "a")]
    path = write_rows(tmp_path / "t.jsonl", rows)
    prepared = load_sft_data(path, tokenizer, DataConfig(max_length=40))
    report = prepared.audit
    assert report.truncated == [1, 2]
    assert [f.line for f in report.dropped] == [2] and "beyond max_length 40" in report.dropped[0].message
    assert [s.line for s in prepared.samples] == [1, 3]
    first = prepared.samples[0]
    assert len(first.input_ids) == 40 and first.truncated and sum(first.loss_mask) > 0
    assert report.untrained_end_of_turn == []  # a reply cut by truncation is not a template problem
    assert report.hard_errors == []

    dropped = load_sft_data(path, tokenizer, DataConfig(max_length=40, truncation="drop")).audit
    assert [f.line for f in dropped.dropped] == [1, 2] and dropped.truncated == [] and dropped.samples == 1
    with pytest.raises(DataError, match=r"t\.jsonl:1: sample has \d+ tokens, more than data\.max_length=40"):
        load_sft_data(path, tokenizer, DataConfig(max_length=40, truncation="error"))


def test_empty_mask_is_a_hard_error_and_preflight_refuses(tokenizer, tmp_path):
    rows = [chat("a", "b"), chat("c", "d", train=False), chat("e", "f")]
    path = write_rows(tmp_path / "e.jsonl", rows)
    prepared = load_sft_data(path, tokenizer, DataConfig())
    assert prepared.audit.empty_masks == [2] and [s.line for s in prepared.samples] == [1, 3]
    printed = []
    with pytest.raises(DataError) as info:
        preflight(prepared, allow_errors=False, print_fn=printed.append)
    message = str(info.value)
    assert message.startswith(f"{path}:2: no trained tokens in this sample (empty loss mask)")
    assert "data.allow_audit_errors=true" in message and "\n" not in message
    assert any("empty masks: 1  (line 2)  <- hard error" in line for line in printed)
    printed.clear()
    preflight(prepared, allow_errors=True, print_fn=printed.append)
    assert printed[-1].startswith("warning: 1 hard data error(s), first")


def test_consistency_failure_and_untrained_end_of_turn_are_hard_errors(tokenizer, tmp_path):
    path = write_rows(tmp_path / "c.jsonl", [chat("a", "b"), chat("c", "d")])
    trailing_space = templated(
        tokenizer,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    )
    report = load_sft_data(path, trailing_space, DataConfig()).audit
    assert [f.line for f in report.consistency_failures] == [1, 2]
    with pytest.raises(DataError, match=r"c\.jsonl:1: messages\[1\]: encode\(prompt\) is not a prefix of encode\(prompt \+ reply\) at token"):
        preflight(load_sft_data(path, trailing_space, DataConfig()), print_fn=None)

    no_eot = templated(tokenizer, "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    report = load_sft_data(path, no_eot, DataConfig()).audit
    assert [f.line for f in report.untrained_end_of_turn] == [1, 2]
    assert "no end-of-turn token" in report.untrained_end_of_turn[0].message


def test_bad_rows_stop_or_are_skipped_and_counted(tokenizer, tmp_path):
    path = write_rows(tmp_path / "b.jsonl", [chat("a", "b"), "{oops", {"messages": [{"role": "user", "content": "x"}]}, chat("c", "d")])
    with pytest.raises(DataError, match=r"b\.jsonl:2: malformed JSON"):
        load_sft_data(path, tokenizer, DataConfig())
    report = load_sft_data(path, tokenizer, DataConfig(skip_bad=True)).audit
    assert [f.line for f in report.bad_rows] == [2, 3] and "b.jsonl:3: no assistant turn" in report.bad_rows[1].message
    assert report.samples == 2 and report.hard_errors == []
    assert load_sft_data(path, tokenizer, DataConfig(skip_bad=True, limit=1)).audit.samples == 1


def test_nothing_usable_is_a_hard_error(tokenizer, tmp_path):
    path = write_rows(tmp_path / "n.jsonl", ["{oops"])
    prepared = load_sft_data(path, tokenizer, DataConfig(skip_bad=True))
    with pytest.raises(DataError, match=r"n\.jsonl: no usable training sample"):
        preflight(prepared, print_fn=None)


def test_history_rewrite_split_is_counted(tokenizer, tmp_path):
    row = {"messages": [
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>add</think>\n4"},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>add again</think>\n6"},
    ]}
    path = write_rows(tmp_path / "r.jsonl", [chat("a", "b"), row])
    prepared = load_sft_data(path, templated(tokenizer, "think_strip"), DataConfig())
    assert prepared.audit.split == [2] and [s.line for s in prepared.samples] == [1, 2, 2]
    assert prepared.audit.hard_errors == []
    with pytest.raises(DataError, match=r"r\.jsonl:2: the chat template rewrites history"):
        load_sft_data(path, templated(tokenizer, "think_strip"), DataConfig(history_rewrite="error"))


def test_shipped_tool_use_file(tokenizer):
    rows = ROOT / "examples" / "data" / "tool_use.jsonl"
    prepared = load_sft_data(rows, templated(tokenizer, "qwen_tools"), DataConfig())
    assert prepared.audit.hard_errors == [] and prepared.audit.samples == 6
    assert prepared.samples[-1].weights is not None  # the last row weights its final answer
    with pytest.raises(DataError, match=r"tool_use\.jsonl:1: the chat template drops tool calls"):
        load_sft_data(rows, tokenizer, DataConfig())
    skipped = load_sft_data(rows, tokenizer, DataConfig(skip_bad=True)).audit
    assert [f.line for f in skipped.bad_rows] == [1, 2, 3, 4, 5, 6]


def test_audit_sample_records_and_decides_by_hand():
    """The public per-sample check on hand-made samples: counts, cut, drop, refuse."""
    from posttrain.data.audit import AuditReport, audit_sample
    from posttrain.data.render import RenderedSample

    report = AuditReport(source="f.jsonl")
    kept = audit_sample(RenderedSample([1, 2, 3, 4], [0, 0, 1, 1], line=1), report, 8, "right", "f.jsonl:1")
    assert kept is not None and (report.samples, report.tokens, report.trained_tokens, report.ratios) == (1, 4, 2, [0.5])
    cut = audit_sample(RenderedSample([1, 2, 3, 4, 5, 6], [0, 1, 1, 1, 1, 1], line=2), report, 4, "right", "f.jsonl:2")
    assert cut.input_ids == [1, 2, 3, 4] and cut.trained_token_count == 3 and report.truncated == [2]
    late = RenderedSample([1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 1], line=3)
    assert audit_sample(late, report, 4, "right", "f.jsonl:3") is None  # every trained token cut
    assert audit_sample(late, report, 4, "drop", "f.jsonl:3") is None
    assert [f.line for f in report.dropped] == [3, 3]
    assert audit_sample(RenderedSample([1, 2], [0, 0], line=4), report, 8, "right", "f.jsonl:4") is None
    assert report.empty_masks == [4] and report.samples == 2 and report.tokens == 8
    with pytest.raises(DataError, match=r"^f.jsonl:3: sample has 6 tokens, more than data.max_length=4"):
        audit_sample(late, report, 4, "error", "f.jsonl:3")


# ----------------------------------------------------------------------------- rows that must be refused or flagged
def test_empty_replies_and_uncalled_tool_results_are_refused_or_skipped(tokenizer, tmp_path):
    """With a tool-capable template each of these rows would render and train; they are bad rows."""
    from posttrain.data.formats import BadRowError

    call = {"type": "function", "function": {"name": "convert", "arguments": {"amount": 5, "to": "EUR"}}}
    rows = [
        chat("Convert 5 USD to EUR.", "About 4.60 EUR."),
        chat("Convert 7 USD to EUR.", ""),
        chat("Convert 9 USD to EUR.", "\n  \n"),
        {"messages": [{"role": "user", "content": "Convert 3 USD."}, {"role": "assistant", "content": "One moment."},
                      {"role": "tool", "content": "2.76"}, {"role": "assistant", "content": "2.76 EUR."}]},
        {"messages": [{"role": "user", "content": "Convert 5 USD."}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "content": "4.60"}, {"role": "assistant", "content": "4.60 EUR."}]},
    ]
    path = write_rows(tmp_path / "fx.jsonl", rows)
    qwen = templated(tokenizer, "qwen_tools")
    with pytest.raises(BadRowError) as info:
        load_sft_data(path, qwen, DataConfig())
    assert str(info.value) == f"{path}:2: messages[1]: empty assistant reply (blank content and no tool calls)"
    report = load_sft_data(path, qwen, DataConfig(skip_bad=True)).audit
    assert [f.line for f in report.bad_rows] == [2, 3, 4] and report.samples == 2 and report.hard_errors == []
    assert report.bad_rows[2].message == (f"{path}:4: messages[2]: tool result with no assistant tool call before it "
                                          f"(messages[1] is an assistant message without tool_calls)")
    assert any("bad rows skipped: 3  (lines 2, 3, 4)" in line for line in report.summary_lines())


def test_truncation_that_cuts_the_end_of_turn_is_said_in_the_summary(tokenizer, tmp_path):
    rows = [chat("Describe the sea.", "Grey and wide and cold " * 12), chat("hi", "hello"),
            chat("Count to three.", "One, two, three.")]
    path = write_rows(tmp_path / "long.jsonl", rows)
    short = len(tokenizer.encode(tokenizer.apply_chat_template(rows[2]["messages"], tokenize=False), add_special_tokens=False))
    prepared = load_sft_data(path, tokenizer, DataConfig(max_length=short - 1))  # the third row loses only "\n"
    report = prepared.audit
    assert report.truncated == [1, 3] and report.truncated_end_of_turn == [1] and report.hard_errors == []
    assert ("    of which end-of-turn cut off (the model will not learn to stop on these rows): 1  (line 1)"
            in report.summary_lines())
    assert report.to_dict()["truncated_end_of_turn"] == {"count": 1, "lines": [1]}
    from posttrain.data.audit import format_sample

    assert "! end-of-turn cut off by truncation: messages[1]" in format_sample(prepared.samples[0], tokenizer, colour=False)


def test_a_token_merge_split_is_not_called_a_history_rewrite(tokenizer, tmp_path):
    # a reply ending in "\n\n" is one token at the end of its own render, two once plain text follows it
    merging = templated(tokenizer, "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}<|im_end|>"
                                   "{% else %}<|im_start|>{{ m.content }}{% endif %}{% endfor %}"
                                   "{% if add_generation_prompt %}<|im_start|>{% endif %}")
    row = {"messages": [{"role": "user", "content": "list"}, {"role": "assistant", "content": "- a\n- b\n\n"},
                        {"role": "user", "content": "more"}, {"role": "assistant", "content": "- c<|im_end|>"}]}
    path = write_rows(tmp_path / "m.jsonl", [row])
    # this template writes no end of turn after a reply: the row writes it, and says it means it
    prepared = load_sft_data(path, merging, DataConfig(allow_special_tokens_in_text=["<|im_end|>"]))
    report = prepared.audit
    assert report.split == [] and [f.line for f in report.consistency_failures] == [1]
    assert "tokens merge across the turn boundary" in report.consistency_failures[0].message
    summary = "\n".join(report.summary_lines())
    assert "rewrites history" not in summary
    from posttrain.data.audit import format_sample

    views = [format_sample(sample, merging, colour=False) for sample in prepared.samples]
    assert all("split turn (tokens merge across a turn boundary)" in view for view in views)
