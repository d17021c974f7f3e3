"""The pre-flight data audit: load + render a data file, check every sample, summarise, refuse.

The checklist of ``docs/PREFLIGHT.md``, automated and run by every training command before its
first step (``load_sft_data`` then ``preflight``), and shown by ``posttrain inspect``:

- every row parses, is a conversation a model should learn from (``formats.check_turns``: no
  empty assistant reply, no tool result without a tool call) and renders without losing
  content (``render``) - else one line naming file:line; ``skip_bad`` counts and skips;
- ``encode(whole conversation) == concatenated incremental pieces`` (consistency failures name
  the line and the first differing token, decoded);
- every trained assistant turn has its end-of-turn token trained;
- no sample without trained tokens;
- no text of a row (any message, tool call or tool schema; tool results are defused instead)
  holds the string of one of the tokenizer's added or special tokens (``<|im_end|>``,
  ``<file_sep>``...), which would reach the model as that control token: such a row is a bad
  row unless ``data.allow_special_tokens_in_text`` allows it; counted either way;
- ``masked_token_ratio`` (trained / all tokens) per sample: min, mean, max, histogram;
- truncation to ``max_length`` counted, and among those the samples whose cut removed a
  trained end-of-turn token (the model will not learn to stop on them); a sample whose trained
  tokens were all cut is dropped and counted.

Hard errors (refuse to train unless ``allow_audit_errors``; ``inspect`` exits 1): consistency
failures, untrained end-of-turn tokens, samples with an empty mask, no usable sample at all.

RL prompt files go through the same report and ``preflight`` (``load_prompt_data``,
``preflight_prompts``): every row parses and holds a non-empty prompt that renders and every
field its reward reads (``rewards.registry.reward_fields``: ``answer`` for ``math``, the named
columns of a TRL-style function), prompts longer than ``data.max_prompt_length`` are dropped
and counted, no prompt left is a hard error. ``data.columns`` renames fields first; TRL's
``{"text"}`` rows are counted as language-modelling rows (loss on every token).

The views (terminal text with colour or ``[[...]]`` brackets, a standalone HTML page, a JSON
summary, a JSON-lines dump) live here too: look at the mask, do not trust it
(``docs/PREFLIGHT.md``).
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from posttrain.data.formats import BadRowError, conversation_from_row, read_rows_or_errors, text_from_row
from posttrain.data.mixture import Mixture, SourceCount, data_sources, draw_items, is_mixture, mixture_lines, read_mixture, source_counts
from posttrain.data.render import (
    AllowControlText,
    ControlTextError,
    RenderedSample,
    RenderJob,
    render_batch,
    render_text,
    check_control_text,
    truncate_sample,
)
from posttrain.errors import DataError, config_key
from posttrain.log import say_stdout
from posttrain.data.formats import prompt_from_row
from posttrain.data.render import render_prompt

HISTOGRAM_BINS = 10
SHOW_LINES = 10  # line numbers listed per finding in the text summary
CHUNK_ROWS = 256  # rows rendered per batched tokenizer call


@dataclass
class Finding:
    line: int
    message: str


@dataclass
class AuditReport:
    """What the audit found in one data file. Lines are the data file's line/row numbers."""

    source: str
    kind: str = "samples"  # "samples" (training conversations) or "prompts" (RL prompt rows)
    rows: int = 0  # rows rendered
    samples: int = 0  # samples (or prompts) kept for training
    tokens: int = 0
    trained_tokens: int = 0
    ratios: list[float] = field(default_factory=list)  # masked_token_ratio of each kept sample
    bad_rows: list[Finding] = field(default_factory=list)  # skipped (skip_bad)
    truncated: list[int] = field(default_factory=list)
    truncated_end_of_turn: list[int] = field(default_factory=list)  # truncated samples that lost a trained end-of-turn
    dropped: list[Finding] = field(default_factory=list)  # all trained tokens cut, or too long with truncation=drop
    text_rows: list[int] = field(default_factory=list)  # language-modelling rows ({"text"}): loss on every token
    split: list[int] = field(default_factory=list)  # conversations split because the template rewrites history
    # (a split where tokens merge across a turn boundary is not a rewrite: it is a consistency failure)
    consistency_failures: list[Finding] = field(default_factory=list)
    untrained_end_of_turn: list[Finding] = field(default_factory=list)
    empty_masks: list[int] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    # rows whose text holds a control-token string (data.allow_special_tokens_in_text)
    control_text_kept: list[int] = field(default_factory=list)  # allowed: rendered as the control token
    control_text_refused: list[int] = field(default_factory=list)  # refused and skipped (skip_bad)
    seconds: float = 0.0
    # a mixture of sources (data.mixture): the counts above are the mixture's (repetitions counted),
    # the findings are each source's own, in ``parts`` (one report per source drawn from)
    parts: list["AuditReport"] = field(default_factory=list)
    sources: list[SourceCount] = field(default_factory=list)
    mixture_lines: list[str] = field(default_factory=list)

    @property
    def hard_errors(self) -> list[Finding]:
        """Every hard error, ordered by line (a mixture: each source's, source by source)."""
        if self.parts:
            return [finding for part in self.parts for finding in part.hard_errors]
        found = list(self.consistency_failures) + list(self.untrained_end_of_turn)
        found += [Finding(line, "no trained tokens in this sample (empty loss mask)") for line in self.empty_masks]
        found.sort(key=lambda finding: finding.line)
        if self.samples == 0:
            found.append(Finding(0, "no usable prompt in the file" + (
                f" ({len(self.dropped)} longer than {config_key('data.max_prompt_length')})" if self.dropped else "")
                if self.kind == "prompts" else "no usable training sample in the file"))
        return found

    def ratio_stats(self) -> dict[str, Any]:
        if not self.ratios:
            return {"min": None, "mean": None, "max": None, "histogram": [0] * HISTOGRAM_BINS}
        histogram = [0] * HISTOGRAM_BINS
        for ratio in self.ratios:
            histogram[min(HISTOGRAM_BINS - 1, int(ratio * HISTOGRAM_BINS))] += 1
        return {
            "min": min(self.ratios),
            "mean": sum(self.ratios) / len(self.ratios),
            "max": max(self.ratios),
            "histogram": histogram,
        }

    def to_dict(self) -> dict[str, Any]:
        """The summary as one JSON-able object (``inspect --json``)."""

        def findings(items: list[Finding]) -> list[dict[str, Any]]:
            return [{"line": item.line, "message": item.message} for item in items]

        return {
            "source": self.source,
            "kind": self.kind,
            "rows": self.rows,
            "samples": self.samples,
            "tokens": self.tokens,
            "trained_tokens": self.trained_tokens,
            "masked_token_ratio": self.ratio_stats(),
            "truncated": {"count": len(self.truncated), "lines": self.truncated},
            "truncated_end_of_turn": {"count": len(self.truncated_end_of_turn), "lines": self.truncated_end_of_turn},
            "dropped": {"count": len(self.dropped), "samples": findings(self.dropped)},
            "split_for_history_rewrite": {"count": len(self.split), "lines": self.split},
            "text_rows": {"count": len(self.text_rows), "lines": self.text_rows},
            "bad_rows_skipped": {"count": len(self.bad_rows), "rows": findings(self.bad_rows)},
            "consistency_failures": {"count": len(self.consistency_failures), "samples": findings(self.consistency_failures)},
            "untrained_end_of_turn": {"count": len(self.untrained_end_of_turn), "samples": findings(self.untrained_end_of_turn)},
            "empty_masks": {"count": len(self.empty_masks), "lines": self.empty_masks},
            "special_token_text": {"kept": {"count": len(self.control_text_kept), "lines": self.control_text_kept},
                                   "refused": {"count": len(self.control_text_refused),
                                               "lines": self.control_text_refused}},
            "warnings": findings(self.warnings),
            "hard_errors": len(self.hard_errors),
            "ok": not self.hard_errors,
            "seconds": round(self.seconds, 3),
            **({"sources": [count.to_dict() for count in self.sources],
                "parts": [part.to_dict() for part in self.parts]} if self.parts else {}),
        }

    def summary_lines(self) -> list[str]:
        """The human summary, one fact per line, line numbers of the samples concerned (a mixture:
        each source's summary, then the mixture's counts per source)."""
        if self.parts:
            return self._mixture_summary_lines()
        if self.kind == "prompts":
            return self._prompt_summary_lines()
        stats = self.ratio_stats()
        lines = [f"data audit: {self.source}"]
        lines.append(
            f"  rows {self.rows}, samples {self.samples}, tokens {self.tokens}, trained tokens {self.trained_tokens}"
            + (f" ({self.trained_tokens / self.tokens:.1%})" if self.tokens else "")
        )
        if stats["min"] is not None:
            lines.append(
                f"  masked_token_ratio per sample: min {stats['min']:.3f}  mean {stats['mean']:.3f}  max {stats['max']:.3f}"
            )
            lines.append("  histogram " + _histogram_text(stats["histogram"]))
        if self.text_rows:
            lines.append(_count_line('language-modelling rows ({"text"}: no chat template, loss on every token)',
                                     self.text_rows))
        lines.append(_count_line("truncated", self.truncated))
        if self.truncated_end_of_turn:
            lines.append(_count_line("  of which end-of-turn cut off (the model will not learn to stop on these rows)",
                                     self.truncated_end_of_turn))
        lines.append(_count_line("dropped (no trained token left)", [f.line for f in self.dropped]))
        if self.split:
            lines.append(_count_line("split per turn (template rewrites history)", self.split))
        if self.bad_rows:
            lines.append(_count_line("bad rows skipped", [f.line for f in self.bad_rows]))
            lines += [f"    {f.message}" for f in self.bad_rows[:3]]
        lines += self._control_text_lines()
        lines.append(_count_line("consistency failures", [f.line for f in self.consistency_failures], hard=True))
        lines += [f"    line {f.line}: {f.message}" for f in self.consistency_failures[:3]]
        lines.append(_count_line("untrained end-of-turn", [f.line for f in self.untrained_end_of_turn], hard=True))
        lines += [f"    line {f.line}: {f.message}" for f in self.untrained_end_of_turn[:3]]
        lines.append(_count_line("empty masks", self.empty_masks, hard=True))
        for message in sorted({f.message for f in self.warnings}):
            concerned = [f.line for f in self.warnings if f.message == message]
            lines.append(_count_line(f"warning: {message}", concerned))
        if self.samples == 0:
            lines.append("  no usable training sample  <- hard error")
        errors = self.hard_errors
        lines.append(f"  result: {'OK' if not errors else f'{len(errors)} hard error(s)'} ({self.seconds:.2f} s)")
        return lines

    def _mixture_summary_lines(self) -> list[str]:
        lines = [line for part in self.parts for line in part.summary_lines()] + list(self.mixture_lines)
        what = "prompts" if self.kind == "prompts" else "samples"
        lines.append(f"  mixture: rows {self.rows}, {what} {self.samples}, tokens {self.tokens}"
                     + (f", trained tokens {self.trained_tokens}" if self.kind != "prompts" else ""))
        errors = self.hard_errors
        lines.append(f"  result: {'OK' if not errors else f'{len(errors)} hard error(s)'} ({self.seconds:.2f} s)")
        return lines

    def first_hard_error(self) -> tuple[str, Finding] | None:
        """``(where, finding)`` of the first hard error: ``where`` is ``file:line`` (or the file)
        of the source it is in; None without one."""
        for part in self.parts or [self]:
            errors = part.hard_errors
            if errors:
                return (f"{part.source}:{errors[0].line}" if errors[0].line else part.source), errors[0]
        return None

    def _control_text_lines(self) -> list[str]:
        """The rows whose text holds control-token strings, kept or refused (none: no line)."""
        lines = []
        if self.control_text_kept:
            lines.append(_count_line("text holding special-token strings, kept as control tokens "
                                     f"({config_key('data.allow_special_tokens_in_text')})", self.control_text_kept))
        if self.control_text_refused:
            lines.append(_count_line("text holding special-token strings, refused (among the bad rows)",
                                     self.control_text_refused))
        return lines

    def _prompt_summary_lines(self) -> list[str]:
        mean = f", mean {self.tokens / self.samples:.1f} per prompt" if self.samples else ""
        lines = [f"data audit: {self.source} (RL prompts)",
                 f"  rows {self.rows}, prompts {self.samples}, prompt tokens {self.tokens}{mean}",
                 _count_line(f"dropped (longer than {config_key('data.max_prompt_length')})", [f.line for f in self.dropped])]
        if self.bad_rows:
            lines.append(_count_line("bad rows skipped", [f.line for f in self.bad_rows]))
            lines += [f"    {f.message}" for f in self.bad_rows[:3]]
        lines += self._control_text_lines()
        if self.samples == 0:
            lines.append("  no usable prompt  <- hard error")
        errors = self.hard_errors
        lines.append(f"  result: {'OK' if not errors else f'{len(errors)} hard error(s)'} ({self.seconds:.2f} s)")
        return lines


