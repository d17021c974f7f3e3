"""How many CPU threads a command computes with, chosen for the machine's load when it starts.

PyTorch on a CPU splits each matrix product over ``torch.get_num_threads()`` OpenMP threads,
one per core by default, and every product ends at a barrier that waits for the slowest thread.
When another process holds a core, the thread scheduled there runs at a fraction of its speed
and every barrier waits for it: generation (thousands of small products per reply) slows by far
more than the core that is lost (the PyTorch CPU performance guide, "Tuning the number of
threads"; libgomp's documentation of ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT``).
``benchmarks/bench_contention.py`` measures it on the machine at hand; on a 2-core machine
(8 prompts, greedy, 48 new tokens, the bundled model): alone 6.0 s; beside one busy
single-threaded process 24.1 s with torch's default threads, 9.7 s with this policy; beside
three, 52.7 s and 18.6 s.

Policy (``plan_threads``), applied by every command that computes (sft, rm, dpo, rl, eval,
pipeline, chat) before torch loads:

1. ``POSTTRAIN_THREADS=N`` (a whole number >= 1) is used as it is: the user's setting.
2. ``OMP_NUM_THREADS`` set by the user (or by ``torchrun``, which sets 1 per rank) is left to
   torch, which reads it itself.
3. A program that imported torch before calling the command owns torch's threads: they are
   left as they are (tests and notebooks that call ``posttrain.cli.main`` in-process).
4. Otherwise the cores this process may use (its CPU affinity, capped by a cgroup CPU quota)
   minus the cores other processes kept busy on them over a short sample of ``/proc/stat``
   at start (per-core busy time of the cores in the affinity), rounded to the nearest core,
   at least 1. Where fewer threads than usable cores are chosen, OpenMP's idle
   threads are told to sleep rather than spin (``OMP_WAIT_POLICY=PASSIVE``, unless the user set
   it): spinning threads take cycles from the very neighbours the count makes room for. The
   variable is read once, when the OpenMP runtime loads with torch, so it is set before that.

The choice is made once, at the start of the command: load that comes later does not change it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Mapping, MutableMapping

from posttrain.errors import ConfigError

THREADS_VARIABLE = "POSTTRAIN_THREADS"
SAMPLE_SECONDS = 0.3


@dataclass(frozen=True)
class ThreadPlan:
    """What a command computes with: ``threads`` for torch (None: leave torch's own choice),
    ``wait_policy`` for OpenMP (None: leave it), and ``reason``, one line a user can read."""

    threads: int | None
    wait_policy: str | None
    reason: str
    lowered_for_load: bool = False


def usable_cores(affinity: int, quota: float | None) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup quota (in cores,
    rounded up: a quota of 1.5 cores still runs two threads part of the time).

    >>> usable_cores(8, None), usable_cores(8, 1.5), usable_cores(2, 4.0)
    (8, 2, 2)
    """
    cores = max(1, affinity)
    if quota is not None and quota > 0:
        cores = min(cores, max(1, math.ceil(quota)))
    return cores


def plan_threads(environ: Mapping[str, str], *, usable: int, busy_cores: float, torch_loaded: bool) -> ThreadPlan:
    """The thread plan for a command (the policy of this module's docstring).

    ``usable``: cores this process may use; ``busy_cores``: how many of them other processes
    kept busy at start (0.0 on an idle machine, 1.0 beside one busy single-threaded process).

    >>> plan_threads({}, usable=2, busy_cores=0.05, torch_loaded=False).threads
    2
    >>> plan = plan_threads({}, usable=2, busy_cores=1.0, torch_loaded=False)
    >>> plan.threads, plan.wait_policy
    (1, 'PASSIVE')
    >>> plan_threads({"OMP_NUM_THREADS": "2"}, usable=2, busy_cores=1.0, torch_loaded=False).threads
    """
    setting = environ.get(THREADS_VARIABLE)
    if setting is not None and setting.strip():
        return ThreadPlan(parse_thread_setting(setting), None, f"{THREADS_VARIABLE}={setting.strip()}")
    if environ.get("OMP_NUM_THREADS", "").strip():
        return ThreadPlan(None, None, f"OMP_NUM_THREADS={environ['OMP_NUM_THREADS'].strip()} (left to torch)")
    if torch_loaded:
        return ThreadPlan(None, None, "torch was loaded by the calling program, which owns its threads")
    threads = max(1, min(usable, usable - math.floor(max(0.0, busy_cores) + 0.5)))
    wait_policy = None
    if threads < usable and not environ.get("OMP_WAIT_POLICY", "").strip():
        wait_policy = "PASSIVE"
    reason = f"{threads} of {usable} cores ({busy_cores:.1f} cores busy with other processes at start)"
    return ThreadPlan(threads, wait_policy, reason, lowered_for_load=threads < usable)


def parse_thread_setting(value: str) -> int:
    """``POSTTRAIN_THREADS``'s value as a whole number >= 1, else a one-line ConfigError."""
    text = value.strip()
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{THREADS_VARIABLE}={value!r}: give a whole number of threads, at least 1")
    return int(text)


def cpu_times(stat_text: str, cpus: Collection[int]) -> tuple[int, int]:
    """(busy, total) clock ticks, summed over the cores ``cpus``, from ``/proc/stat``'s
    ``cpuN`` lines: idle and I/O wait are idle; user, nice, system, irq, softirq and steal are
    busy (guest time is already counted in user).

    >>> text = "cpu  300 0 0 900\\ncpu0 100 5 20 800 10 1 2 3 0 0\\ncpu1 50 0 0 50 0 0 0 0 0 0"
    >>> cpu_times(text, {0}), cpu_times(text, {0, 1})
    ((131, 941), (181, 1041))
    """
    busy = total = 0
    for line in stat_text.splitlines():
        name, *values = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        fields = [int(value) for value in values[:8]] + [0] * (8 - len(values[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = fields
        line_busy = user + nice + system + irq + softirq + steal
        busy += line_busy
        total += line_busy + idle + iowait
    return busy, total


def busy_from_samples(before: tuple[int, int], after: tuple[int, int], cores: int) -> float:
    """Cores busy between two ``cpu_times`` samples of ``cores`` cores (0.0 when no tick passed).

    >>> busy_from_samples((100, 1000), (160, 1120), cores=2)
    1.0
    """
    ticks = after[1] - before[1]
    if ticks <= 0:
        return 0.0
    return cores * (after[0] - before[0]) / ticks


def measure_busy_cores(cpus: Collection[int], seconds: float = SAMPLE_SECONDS,
                       stat_path: str = "/proc/stat") -> float | None:
    """How many of the cores ``cpus`` other processes keep busy, sampled over ``seconds`` while
    this process sleeps; None where ``/proc/stat`` cannot be read (not Linux)."""
    try:
        before = cpu_times(Path(stat_path).read_text(), cpus)
        time.sleep(seconds)
        after = cpu_times(Path(stat_path).read_text(), cpus)
    except (OSError, ValueError):
        return None
    if before[1] == 0:
        return None
    return busy_from_samples(before, after, len(cpus))


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """The cgroup v2 CPU quota in cores (``"150000 100000"`` -> 1.5); None when unlimited or unknown."""
    try:
        quota, period = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def current_plan(environ: Mapping[str, str] | None = None, *, torch_loaded: bool | None = None) -> ThreadPlan:
    """The plan for this process now: its environment, cores and the load measured at this moment.
    ``torch_loaded``: whether the calling program had loaded torch (default: whether it is loaded now)."""
    environ = os.environ if environ is None else environ
    torch_loaded = "torch" in sys.modules if torch_loaded is None else torch_loaded
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    if environ.get(THREADS_VARIABLE, "").strip() or environ.get("OMP_NUM_THREADS", "").strip() or torch_loaded:
        busy = 0.0  # the plan does not read the load: no need to sample it
    else:
        busy = measure_busy_cores(cpus)
    if busy is None:
        return ThreadPlan(None, None, "the machine's load cannot be read; torch's default threads")
    return plan_threads(environ, usable=usable_cores(len(cpus), cgroup_cpu_quota()), busy_cores=busy,
                        torch_loaded=torch_loaded)


def apply_plan(plan: ThreadPlan, environ: MutableMapping[str, str] | None = None) -> ThreadPlan:
    """Set the OpenMP wait policy (environment, before torch loads) and torch's thread count."""
    environ = os.environ if environ is None else environ
    if plan.wait_policy is not None:
        environ.setdefault("OMP_WAIT_POLICY", plan.wait_policy)
    if plan.threads is not None:
        import torch

        torch.set_num_threads(plan.threads)
    return plan


def configure_threads(*, torch_loaded: bool | None = None) -> ThreadPlan:
    """Choose and apply the thread plan of this module's policy. Call first in a command;
    ``torch_loaded`` as in ``current_plan``. The plan's reason is logged at DEBUG on
    ``posttrain.threads`` (the console shows INFO and above: a command's output and its one-line
    errors do not change with the load)."""
    plan = apply_plan(current_plan(torch_loaded=torch_loaded))
    logging.getLogger("posttrain.threads").debug("threads: %s", plan.reason)
    return plan
