"""Alarms during RL: reward hacking and collapse, read from the run's own metric history.

Every RL step the trainer hands its metric line to ``RLAlarms.observe``, which keeps the
window of history the checks need and returns ``alarm/<name>`` (0 or 1) for every alarm the
run watches; the first time an alarm fires (and when it clears) it says so in one line. The
checks are pure functions of that history and of typed thresholds (``AlarmSettings``, built
once from the config's ``alarms:`` section by ``train.rl_settings.alarm_settings``); a
threshold of None switches its alarm off. The report lists the steps at which each fired
(``fired_spans``). Names and thresholds: docs/METRICS.md, "Alarms".

A *window* is ``settings.window`` consecutive steps. "Since the start" compares the mean of
the run's first window with the mean of its last one (they must not overlap: 2 windows of
history); "over the last window" is the mean of the last ``window`` steps.

Reward hacking (the reward rises for a reason other than the task; Skalse et al. 2022,
"Defining and Characterizing Reward Hacking"; Singhal et al. 2023, "A Long Way to Go:
Investigating Length Correlations in RLHF"):

    reward_up_heldout_down  between the last two held-out evaluations held-out accuracy fell
                            by >= heldout_drop while the training reward (mean of the window
                            ending at each evaluation) rose by >= reward_rise
    reward_length_corr      the within-group correlation of reward and response length
                            (``reward_length_correlation``), averaged over the last window,
                            is >= reward_length_corr, and accuracy (when the reward checks
                            correctness) gained < acc_gain since the start
    format_saturated        a reward component (``reward/<term>``) rose by >= term_rise since
                            the start to >= term_saturation over the last window (full marks
                            are 1.0, as every built-in reward scores them), while accuracy
                            gained < acc_gain
    tool_calls_no_gain      tool calls per trajectory rose by >= tool_calls_rise since the
                            start while accuracy gained < acc_gain

Collapse:

    entropy_collapse        entropy over the last window < entropy_ratio x its first window
    kl_blowup               ``kl`` (to the reference) over the last window >= kl_max, or
                            ``approx_kl`` (to the sampling policy) >= approx_kl_max, and
                            >= blowup_factor x its first window
    clip_frac_blowup        ``clip_frac`` over the last window >= clip_frac_max and
                            >= blowup_factor x its first window (GSPO clips a large share
                            from the first step: only a rise counts)
    length_cap              the share of responses cut at the length cap over the last window
                            is >= length_cap_frac and rose by >= length_cap_rise since the start
                            (a cap that is too short from the start is the pre-flight's
                            business, not an alarm's)
    nonfinite               >= nonfinite_steps optimizer steps skipped for a NaN/inf loss or
                            gradient in the last window

An alarm whose metrics a run does not log (no ``acc``: the reward checks no correctness; no
``kl``: ``rl.kl_coef`` 0) stays quiet; it cannot tell.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from posttrain.log import say

# name -> what it means when it fires (the report and docs/METRICS.md say the same)
ALARMS: dict[str, str] = {
    "reward_up_heldout_down": "training reward rose while held-out accuracy fell",
    "reward_length_corr": "reward follows response length, accuracy does not rise",
    "format_saturated": "a reward term saturated while accuracy stayed flat",
    "tool_calls_no_gain": "tool calls per trajectory rose with no accuracy gain",
    "entropy_collapse": "policy entropy fell far below its start",
    "kl_blowup": "KL to the reference or to the sampling policy blew up",
    "clip_frac_blowup": "the share of clipped ratios blew up",
    "length_cap": "responses pile up at the length cap",
    "nonfinite": "optimizer steps skipped for a NaN/inf loss or gradient",
}

# Per-step metrics the checks read (besides every reward/<term> component and the step).
WATCHED_KEYS = ("reward/mean", "acc", "entropy", "kl", "approx_kl", "clip_frac", "response_len/clipped_frac",
                "nonfinite_steps", "critic/nonfinite_steps", "agent/tool_calls", "reward_length_corr")
# Held-out metrics an evaluation point is read from, first found wins.
HELDOUT_KEYS = ("eval/acc", "eval/reward")


@dataclass(frozen=True)
class AlarmSettings:
    """Thresholds of the alarms (``alarms:`` in the config; None = that alarm is off).

    ``watched``: the alarms this run evaluates and logs, in ``ALARMS`` order.
    """

    window: int = 10
    acc_gain: float = 0.05
    heldout_drop: float | None = 0.05
    reward_rise: float = 0.05
    reward_length_corr: float | None = 0.5
    term_rise: float | None = 0.3
    term_saturation: float = 0.9
    tool_calls_rise: float | None = 0.5
    entropy_ratio: float | None = 0.05
    kl_max: float | None = 1.0
    approx_kl_max: float | None = 0.1
    clip_frac_max: float | None = 0.2
    blowup_factor: float = 3.0
    length_cap_frac: float | None = 0.5
    length_cap_rise: float = 0.2
    nonfinite_steps: int | None = 1
    watched: tuple[str, ...] = tuple(ALARMS)


@dataclass(frozen=True)
class EvalPoint:
    """One held-out evaluation: its step, its accuracy (or mean reward when the reward checks no
    correctness), and the training reward level then (mean ``reward/mean`` of the window ending
    at it; None before the first step)."""

    step: int
    heldout: float
    reward_level: float | None


# ----------------------------------------------------------------------------- the per-step metric


def reward_length_correlation(rewards_PG: Sequence[Sequence[float]],
                              lengths_PG: Sequence[Sequence[float]]) -> float | None:
    """Pearson correlation of reward and length within groups, pooled over the step's groups:
    each group's rewards and lengths are centred on the group's means, then correlated
    together. This is the signal a group-relative estimator sees: within a group, does the
    longer completion get the higher reward? None when it is undefined (every group has
    equal rewards or equal lengths).

    ``rewards_PG``, ``lengths_PG``: [P][G] per prompt group (groups may differ in size).

    >>> reward_length_correlation([[1.0, 2.0], [0.0, 0.0]], [[3, 5], [4, 6]])
    0.7071067811865475
    >>> reward_length_correlation([[1.0, 1.0]], [[3, 5]]) is None
    True
    """
    products = reward_squares = length_squares = 0.0
    for rewards, lengths in zip(rewards_PG, lengths_PG, strict=True):
        if len(rewards) != len(lengths):
            raise ValueError(f"a group has {len(rewards)} rewards and {len(lengths)} lengths")
        if not rewards:
            continue
        reward_mean, length_mean = sum(rewards) / len(rewards), sum(lengths) / len(lengths)
        for reward, length in zip(rewards, lengths, strict=True):
            products += (reward - reward_mean) * (length - length_mean)
            reward_squares += (reward - reward_mean) ** 2
            length_squares += (length - length_mean) ** 2
    if reward_squares <= 0.0 or length_squares <= 0.0:
        return None
    return max(-1.0, min(1.0, products / math.sqrt(reward_squares * length_squares)))


# ----------------------------------------------------------------------------- window statistics


def mean_of(records: Sequence[Mapping[str, float]], key: str) -> float | None:
    """Mean of ``key`` over the records that carry it; None when none does.

    >>> mean_of([{"a": 1.0}, {}, {"a": 3.0}], "a")
    2.0
    """
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else None


def first_window(history: Sequence[Mapping[str, float]], window: int) -> Sequence[Mapping[str, float]]:
    return history[:window]


def last_window(history: Sequence[Mapping[str, float]], window: int) -> Sequence[Mapping[str, float]]:
    return history[-window:]


def rise_since_start(history: Sequence[Mapping[str, float]], key: str, window: int) -> float | None:
    """Mean of ``key`` over the last window minus its mean over the first; None before two whole
    windows of history (they would overlap) or when either window lacks the key.

    >>> rise_since_start([{"x": 0.0}, {"x": 1.0}, {"x": 2.0}, {"x": 4.0}], "x", 2)
    2.5
    >>> rise_since_start([{"x": 0.0}, {"x": 1.0}, {"x": 2.0}], "x", 2) is None
    True
    """
    if len(history) < 2 * window:
        return None
    start, now = mean_of(first_window(history, window), key), mean_of(last_window(history, window), key)
    return None if start is None or now is None else now - start


def accuracy_flat(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> tuple[bool, str]:
    """(accuracy did not gain ``acc_gain`` since the start, the words for it); (False, ...) when
    the run logs no ``acc`` or has under two windows: then no one can say it stayed flat."""
    gain = rise_since_start(history, "acc", settings.window)
    if gain is None:
        return False, ""
    words = f"accuracy {gain:+.2f} since the first {settings.window} steps (< alarms.acc_gain {settings.acc_gain:g})"
    return gain < settings.acc_gain, words


# ----------------------------------------------------------------------------- the checks
# Each check: (history, settings) -> None (quiet) or a one-line reason (fired). ``history`` is the
# run's per-step records, oldest first (only its first and last windows are read).


def check_reward_length_corr(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    limit, window = settings.reward_length_corr, settings.window
    if limit is None or len(history) < window:
        return None
    corr = mean_of(last_window(history, window), "reward_length_corr")
    if corr is None or corr < limit:
        return None
    head = (f"reward follows response length: within-group correlation {corr:.2f} over the last {window} steps "
            f"(>= alarms.reward_length_corr {limit:g})")
    if not any("acc" in r for r in history):
        return f"{head}; the reward checks no correctness"
    flat, words = accuracy_flat(history, settings)
    return f"{head}; {words}" if flat else None


def check_format_saturated(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    rise_needed, window = settings.term_rise, settings.window
    if rise_needed is None or len(history) < 2 * window:
        return None
    flat, words = accuracy_flat(history, settings)
    if not flat:
        return None
    for key in reward_terms(history):
        rise = rise_since_start(history, key, window)
        now = mean_of(last_window(history, window), key)
        if rise is not None and now is not None and rise >= rise_needed and now >= settings.term_saturation:
            return (f"{key} rose {rise:+.2f} since the first {window} steps to {now:.2f} "
                    f"(>= alarms.term_rise {rise_needed:g}, saturated at >= alarms.term_saturation "
                    f"{settings.term_saturation:g}) while {words}")
    return None


def reward_terms(history: Sequence[Mapping[str, float]]) -> list[str]:
    """The reward components a history logs: ``reward/<term>``, not the mean, the std or a
    component's own statistics (``reward/math/unverified``)."""
    keys = {k for r in history for k in r if k.startswith("reward/") and k.count("/") == 1}
    return sorted(keys - {"reward/mean", "reward/std"})