def note_control_text(report: AuditReport, line: int, outcome: RenderedSample | DataError) -> None:
    """Count a row in ``report`` when its text holds control-token strings: kept (a sample whose
    ``control_text`` is set) or refused (a ``ControlTextError``)."""
    if isinstance(outcome, ControlTextError):
        found = report.control_text_refused
    elif isinstance(outcome, RenderedSample) and outcome.control_text:
        found = report.control_text_kept
    else:
        return
    if not found or found[-1] != line:
        found.append(line)


def _count_line(label: str, lines: list[int], hard: bool = False) -> str:
    unique = sorted(set(lines))
    text = f"  {label}: {len(lines)}"
    if unique:
        shown = ", ".join(str(line) for line in unique[:SHOW_LINES])
        more = f" (+{len(unique) - SHOW_LINES} more)" if len(unique) > SHOW_LINES else ""
        text += f"  (line{'s' if len(unique) > 1 else ''} {shown}{more})"
        if hard:
            text += "  <- hard error"
    return text


def _histogram_text(histogram: list[int]) -> str:
    bars = " ▁▂▃▄▅▆▇█"
    top = max(histogram) or 1
    cells = "".join(bars[0 if count == 0 else max(1, round(count / top * 8))] for count in histogram)
    return f"0 |{cells}| 1   counts per 0.1: {' '.join(str(count) for count in histogram)}"


