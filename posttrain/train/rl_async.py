"""Asynchronous RL steps (``rl.max_staleness: k``): the rollouts of the next steps are generated
and scored while the trainer updates, with a bound on how old the policy that sampled a
trained token may be.

Policy versions: version v is the policy after v updates (0: the starting weights, or the
checkpoint's step on resume). ``RolloutAhead`` knows which version the engine holds when a
batch is sampled (it pushes every version itself) and the loop stamps each sample with it
(``RolloutSample.policy_version``); the update of step s (0-based) starts from version s, so
a sample of version v is ``s - v`` versions stale.

How the bound is kept (``RolloutAhead``): a background thread collects the batch of step t
(prompts, generation, scoring: ``train.rl_rollouts.collect_rollouts``) as soon as the engine
holds version >= t - k, while the trainer updates; the trainer pushes each new version to the
engine between two batches (one lock: a batch is sampled by one version). With k = 0 the
thread waits for every update, which is the synchronous loop; with k = 0 no thread is started
at all. A batch's groups with a sample older than s - k are dropped before training
(``drop_stale``), counted per prompt row so a starved prompt shows; with whole-batch
generation this only happens if the engine's weights fell behind (a sync that failed to
apply), so a non-zero count is a fault to look at, not noise.

Prompt order and resume: the thread draws prompts from the run's ``PromptSampler`` in step
order and each batch carries the sampler's position after its draw; a checkpoint saved after
step s records that of batch s (``RolloutBatch.sampler_state``), not the thread's position
further ahead. On resume the thread starts again at step s + 1 from that position: the
batches that were in flight when the run was killed are sampled again, by the resumed
policy, and no prompt is lost or trained twice. Sampling seeds are a function of the step
(``rl_rollouts.step_sampling``), so at k = 0 a resumed run is bit-identical to an
uninterrupted one.

Decoupled PPO (Hilton et al. 2022): the policy ratio is taken to the proximal policy (the
trainer's weights at the start of the update), and the step from the behaviour policy (the
engine's version) to it is an importance weight (``algorithms.mismatch``, ``rl.mismatch``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from posttrain.errors import UserError
from posttrain.train.rl_samples import RolloutBatch


class RolloutError(UserError):
    """The rollouts of a step cannot be trained on (one line, the checkpoints named)."""


@dataclass
class StalenessCounts:
    """What the bound dropped, for the metrics: this step's and the run's."""

    dropped_samples: int = 0
    dropped_rows: dict[int, int] = field(default_factory=dict)  # prompt row -> samples dropped over the run


def drop_stale(batch: RolloutBatch, step: int, max_staleness: int, counts: StalenessCounts) -> dict[str, float]:
    """Drop from ``batch`` (in place) the samples older than ``step - max_staleness`` and return
    the step's staleness metrics.

    A group with a stale sample is dropped whole (its samples were sampled together, and
    group-relative advantages need the whole group); samples without a version are fresh. Metrics: ``staleness/mean``,
    ``staleness/max``, ``staleness/hist/<d>`` (the share of the step's samples d versions old,
    d = 0..k), ``staleness/dropped`` (samples dropped this step), ``staleness/dropped_rows``
    (distinct prompt rows losing samples this step) and ``staleness/starved_rows`` (rows that
    lost samples at least twice over the run: the prompts the bound keeps out of training).

    >>> from posttrain.train.rl_samples import RolloutSample
    >>> def sample(row, version): return RolloutSample(row, row, [1], [2], "", "stop", policy_version=version)
    >>> batch = RolloutBatch(groups=[[sample(0, 3), sample(0, 1)], [sample(5, 2), sample(5, 2)]])
    >>> metrics = drop_stale(batch, step=3, max_staleness=1, counts=StalenessCounts())
    >>> [[s.policy_version for s in g] for g in batch.groups], metrics["staleness/dropped"]
    ([[2, 2]], 2.0)
    """
    ages: list[int] = []
    kept_groups = []
    for group in batch.groups:
        group_ages = [0 if sample.policy_version is None else step - sample.policy_version for sample in group]
        if max(group_ages) > max_staleness:
            for sample in group:
                counts.dropped_samples += 1
                counts.dropped_rows[sample.row] = counts.dropped_rows.get(sample.row, 0) + 1
                batch.stale_rows.append(sample.row)
            continue
        ages.extend(group_ages)
        kept_groups.append(group)
    batch.groups = kept_groups
    total = len(ages) + len(batch.stale_rows)
    metrics = {"staleness/mean": sum(ages) / len(ages) if ages else 0.0, "staleness/max": float(max(ages, default=0)),
               "staleness/dropped": float(len(batch.stale_rows)),
               "staleness/dropped_rows": float(len(set(batch.stale_rows))),
               "staleness/starved_rows": float(sum(n >= 2 for n in counts.dropped_rows.values()))}
    for age in range(max_staleness + 1):
        metrics[f"staleness/hist/{age}"] = sum(a == age for a in ages) / max(1, total)
    return metrics


class RolloutAhead:
    """The batches of steps ``start``, ``start + 1``, ... collected ``max_staleness`` steps
    ahead of the trainer by a background thread (module docstring).

    ``collect(step, version)`` returns the step's scored ``RolloutBatch`` sampled by the
    engine's weights of policy ``version`` (drawing its prompts from the run's sampler, in step
    order); ``next(step)`` waits for it; ``push_weights(update)`` runs
    ``update()`` (the engine's weight sync) between two batches and counts a new version.
    With ``max_staleness`` 0 no thread is started: ``next`` collects in the caller's thread,
    exactly the synchronous loop (``threaded=True`` starts the thread anyway, with the same
    order of operations: what the bit-for-bit test compares).
    """

    def __init__(self, collect: Callable[[int, int], RolloutBatch], *, start: int, stop: int, max_staleness: int,
                 threaded: bool | None = None):
        self.collect, self.start, self.stop, self.max_staleness = collect, start, stop, max_staleness
        self.version = start  # the engine's weights: the policy after `start` updates
        self.threaded = max_staleness > 0 if threaded is None else threaded
        self._ready: dict[int, RolloutBatch] = {}
        self._error: BaseException | None = None
        self._closed = False
        self._changed = threading.Condition()
        self._engine = threading.Lock()  # held while a batch is sampled or weights are pushed
        self._thread: threading.Thread | None = None
        if self.threaded and start < stop:
            self._thread = threading.Thread(target=self._run, name="posttrain-rollouts", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for step in range(self.start, self.stop):
                with self._changed:
                    self._changed.wait_for(lambda: self._closed or self.version >= step - self.max_staleness)
                    if self._closed:
                        return
                with self._engine:
                    batch = self.collect(step, self.version)
                with self._changed:
                    self._ready[step] = batch
                    self._changed.notify_all()
        except BaseException as exc:  # handed to the trainer's thread by next()
            with self._changed:
                self._error = exc
                self._changed.notify_all()

    def next(self, step: int) -> RolloutBatch:
        """The batch of ``step`` (waits for the thread; re-raises its error in this thread)."""
        if not self.threaded:
            return self.collect(step, self.version)
        with self._changed:
            self._changed.wait_for(lambda: step in self._ready or self._error is not None)
            if step not in self._ready:
                raise self._error  # type: ignore[misc]
            return self._ready.pop(step)

    def push_weights(self, update: Callable[[], None]) -> None:
        """Run ``update`` (the engine's weight sync) between two batches; the engine now holds
        one more version."""
        with self._engine:
            update()
        with self._changed:
            self.version += 1
            self._changed.notify_all()

    def exclusive(self) -> threading.Lock:
        """A lock that keeps the thread off the engine (held while evaluating with it)."""
        return self._engine

    def close(self) -> None:
        """Stop the thread after the batch it is sampling (if any)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> "RolloutAhead":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