def check_tool_calls_no_gain(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    rise_needed, window = settings.tool_calls_rise, settings.window
    if rise_needed is None:
        return None
    rise = rise_since_start(history, "agent/tool_calls", window)
    if rise is None or rise < rise_needed:
        return None
    flat, words = accuracy_flat(history, settings)
    return (f"tool calls per trajectory rose {rise:+.2f} since the first {window} steps "
            f"(>= alarms.tool_calls_rise {rise_needed:g}) while {words}") if flat else None


def check_entropy_collapse(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    ratio, window = settings.entropy_ratio, settings.window
    if ratio is None or len(history) < 2 * window:
        return None
    start, now = mean_of(first_window(history, window), "entropy"), mean_of(last_window(history, window), "entropy")
    if start is None or now is None or start <= 0 or now >= ratio * start:
        return None
    return (f"entropy {now:.3g} over the last {window} steps is {now / start:.3f} x its first {window} steps' "
            f"{start:.3g} (< alarms.entropy_ratio {ratio:g})")


def blowup(history: Sequence[Mapping[str, float]], key: str, limit: float | None, setting: str,
           settings: AlarmSettings) -> str | None:
    """``key`` over the last window >= ``limit`` and >= blowup_factor x its first window."""
    window = settings.window
    if limit is None or len(history) < window:
        return None
    start, now = mean_of(first_window(history, window), key), mean_of(last_window(history, window), key)
    if now is None or start is None or now < limit or now < settings.blowup_factor * start:
        return None
    return (f"{key} {now:.3g} over the last {window} steps (>= alarms.{setting} {limit:g}; "
            f"{start:.3g} over the first {window})")


def check_kl_blowup(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    return (blowup(history, "kl", settings.kl_max, "kl_max", settings)
            or blowup(history, "approx_kl", settings.approx_kl_max, "approx_kl_max", settings))


def check_clip_frac_blowup(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    return blowup(history, "clip_frac", settings.clip_frac_max, "clip_frac_max", settings)


def check_length_cap(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    limit, window = settings.length_cap_frac, settings.window
    if limit is None:
        return None
    key = "response_len/clipped_frac"
    rise = rise_since_start(history, key, window)
    now = mean_of(last_window(history, window), key)
    if rise is None or now is None or now < limit or rise < settings.length_cap_rise:
        return None
    return (f"{now:.0%} of responses cut at the length cap over the last {window} steps "
            f"(>= alarms.length_cap_frac {limit:g}), {rise:+.0%} since the first {window}")


def check_nonfinite(history: Sequence[Mapping[str, float]], settings: AlarmSettings) -> str | None:
    limit, window = settings.nonfinite_steps, settings.window
    if limit is None or not history:
        return None
    recent = last_window(history, window)
    skipped = sum(r.get("nonfinite_steps", 0.0) + r.get("critic/nonfinite_steps", 0.0) for r in recent)
    if skipped < limit:
        return None
    return (f"{skipped:g} optimizer steps skipped for a NaN/inf loss or gradient in the last {len(recent)} steps "
            f"(>= alarms.nonfinite_steps {limit})")


def check_reward_up_heldout_down(history: Sequence[Mapping[str, float]], points: Sequence[EvalPoint],
                                 settings: AlarmSettings) -> str | None:
    """Compares the last two held-out evaluations; the reward level of one taken before the first
    step is the first window's mean reward. Stays as it is until the next evaluation."""
    drop_needed = settings.heldout_drop
    if drop_needed is None or len(points) < 2:
        return None
    before, after = points[-2], points[-1]
    level_before = before.reward_level
    if level_before is None:
        level_before = mean_of(first_window(history, settings.window), "reward/mean")
    if level_before is None or after.reward_level is None:
        return None
    drop, rise = before.heldout - after.heldout, after.reward_level - level_before
    if drop < drop_needed or rise < settings.reward_rise:
        return None
    return (f"held-out {before.heldout:.3f} at step {before.step} -> {after.heldout:.3f} at step {after.step} "
            f"(fell >= alarms.heldout_drop {drop_needed:g}) while the training reward rose {rise:+.3f} "
            f"(>= alarms.reward_rise {settings.reward_rise:g})")


CHECKS: dict[str, Callable[[Sequence[Mapping[str, float]], AlarmSettings], str | None]] = {
    "reward_length_corr": check_reward_length_corr,
    "format_saturated": check_format_saturated,
    "tool_calls_no_gain": check_tool_calls_no_gain,
    "entropy_collapse": check_entropy_collapse,
    "kl_blowup": check_kl_blowup,
    "clip_frac_blowup": check_clip_frac_blowup,
    "length_cap": check_length_cap,
    "nonfinite": check_nonfinite,
}


def check_alarms(history: Sequence[Mapping[str, float]], points: Sequence[EvalPoint],
                 settings: AlarmSettings) -> dict[str, str | None]:
    """Every watched alarm: its reason when it fires, else None (``ALARMS`` order)."""
    fired: dict[str, str | None] = {}
    for name in settings.watched:
        if name == "reward_up_heldout_down":
            fired[name] = check_reward_up_heldout_down(history, points, settings)
        else:
            fired[name] = CHECKS[name](history, settings)
    return fired


# ----------------------------------------------------------------------------- the run's state


def step_record(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of one step's metric line the checks read."""
    record = {}
    for key, value in metrics.items():
        wanted = key in WATCHED_KEYS or (key.startswith("reward/") and key.count("/") == 1)
        if wanted and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            record[key] = float(value)
    return record


def heldout_value(metrics: Mapping[str, Any]) -> float | None:
    for key in HELDOUT_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


class RLAlarms:
    """The window of history the alarms need and whether each is firing; one ``observe`` per step.

    Keeps the first window of records and the last window after it (all a check reads), and
    the last two held-out evaluations. ``state_dict`` goes into the checkpoint's trainer state,
    so a resumed run fires exactly when the uninterrupted run would. ``announce``: say the
    warnings (rank 0). ``before``: the held-out metrics measured before the first step.
    """

    def __init__(self, settings: AlarmSettings, *, announce: bool = True, state: Mapping[str, Any] | None = None,
                 before: Mapping[str, Any] | None = None) -> None:
        self.settings, self.announce = settings, announce
        self.head: list[dict[str, float]] = []
        self.tail: deque[dict[str, float]] = deque(maxlen=settings.window)
        self.points: list[EvalPoint] = []
        self.firing: dict[str, bool] = {}
        if state:
            self.load_state_dict(state)
        elif before and heldout_value(before) is not None:
            self.points.append(EvalPoint(0, heldout_value(before), None))

    @property
    def history(self) -> list[dict[str, float]]:
        return self.head + list(self.tail)

    def observe(self, step: int, metrics: Mapping[str, Any]) -> dict[str, int]:
        """Record step ``step``'s metric line (with ``eval/*`` when it evaluated); returns
        ``{"alarm/<name>": 0 or 1}`` for every watched alarm."""
        if not self.settings.watched:
            return {}
        record = step_record(metrics)
        (self.head if len(self.head) < self.settings.window else self.tail).append(record)
        heldout = heldout_value(metrics)
        if heldout is not None:
            level = mean_of(last_window(self.history, self.settings.window), "reward/mean")
            self.points = [*self.points[-1:], EvalPoint(step, heldout, level)]
        fired = check_alarms(self.history, self.points, self.settings)
        for name, reason in fired.items():
            self.tell(name, step, reason)
        return {f"alarm/{name}": int(reason is not None) for name, reason in fired.items()}

    def tell(self, name: str, step: int, reason: str | None) -> None:
        """One line when an alarm starts or stops firing."""
        was = self.firing.get(name, False)
        self.firing[name] = reason is not None
        if not self.announce or was == (reason is not None):
            return
        if reason is not None:
            say(f"rl: warning: alarm {name} at step {step}: {reason}")
        else:
            say(f"rl: alarm {name} cleared at step {step}")

    def state_dict(self) -> dict[str, Any]:
        return {"head": [dict(r) for r in self.head], "tail": [dict(r) for r in self.tail],
                "points": [[p.step, p.heldout, p.reward_level] for p in self.points], "firing": dict(self.firing)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        window = self.settings.window
        records = [*state.get("head", []), *state.get("tail", [])]  # a changed window re-splits the same records
        self.head = [dict(r) for r in records[:window]]
        self.tail = deque((dict(r) for r in records[window:]), maxlen=window)
        self.points = [EvalPoint(int(s), float(h), None if level is None else float(level))
                       for s, h, level in state.get("points", [])]
        self.firing = {str(k): bool(v) for k, v in state.get("firing", {}).items()}


# ----------------------------------------------------------------------------- for the report


def fired_spans(records: Sequence[Mapping[str, Any]], name: str) -> list[tuple[int, int]]:
    """The runs of logged steps at which ``alarm/<name>`` was 1, as (first step, last step).

    >>> fired_spans([{"step": 1, "alarm/x": 0}, {"step": 2, "alarm/x": 1}, {"step": 3, "alarm/x": 1},
    ...              {"step": 4, "alarm/x": 0}, {"step": 5, "alarm/x": 1}], "x")
    [(2, 3), (5, 5)]
    """
    spans: list[tuple[int, int]] = []
    open_span: list[int] | None = None
    for index, record in enumerate(records):
        value = record.get(f"alarm/{name}")
        if value is None:
            continue
        step = int(record.get("step", index))
        if value:
            open_span = [step, step] if open_span is None else [open_span[0], step]
        elif open_span is not None:
            spans.append((open_span[0], open_span[1]))
            open_span = None
    if open_span is not None:
        spans.append((open_span[0], open_span[1]))
    return spans


def describe_spans(spans: Sequence[tuple[int, int]]) -> str:
    """The spans as the report shows them.

    >>> describe_spans([(2, 3), (5, 5)])
    'steps 2–3, 5'
    >>> describe_spans([(7, 7)])
    'step 7'
    """
    parts = [f"{a}" if a == b else f"{a}–{b}" for a, b in spans]
    return ("step " if parts == [str(spans[0][0])] else "steps ") + ", ".join(parts)


def alarm_summary(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """(the alarms a run's metric lines watched, ``{name: "steps 2–3, 5"}`` for those that fired)."""
    watched = [name for name in ALARMS if any(f"alarm/{name}" in r for r in records)]
    fired = {name: describe_spans(spans) for name in watched if (spans := fired_spans(records, name))}
    return watched, fired