@dataclass
class PreparedData:
    """Rendered samples ready for batching, plus the audit of the file they came from."""

    samples: list[RenderedSample]
    audit: AuditReport


@dataclass
class RenderedPrompt:
    """One checked RL prompt row: its ids up to the generation prompt, its normalised
    messages (system message added) and the row's other keys (the reward's metadata)."""

    line: int
    prompt_ids: list[int]
    messages: list[dict[str, Any]]
    metadata: dict[str, Any]
    conversational: bool = False  # the row gave its prompt as messages (TRL's "conversational" format)
    source: str = ""  # the file (source spec) the row came from


@dataclass
class PreparedPrompts:
    """Checked, rendered RL prompts, plus the audit of the file they came from."""

    prompts: list[RenderedPrompt]
    audit: AuditReport


# ----------------------------------------------------------------------------- loading
def load_sft_data(path: Any, tokenizer, data_config, *, spans_for_first: int = 0, seed: int = 0,
                  key: str = "data.train") -> PreparedData:
    """Read, normalise, render, truncate and audit a data file (``data_config``: ``config.DataConfig``).

    The first bad row raises DataError naming ``file:line`` (with ``data_config.skip_bad`` bad
    rows are skipped and counted instead). Hard audit errors do NOT raise here: ``preflight``
    decides. ``prepared.samples`` holds only samples with at least one trained token, in file
    order. Rows are rendered in chunks of ``CHUNK_ROWS`` with one tokenizer call per chunk.
    The first ``spans_for_first`` rows get per-message spans (for ``inspect``).

    ``path`` may be a list of sources (``data.mixture``: ``key`` names them in errors, ``seed``
    draws a weighted mixture): each distinct drawn row is rendered and audited once, in its
    source's own report, and its samples repeat as often as the row was drawn, in mixture order.
    """
    columns = getattr(data_config, "columns", None)
    if not is_mixture(path):
        rows = read_rows_or_errors(path, limit=data_config.limit, columns=columns)
        return _render_rows(rows, str(path), tokenizer, data_config, spans_for_first)
    started = time.perf_counter()
    mixture = read_mixture(data_sources(path, config_key(key)), limit=data_config.limit, seed=seed, columns=columns)
    parts = [_render_rows(mixture.drawn_rows(index), source.spec, tokenizer, data_config, spans_for_first)
             for index, source in enumerate(mixture.sources)]
    samples, kept, dropped = draw_items(mixture, [part.samples for part in parts], lambda sample: sample.line)
    report = _mixture_report(mixture, [part.audit for part in parts], kept, dropped, seed, "samples")
    count_drawn_samples(report, samples)
    report.seconds = time.perf_counter() - started
    return PreparedData(samples=samples, audit=report)


