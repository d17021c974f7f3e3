"""The thread policy of every command: threads chosen for the load measured at start, a user's
setting or OMP_NUM_THREADS wins, a bad setting is one line, and the command line applies it
before torch loads (posttrain.train.threads)."""

import doctest
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import posttrain.train.threads as threads
from posttrain.errors import ConfigError
from posttrain.train.threads import ThreadPlan, apply_plan, cpu_times, measure_busy_cores, plan_threads, usable_cores

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("usable,busy,expected,wait_policy", [
    (2, 0.0, 2, None),          # idle machine: a thread per core, OpenMP's own waiting
    (2, 0.3, 2, None),          # a bit of background noise is not a neighbour
    (2, 1.0, 1, "PASSIVE"),     # one busy single-threaded process: the free core only
    (2, 0.5, 1, "PASSIVE"),     # half a core busy rounds to a busy core
    (2, 3.0, 1, "PASSIVE"),     # three busy processes on two cores: never fewer than one thread
    (2, 97.0, 1, "PASSIVE"),    # absurd figures from a broken sample still give one thread
    (16, 3.4, 13, "PASSIVE"),
    (16, -2.0, 16, None),       # a counter that went backwards is no load
])
def test_threads_follow_the_busy_cores_measured_at_start(usable, busy, expected, wait_policy):
    plan = plan_threads({}, usable=usable, busy_cores=busy, torch_loaded=False)
    assert (plan.threads, plan.wait_policy, plan.lowered_for_load) == (expected, wait_policy, expected < usable)


def test_the_users_choice_overrides_the_policy():
    busy = dict(usable=2, busy_cores=2.0)
    assert plan_threads({"POSTTRAIN_THREADS": "2"}, **busy, torch_loaded=False).threads == 2
    assert plan_threads({"POSTTRAIN_THREADS": " 3 "}, **busy, torch_loaded=True).threads == 3
    left = plan_threads({"OMP_NUM_THREADS": "2"}, **busy, torch_loaded=False)
    assert (left.threads, left.wait_policy) == (None, None)  # torch reads OMP_NUM_THREADS itself
    assert plan_threads({}, **busy, torch_loaded=True).threads is None  # the calling program's torch
    own_policy = plan_threads({"OMP_WAIT_POLICY": "active"}, **busy, torch_loaded=False)
    assert (own_policy.threads, own_policy.wait_policy) == (1, None)


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "1e3", "½"])
def test_a_bad_thread_setting_is_one_line_naming_it(value):
    with pytest.raises(ConfigError, match=r"^POSTTRAIN_THREADS=.*whole number of threads, at least 1$"):
        plan_threads({"POSTTRAIN_THREADS": value}, usable=2, busy_cores=0.0, torch_loaded=False)


def test_usable_cores_and_load_samples_from_faked_proc_stat(tmp_path):
    assert usable_cores(4, 1.5) == 2 and usable_cores(4, 0.2) == 1 and usable_cores(2, None) == 2
    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9\ncpu0 10 0 0 90 0 0 0 0\ncpu1 10 0 0 90 0 0 0 0\ncpu2 0 0 0 100\nintr 1 2\n")
    assert cpu_times(stat.read_text(), {0, 1}) == (20, 200)
    assert cpu_times(stat.read_text(), {7}) == (0, 0)
    assert measure_busy_cores({7}, seconds=0.0, stat_path=str(stat)) is None  # no such core: no reading
    assert measure_busy_cores({0}, seconds=0.0, stat_path=str(tmp_path / "missing")) is None
    assert measure_busy_cores({0, 1}, seconds=0.0, stat_path=str(stat)) == 0.0  # no tick passed


def test_apply_plan_sets_the_wait_policy_only_where_the_user_did_not(monkeypatch):
    before = torch.get_num_threads()
    try:
        environ = {}
        apply_plan(ThreadPlan(1, "PASSIVE", "test"), environ)
        assert environ == {"OMP_WAIT_POLICY": "PASSIVE"} and torch.get_num_threads() == 1
        environ = {"OMP_WAIT_POLICY": "ACTIVE"}
        apply_plan(ThreadPlan(None, "PASSIVE", "test"), environ)
        assert environ == {"OMP_WAIT_POLICY": "ACTIVE"} and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_doctests_of_the_thread_module():
    assert doctest.testmod(threads).failed == 0


FAKE_EVERY_CORE_BUSY = """
import posttrain.train.threads as threads
def every_core_busy(cpus, **options):
    print("TORCH LOADED WHEN MEASURED", "torch" in sys.modules)
    return float(len(cpus))
threads.measure_busy_cores = every_core_busy
"""


def _command_threads(tiny_model_dir, environment, *, every_core_busy=False):
    """Run ``posttrain chat`` in a fresh process and return (exit status, torch threads after it,
    OMP_WAIT_POLICY after it, stdout, stderr); ``every_core_busy`` fakes the load measurement."""
    script = ("import os, sys\n" + (FAKE_EVERY_CORE_BUSY if every_core_busy else "") +
              "from posttrain.cli import main\n"
              "status = main(['chat', '--model', sys.argv[1], 'hi', '--max-new-tokens', '1'])\n"
              "import torch\nprint('RESULT', status, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))\n")
    env = {key: value for key, value in os.environ.items()
           if key not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "POSTTRAIN_THREADS")}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **environment)
    done = subprocess.run([sys.executable, "-c", script, tiny_model_dir], env=env, capture_output=True, text=True,
                          timeout=300)
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert result, done.stderr[-2000:]
    _, status, count, policy = result[-1].split()
    return int(status), int(count), policy, done.stdout, done.stderr


def test_commands_apply_the_plan_before_torch_loads(tiny_model_dir):
    """A fresh ``posttrain chat`` process: the plan chooses torch's threads (here the user's
    POSTTRAIN_THREADS), and a plan that lowers the count for load sets the wait policy while
    torch is not yet loaded (``current_plan`` faked to see every core busy)."""
    status, count, policy, _, _ = _command_threads(tiny_model_dir, {"POSTTRAIN_THREADS": "1"})
    assert (status, count, policy) == (0, 1, "None")
    status, _, _, _, stderr = _command_threads(tiny_model_dir, {"POSTTRAIN_THREADS": "none"})
    assert status == 2 and stderr.strip().splitlines() == ["error: POSTTRAIN_THREADS='none': give a whole number of "
                                                           "threads, at least 1"]
    if len(os.sched_getaffinity(0)) > 1:
        status, count, policy, stdout, stderr = _command_threads(tiny_model_dir, {}, every_core_busy=True)
        assert (status, count, policy) == (0, 1, "PASSIVE")
        assert "TORCH LOADED WHEN MEASURED False" in stdout and "threads" not in stderr  # output does not vary with load