def count_drawn_samples(report: AuditReport, samples: Sequence[Any]) -> None:
    """Add a mixture's drawn rendered samples to its report's totals (samples, tokens, trained
    tokens, masked ratios): a row drawn twice counts twice, as it trains twice."""
    for sample in samples:
        report.samples += 1
        report.tokens += len(sample.input_ids)
        report.trained_tokens += sample.trained_token_count
        report.ratios.append(sample.masked_token_ratio)


def _mixture_report(mixture: Mixture, parts: list[AuditReport], kept: list[int], dropped: list[int], seed: int,
                    what: str) -> AuditReport:
    """The report of a mixture: its sources' reports as ``parts``, its rows and per-source counts;
    the caller adds the mixture's samples and tokens."""
    counts = source_counts(mixture, kept, dropped)
    drawn = [part for part, count in zip(parts, counts) if count.drawn] or parts  # a source not read: no report
    return AuditReport(source=" + ".join(source.spec for source in mixture.sources), kind=parts[0].kind,
                       rows=sum(count.drawn for count in counts), parts=drawn, sources=counts,
                       mixture_lines=mixture_lines(counts, weighted=mixture.weighted, seed=seed, what=what))


def _render_rows(rows, source: str, tokenizer, data_config, spans_for_first: int) -> PreparedData:
    """``load_sft_data`` for the ``(line, row or DataError)`` rows of one source named ``source``."""
    started = time.perf_counter()
    report = AuditReport(source=source)
    samples: list[RenderedSample] = []
    pending: list[tuple[int, RenderJob | DataError]] = []
    allow_control_text = data_config.allow_special_tokens_in_text
    options = dict(
        train_on=data_config.train_on,
        train_tool_calls=data_config.train_tool_calls,
        history_rewrite=data_config.history_rewrite,
        tool_format=getattr(data_config, "tool_format", "chat_template"),  # SFT data only (config.SFTDataConfig)
        allow_special_tokens_in_text=allow_control_text,
    )

    def flush() -> None:
        results = iter(render_batch([job for _, job in pending if isinstance(job, RenderJob)], tokenizer, **options))
        for line, job in pending:
            result = next(results) if isinstance(job, RenderJob) else job  # a DataError or a rendered text row
            if isinstance(result, DataError):
                if not data_config.skip_bad:
                    raise BadRowError(str(result)) from None
                report.bad_rows.append(Finding(line, str(result)))
                note_control_text(report, line, result)
                continue
            report.rows += 1
            if any(sample.split_reason == "history rewrite" for sample in result):
                report.split.append(line)
            for sample in result:
                kept = audit_sample(sample, report, data_config.max_length, data_config.truncation, f"{source}:{line}")
                if kept is not None:
                    samples.append(kept)
        pending.clear()

    for count, (line, row) in enumerate(rows):
        if isinstance(row, DataError):
            pending.append((line, row))
        elif text_from_row(row) is not None:
            try:
                pending.append((line, [render_text(text_from_row(row), tokenizer, line=line, source=source,
                                                   allow_special_tokens_in_text=allow_control_text)]))
                report.text_rows.append(line)
            except DataError as exc:
                pending.append((line, exc))
        else:
            try:
                conversation = conversation_from_row(row, f"{source}:{line}")
                pending.append((line, RenderJob(conversation.messages, conversation.tools, line, source, count < spans_for_first)))
            except DataError as exc:
                pending.append((line, exc))
        if len(pending) >= CHUNK_ROWS:
            flush()
    flush()
    report.seconds = time.perf_counter() - started
    return PreparedData(samples=samples, audit=report)


def audit_sample(sample: RenderedSample, report: AuditReport, max_length: int, truncation: str,
                 where: str) -> RenderedSample | None:
    """Check one rendered sample, record its findings in ``report``, and say whether to train it.

    The per-sample half of the pre-flight audit, for every loader that renders samples its
    own way (SFT files here, both sides of preference pairs in ``data.preference``); ``preflight``
    then prints the report and refuses hard errors.

    Args:
        sample: a rendered sample (``data.render.RenderedSample``).
        report: the file's ``AuditReport``; updated in place (consistency failures,
            warnings, empty masks, truncated / dropped lines, untrained end-of-turn tokens,
            control-token text kept (``note_control_text``), and for kept samples the sample / token / trained-token counts and ratio).
        max_length: ``data.max_length`` in tokens.
        truncation: ``data.truncation``: ``right`` cuts the sample, ``drop`` skips it,
            ``error`` raises.
        where: ``file:line`` for the error message.

    Returns:
        The sample to train (cut to ``max_length`` with ``right``), or None when it has no
        trained token (before or after cutting) or is dropped for its length.

    Raises:
        DataError: one line naming ``where``, for a too-long sample with ``truncation="error"``.
    """
    line = sample.line
    note_control_text(report, line, sample)
    for problem in sample.consistency_errors:
        report.consistency_failures.append(Finding(line, problem))
    for message in sorted(set(sample.warnings)):
        report.warnings.append(Finding(line, message))
    if sample.trained_token_count == 0:
        report.empty_masks.append(line)
        return None
    if len(sample.input_ids) > max_length:
        if truncation == "error":
            raise DataError(
                f"{where}: sample has {len(sample.input_ids)} tokens, more than {config_key('data.max_length')}={max_length} "
                f"({config_key('data.truncation')}=error; use right or drop)"
            )
        if truncation == "drop":
            report.dropped.append(Finding(line, f"{len(sample.input_ids)} tokens > max_length {max_length}"))
            return None
        sample = truncate_sample(sample, max_length)
        report.truncated.append(line)
        if sample.cut_end_of_turn and sample.trained_token_count:
            report.truncated_end_of_turn.append(line)
        if sample.trained_token_count == 0:
            report.dropped.append(Finding(line, f"all trained tokens lie beyond max_length {max_length}"))
            return None
    for index in sample.untrained_end_of_turn:
        report.untrained_end_of_turn.append(
            Finding(line, f"messages[{index}] (assistant): no end-of-turn token in the trained span; the model would never learn to stop")
        )
    report.samples += 1
    report.tokens += len(sample.input_ids)
    report.trained_tokens += sample.trained_token_count
    report.ratios.append(sample.masked_token_ratio)
    return sample


def load_prompt_data(path: Any, tokenizer, *, system: str | None = None, max_prompt_length: int | None = None,
                     too_long: str = "drop", limit: int | None = None, skip_bad: bool = False,
                     columns: dict[str, str] | None = None, reward_fields: dict[str, str] | None = None,
                     allow_special_tokens_in_text: AllowControlText = False, seed: int = 0,
                     key: str = "data.train") -> PreparedPrompts:
    """Read, check and render an RL prompt file, auditing it like SFT data.

    Every row must parse and hold a non-empty prompt (``data.formats.prompt_from_row``) that
    renders through the chat template (``data.render.render_prompt``): the first bad row
    raises DataError naming ``file:line`` (``skip_bad``: counted and skipped instead). A
    prompt longer than ``max_prompt_length`` tokens is dropped and counted (``too_long``
    ``"drop"``, what ``data.max_prompt_length`` documents) or raises (``"error"``). No
    prompt left is a hard error for ``preflight``. Nothing here loads a model.

    ``columns`` (``data.columns``) renames fields first. ``reward_fields`` (``{field: reward}``,
    ``rewards.registry.reward_fields``): a row without one of them is a bad row naming the
    field, since its reward would score every completion 0 without a word.
    ``allow_special_tokens_in_text`` (``data.allow_special_tokens_in_text``): a row whose text
    holds a control-token string it does not allow is a bad row (``render.check_control_text``);
    rows holding one are counted either way.

    ``path`` may be a list of sources (``data.mixture``; ``key`` names them in errors, ``seed``
    draws a weighted mixture): each distinct drawn row is checked once, in its source's report.
    """

    if too_long not in ("drop", "error"):
        raise ValueError(f"too_long must be 'drop' or 'error', got {too_long!r}")
    options = dict(system=system, max_prompt_length=max_prompt_length, too_long=too_long, skip_bad=skip_bad,
                   reward_fields=reward_fields, allow_special_tokens_in_text=allow_special_tokens_in_text)
    if not is_mixture(path):
        return _prompt_rows(read_rows_or_errors(path, limit=limit, columns=columns), str(path), tokenizer, **options)
    started = time.perf_counter()
    mixture = read_mixture(data_sources(path, config_key(key)), limit=limit, seed=seed, columns=columns)
    parts = [_prompt_rows(mixture.drawn_rows(index), source.spec, tokenizer, **options)
             for index, source in enumerate(mixture.sources)]
    prompts, kept, dropped = draw_items(mixture, [part.prompts for part in parts], lambda prompt: prompt.line)
    report = _mixture_report(mixture, [part.audit for part in parts], kept, dropped, seed, "prompts")
    report.samples = len(prompts)
    report.tokens = sum(len(prompt.prompt_ids) for prompt in prompts)
    report.seconds = time.perf_counter() - started
    return PreparedPrompts(prompts=prompts, audit=report)


def _prompt_rows(rows, path: str, tokenizer, *, system: str | None, max_prompt_length: int | None, too_long: str,
                 skip_bad: bool, reward_fields: dict[str, str] | None,
                 allow_special_tokens_in_text: AllowControlText) -> PreparedPrompts:
    """``load_prompt_data`` for the ``(line, row or DataError)`` rows of one source named ``path``."""
    started = time.perf_counter()
    report = AuditReport(source=path, kind="prompts")
    prompts: list[RenderedPrompt] = []
    for line, row in rows:
        where = f"{path}:{line}"
        try:
            if isinstance(row, DataError):
                raise row
            prompt = prompt_from_row(row, where, system=system)
            check_reward_fields(prompt.extra, reward_fields or {}, where)
            kept = check_control_text({"messages": prompt.messages, "tools": prompt.tools}, tokenizer,
                                      allow_special_tokens_in_text, where)
            ids = render_prompt(prompt.messages, tokenizer, tools=prompt.tools, where=where,
                                allow_special_tokens_in_text=True)  # checked above
        except DataError as exc:
            if not skip_bad:
                raise BadRowError(str(exc)) from None
            report.bad_rows.append(Finding(line, str(exc)))
            note_control_text(report, line, exc)
            continue
        if kept:
            report.control_text_kept.append(line)
        report.rows += 1
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            if too_long == "error":
                raise DataError(f"{where}: prompt has {len(ids)} tokens, more than {config_key('data.max_prompt_length')}="
                                f"{max_prompt_length}")
            report.dropped.append(Finding(line, f"{len(ids)} tokens > max_prompt_length {max_prompt_length}"))
            continue
        report.samples += 1
        report.tokens += len(ids)
        conversational = isinstance(row.get("messages", row.get("prompt")), (list, dict))
        prompts.append(RenderedPrompt(line, ids, prompt.messages, prompt.extra, conversational, path))
    report.seconds = time.perf_counter() - started
    return PreparedPrompts(prompts=prompts, audit=report)


def check_reward_fields(metadata: dict[str, Any], reward_fields: dict[str, str], where: str) -> None:
    """DataError naming ``where`` and the first field of ``reward_fields`` (``{field: reward}``)
    that ``metadata`` (a prompt row's other fields) lacks, with the fields it has.

    >>> check_reward_fields({"question": "2+2?"}, {"answer": "math"}, "f.parquet:3")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.parquet:3: no 'answer' field, which reward 'math' reads (fields: question); map one with data.columns.answer=<field, dotted for nested>
    >>> check_reward_fields({"answer": " "}, {"answer": "math"}, "f.jsonl:2")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:2: 'answer' is empty, so reward 'math' could only score 0 on this row

    ``math`` compares an extracted answer with one reference value: a string or a finite number
    (a list holding one such value reads as that value). A list of several values, an object,
    a boolean, NaN or infinity is refused: compared as its text (``['4', '5']``, ``nan``,
    ``True``) it pays no real answer, only the degenerate one that copies that text.

    >>> check_reward_fields({"answer": ["4", "5"]}, {"answer": "math"}, "f.jsonl:4")
    Traceback (most recent call last):
    ...
    posttrain.errors.DataError: f.jsonl:4: 'answer' is a list of 2 values, but reward 'math' compares an answer with one string or finite number (e.g. "42")
    """
    for name, reward in reward_fields.items():
        value = metadata.get(name)
        if value is None:
            fields = sorted(metadata)
            shown = ", ".join(fields[:20]) + (f", ... ({len(fields) - 20} more)" if len(fields) > 20 else "")
            raise DataError(f"{where}: no '{name}' field, which reward '{reward}' reads (fields: "
                            f"{shown or 'none besides the prompt'}); map one with {config_key('data.columns')}.{name}=<field, dotted for nested>")
        if (isinstance(value, str) and not value.strip()) or (isinstance(value, (list, dict)) and not value):
            # present but empty: every completion would score 0 (or an empty program pass nothing)
            raise DataError(f"{where}: '{name}' is empty, so reward '{reward}' could only score 0 on this row")
        problem = _math_reference_problem(value) if reward == "math" else None
        if problem is not None:
            raise DataError(f"{where}: '{name}' is {problem}, but reward '{reward}' compares an answer with one "
                            f"string or finite number (e.g. \"42\")")


def _math_reference_problem(value: Any) -> str | None:
    """What makes ``value`` no reference answer for ``math`` (see ``check_reward_fields``), or None."""
    if isinstance(value, list):
        if len(value) != 1:
            return f"a list of {len(value)} values"
        value = value[0]
        if isinstance(value, str) and not value.strip():
            return "a list holding an empty string"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, float) and value != value:
        return "NaN"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "infinite"
    if isinstance(value, (str, int, float)):
        return None
    return {dict: "an object", list: "a list inside a list"}.get(type(value), f"a {type(value).__name__}")


def preflight_prompts(path: Any, tokenizer, *, system: str | None = None, max_prompt_length: int | None = None,
                      too_long: str = "drop", limit: int | None = None,
                      print_fn: Callable[[str], Any] | None = say_stdout, columns: dict[str, str] | None = None,
                      reward_fields: dict[str, str] | None = None,
                      allow_special_tokens_in_text: AllowControlText = False, seed: int = 0,
                      key: str = "data.train") -> PreparedPrompts:
    """``load_prompt_data`` then ``preflight``: what ``posttrain rl`` runs on its prompt files
    (one file, or a list of sources drawn with ``seed``) before any model loads (one-line
    DataError naming ``file:line`` on a bad row, or on a row without a field its reward reads)."""
    prepared = load_prompt_data(path, tokenizer, system=system, max_prompt_length=max_prompt_length,
                                too_long=too_long, limit=limit, columns=columns, reward_fields=reward_fields,
                                allow_special_tokens_in_text=allow_special_tokens_in_text, seed=seed, key=key)
    preflight(prepared, print_fn=print_fn)
    return prepared


# ----------------------------------------------------------------------------- pre-flight
def preflight(prepared: PreparedData | PreparedPrompts, *, allow_errors: bool = False, print_fn: Callable[[str], Any] | None = say_stdout) -> None:
    """Print the audit summary; raise DataError (one line, first offending file:line) on a hard error.

    Every training command calls this before its first step. ``allow_errors`` (config
    ``data.allow_audit_errors``) prints a warning instead of raising.
    """
    report = prepared.audit
    if print_fn is not None:
        for text in report.summary_lines():
            print_fn(text)
    errors = report.hard_errors
    if not errors:
        return
    where, first = report.first_hard_error()
    if allow_errors:
        if print_fn is not None:
            print_fn(f"warning: {len(errors)} hard data error(s), first {where}: {first.message}; training anyway ({config_key('data.allow_audit_errors')})")
        return
    if report.kind == "prompts":
        raise DataError(f"{where}: {first.message} (pre-flight audit of RL prompts)")
    raise DataError(
        f"{where}: {first.message} (pre-flight audit: {len(errors)} hard error(s); "
        f"see `posttrain inspect {where.rsplit(':', 1)[0] if first.line else where}`; set {config_key('data.allow_audit_errors')}=true "
        f"to train anyway)"
    )


# ----------------------------------------------------------------------------- views
SPLIT_REASONS = {"history rewrite": "template rewrites history", "token merge": "tokens merge across a turn boundary"}
ANSI_RESET = "\x1b[0m"
ANSI_TRAINED = ("\x1b[30;42m", "\x1b[30;102m")  # black on green, alternating shades per token
ANSI_CONTEXT = ("\x1b[37m", "\x1b[90m")  # grey shades per token
ANSI_LABEL = "\x1b[1;36m"
ANSI_PROBLEM = "\x1b[1;31m"


def token_pieces(tokenizer, input_ids: list[int]) -> list[tuple[int, int, str]]:
    """Decode ids into ``(start, end, text)`` pieces: one token each, except that tokens forming
    one multi-byte character are joined (decoding them alone would give U+FFFD)."""
    pieces = []
    start = 0
    while start < len(input_ids):
        end = start + 1
        text = tokenizer.decode(input_ids[start:end])
        if text.endswith("\ufffd"):
            for longer_end in range(end + 1, min(len(input_ids), start + 4) + 1):
                longer = tokenizer.decode(input_ids[start:longer_end])
                if not longer.endswith("\ufffd"):
                    text, end = longer, longer_end
                    break
        pieces.append((start, end, text))
        start = end
    return pieces


def _visible(text: str) -> str:
    return text.replace("\r", "\\r").replace("\t", "→").replace("\n", "↵\n")


def format_sample(sample: RenderedSample, tokenizer, *, colour: bool, index: int | str | None = None, max_tokens: int | None = None) -> str:
    """The sample token by token: trained tokens highlighted (colour) or in ``[[...]]``, with a
    ``‹role›`` label at each message boundary."""
    ids = sample.input_ids if max_tokens is None else sample.input_ids[:max_tokens]
    title = f"sample {index} " if index is not None else "sample "
    header = (
        f"── {title}· {sample.source}:{sample.line} · {len(sample.input_ids)} tokens · "
        f"{sample.trained_token_count} trained ({sample.masked_token_ratio:.1%})"
        + (" · truncated" if sample.truncated else "")
        + (f" · split turn ({SPLIT_REASONS.get(sample.split_reason, sample.split_reason)})" if sample.split else "")
        + (" · weighted" if sample.weights is not None else "")
    )
    labels = {span.start: span.role + (" (trained)" if span.trained else "") for span in sample.spans}
    out: list[str] = []
    in_trained = False
    for k, (start, end, text) in enumerate(token_pieces(tokenizer, ids)):
        trained = bool(sample.loss_mask[start])
        if start in labels or any(s in labels for s in range(start + 1, end)):
            label = labels.get(start) or next(labels[s] for s in range(start + 1, end) if s in labels)
            if in_trained and not colour:
                out.append("]]")
                in_trained = False
            if out and not out[-1].endswith("\n"):
                out.append("\n")
            out.append(f"{ANSI_LABEL}‹{label}›{ANSI_RESET}" if colour else f"‹{label}›")
        shown = _visible(text)
        if colour:
            style = (ANSI_TRAINED if trained else ANSI_CONTEXT)[k % 2]
            out.append("\n".join(f"{style}{part}{ANSI_RESET}" if part else "" for part in shown.split("\n")))
        else:
            if trained and not in_trained:
                out.append("[[")
            elif not trained and in_trained:
                out.append("]]")
            in_trained = trained
            out.append(shown)
    if in_trained and not colour:
        out.append("]]")
    body = "".join(out)
    if max_tokens is not None and len(sample.input_ids) > max_tokens:
        body += f"\n… ({len(sample.input_ids) - max_tokens} more tokens)"
    problems = [f"consistency failure: {p}" for p in sample.consistency_errors] + [
        f"untrained end-of-turn: messages[{i}]" for i in sample.untrained_end_of_turn
    ] + [f"end-of-turn cut off by truncation: messages[{i}]" for i in sample.cut_end_of_turn]
    problem_text = "".join(
        f"\n{ANSI_PROBLEM}! {p}{ANSI_RESET}" if colour else f"\n! {p}" for p in problems
    )
    return f"{header}{problem_text}\n{body}\n"


def render_html(samples: list[RenderedSample], tokenizer, report: AuditReport) -> str:
    """A standalone HTML page: the summary and each sample's tokens, trained ones highlighted."""
    blocks = []
    for index, sample in enumerate(samples):
        labels = {span.start: span.role + (" (trained)" if span.trained else "") for span in sample.spans}
        tokens = []
        for start, end, text in token_pieces(tokenizer, sample.input_ids):
            label = next((labels[s] for s in range(start, end) if s in labels), None)
            if label is not None:
                tokens.append(f'<span class="role">{html.escape(label)}</span>')
            classes = "tok trained" if sample.loss_mask[start] else "tok"
            title = f"ids {sample.input_ids[start:end]}" + (f" weight {sample.weights[start]:g}" if sample.weights else "")
            shown = html.escape(text).replace("\n", "↵\n")
            tokens.append(f'<span class="{classes}" title="{title}">{shown}</span>')
        problems = "".join(
            f'<div class="problem">{html.escape(p)}</div>'
            for p in sample.consistency_errors + [f"untrained end-of-turn: messages[{i}]" for i in sample.untrained_end_of_turn]
        )
        blocks.append(
            f'<section><h2>sample {index} · {html.escape(sample.source)}:{sample.line} · {len(sample.input_ids)} tokens · '
            f"{sample.trained_token_count} trained ({sample.masked_token_ratio:.1%}){' · truncated' if sample.truncated else ''}"
            f"</h2>{problems}<pre>{''.join(tokens)}</pre></section>"
        )
    summary = html.escape("\n".join(report.summary_lines()))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>posttrain inspect: {html.escape(report.source)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 110em; }}
pre {{ white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.6; }}
.tok {{ color: #555; border-right: 1px solid #e4e4e4; }}
.tok.trained {{ color: #000; background: #b7f0b1; }}
.role {{ display: inline-block; margin: 0.4em 0.3em 0 0; padding: 0 0.4em; font-size: 11px; color: #fff; background: #3b6ea8; border-radius: 3px; }}
.problem {{ color: #b00020; font-weight: bold; }}
.summary {{ background: #f6f6f6; padding: 1em; }}
</style></head><body>
<h1>posttrain inspect</h1>
<p>Green tokens are training targets (loss_mask = 1); grey tokens are context. Hover a token for its ids.</p>
<pre class="summary">{summary}</pre>
{''.join(blocks)}
</body></html>
"""


def write_dump(samples: list[RenderedSample], path: str | Path) -> None:
    """One JSON line per rendered sample: line, source, input_ids, loss_mask (and weights)."""
    with open(path, "w", encoding="utf-8") as handle:
        for sample in samples:
            record: dict[str, Any] = {
                "line": sample.line,
                "source": sample.source,
                "input_ids": sample.input_ids,
                "loss_mask": sample.loss_mask,
            }
            if sample.weights is not None:
                record["weights"] = sample.weights
            if sample.truncated:
                record["truncated"] = True
            handle.write(json.dumps(record) + "\n")
