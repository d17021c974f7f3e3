"""Hostile programs against the code sandbox: each is contained, fails, and leaves nothing.

Both isolation modes run the same attacks where the mode claims to stop them; the
``namespace`` mode needs root on Linux and is skipped elsewhere; ``process`` mode is
skipped where it cannot run (as root it needs an interpreter a private uid may execute).
Attacks on the reward itself (lying objects, patched builtins, answer keys, ...) are in
``test_reward_hacks.py``.
"""

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from posttrain.sandbox.runner import Sandbox, SandboxLimits, _pids_of_uid, base_python, namespace_available

SMALL = SandboxLimits(wall_seconds=2, cpu_seconds=2, memory_mb=256, max_processes=8, max_output_bytes=20_000)

HAS_NAMESPACE = namespace_available()


def _process_mode_python():
    """An interpreter process mode can use here (as root it runs as a private uid, which
    cannot reach an interpreter under a private home such as /root/.pyenv)."""
    for python in (base_python(), "/usr/bin/python3"):
        try:
            Sandbox(SMALL, isolation="process", python=python)
            return python, None
        except ValueError as e:
            refusal = str(e)
    return None, refusal


PROCESS_PYTHON, PROCESS_REFUSAL = _process_mode_python()
MODES = [
    pytest.param("namespace", marks=pytest.mark.skipif(not HAS_NAMESPACE, reason="needs root + namespaces")),
    pytest.param("process", marks=pytest.mark.skipif(PROCESS_REFUSAL is not None, reason=str(PROCESS_REFUSAL))),
]


@pytest.fixture(params=MODES)
def box(request):
    python = PROCESS_PYTHON if request.param == "process" else None
    return Sandbox(SMALL, isolation=request.param, max_workers=2, python=python)


def _sandbox_uid_processes():
    return [pid for uid in range(1_990_000, 1_990_128) for pid in _pids_of_uid(uid)]


def _tmp_entries():
    return {p for p in os.listdir("/tmp") if p.startswith("posttrain-sandbox")}


@pytest.fixture(autouse=True)
def machine_left_as_it_was():
    tmp_before = _tmp_entries()
    yield
    assert _sandbox_uid_processes() == []
    assert _tmp_entries() == tmp_before


def test_plain_run_stdin_and_tests(box):
    assert box.run("print(6 * 7)").stdout == "42\n"
    assert box.run("import sys; print(sys.stdin.read()[::-1])", stdin="abc").stdout == "cba\n"
    result = box.run_tests("def f(x):\n    return x + 1", ["assert f(1) == 2", "assert f(1) == 3", "1/0"])
    assert result.tests_passed == [True, False, False]
    assert box.run("raise SystemExit(3)").status == "error"


def test_exit_zero_does_not_fake_a_pass(box):
    """`exit(0)` inside the solution, or printing a fake verdict, passes no test."""
    result = box.run_tests("import sys\nprint('0 0 pass')\nsys.exit(0)", ["assert False"])
    assert result.tests_passed == [False]
    result = box.run_tests("import os\nos._exit(0)", ["assert False"])
    assert result.tests_passed == [False]


def test_infinite_loop_is_killed(box):
    start = time.monotonic()
    result = box.run_tests("while True:\n    pass", ["assert True"])
    assert result.status == "timeout" and result.tests_passed == [False]
    assert time.monotonic() - start < SMALL.wall_seconds + 2


def test_sleeping_forever_hits_the_wall_clock(box):
    result = box.run("import time\ntime.sleep(60)")
    assert result.status == "timeout"
    assert result.wall_seconds < SMALL.wall_seconds + 1


def test_fork_bomb_is_contained(box):
    program = "import os\nwhile True:\n    try:\n        os.fork()\n    except Exception:\n        pass"
    result = box.run_tests(program, ["assert True"])
    assert not result.ok or result.tests_passed == [False]
    assert result.tests_passed == [False]


def test_huge_allocation_fails(box):
    result = box.run_tests("x = bytearray(8 * 1024 ** 3)", ["assert len(x) > 0"])
    assert result.tests_passed == [False]
    assert "MemoryError" in result.stderr


def test_writing_outside_the_temp_dir_is_refused(box, tmp_path):
    target = tmp_path / "pwned.txt"
    for path in (str(target), "/work/pwned.txt", "/tmp/pwned.txt", "/dev/shm/pwned.txt"):
        program = f"open({path!r}, 'w').write('x')\nprint('wrote')"
        result = box.run(program)
        # in `namespace` isolation /tmp is the run's own tmpfs and /dev/shm does not exist
        if not (box.isolation == "namespace" and path.startswith("/tmp/")):
            assert result.status == "error" and "wrote" not in result.stdout
    assert not target.exists()
    assert not os.path.exists("/work/pwned.txt")
    assert not os.path.exists("/tmp/pwned.txt")
    assert not os.path.exists("/dev/shm/pwned.txt")


def test_parent_environment_secrets_are_not_visible():
    """Run the caller in a subprocess whose initial environment holds a secret."""
    script = textwrap.dedent(
        """
        import os, sys
        from posttrain.sandbox.runner import Sandbox, SandboxLimits
        program = (
            "import os\\n"
            "print(dict(os.environ))\\n"
            "for pid in (os.getppid(), CALLER):\\n"
            "    try:\\n"
            "        print(open(f'/proc/{pid}/environ').read())\\n"
            "    except Exception as e:\\n"
            "        print('refused', type(e).__name__)\\n"
        ).replace("CALLER", str(os.getpid()))
        for mode in sys.argv[2:]:
            python = sys.argv[1] if mode == "process" else None
            r = Sandbox(SandboxLimits(wall_seconds=5), isolation=mode, python=python).run(program)
            print(mode, r.status, r.stdout, r.stderr)
        """
    )
    modes = (["namespace"] if HAS_NAMESPACE else []) + (["process"] if PROCESS_REFUSAL is None else [])
    if not modes:
        pytest.skip("no isolation mode runs here")
    env = dict(os.environ, POSTTRAIN_TEST_SECRET="hunter2-secret")
    out = subprocess.run(
        [sys.executable, "-c", script, str(PROCESS_PYTHON), *modes], env=env, capture_output=True, text=True, timeout=60, cwd=os.getcwd()
    )
    assert out.returncode == 0, out.stderr
    assert "hunter2-secret" not in out.stdout
    assert out.stdout.count("refused") == 2 * len(modes)


def test_network_is_unreachable(box):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.settimeout(0.2)
    port = server.getsockname()[1]
    program = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'x')\nprint('connected')"
    result = box.run(program)
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()
    assert result.status == "error" and "connected" not in result.stdout


def test_killing_the_caller_fails(box):
    me = os.getpid()
    program = f"import os, signal\nos.kill({me}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)\nprint('done')"
    result = box.run(program)
    assert result.status == "error"
    program = "import os, signal\nos.kill(-1, signal.SIGKILL)\nprint('done')"
    box.run(program)
    assert os.getpid() == me  # still here
    assert box.run("print('still working')").stdout == "still working\n"


def test_printing_gigabytes_is_cut_off(box):
    start = time.monotonic()
    result = box.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert result.status == "output_limit"
    assert len(result.stdout) <= SMALL.max_output_bytes
    assert time.monotonic() - start < 2


def test_background_processes_do_not_survive(box):
    program = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('parent done')"
    box.run(program)  # the fixture asserts that no sandbox process is left


@pytest.mark.skipif(not HAS_NAMESPACE, reason="needs root + namespaces")
def test_namespace_hides_the_filesystem_and_drops_root():
    box = Sandbox(SMALL, isolation="namespace")
    home = os.path.realpath(os.path.expanduser("~"))
    python = base_python()
    # the caller's home shows nothing but the path down to the interpreter (when it lives there)
    allowed = sorted({os.path.relpath(python, home).split(os.sep)[0]}) if python.startswith(home + "/") else []
    program = (
        "import os, json\n"
        f"home = {home!r}\n"
        "print(json.dumps([os.getuid(), sorted(os.listdir(home)) if os.path.isdir(home) else [],"
        " os.path.exists('/proc'), os.getcwd()]))"
    )
    result = box.run(program)
    uid, home_listing, proc_visible, cwd = __import__("json").loads(result.stdout)
    assert uid >= 1_990_000 and home_listing == allowed and proc_visible is False
    assert sorted(os.listdir(home)) != allowed  # the home really holds more than that
    assert cwd == "/tmp"
    assert box.run("print(open('/etc/passwd').read())").status == "error"


def test_worker_pool_runs_in_parallel():
    box = Sandbox(SandboxLimits(wall_seconds=5), max_workers=4)
    start = time.monotonic()
    results = box.map(lambda i: box.run(f"import time\ntime.sleep(0.5)\nprint({i})"), list(range(4)))
    elapsed = time.monotonic() - start
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert elapsed < 1.6  # four 0.5 s sleeps, not serialised


def test_filling_the_disk_is_cut_off(box):
    """One file is capped by RLIMIT_FSIZE (SIGXFSZ); in `namespace` mode all writes share a small tmpfs."""
    result = box.run("with open('big.bin', 'wb') as f:\n    f.write(b'x' * (40 * 1024 * 1024))\nprint('wrote')")
    assert result.status == "error" and "wrote" not in result.stdout
    if box.isolation == "namespace":
        program = (
            "for i in range(100):\n"
            "    with open(f'part{i}.bin', 'wb') as f:\n"
            "        f.write(b'x' * (8 * 1024 * 1024))\n"
            "print('wrote')"
        )
        result = box.run(program)
        assert result.status == "error" and "No space left" in result.stderr


def test_missing_cgroups_and_seccomp_are_announced_once_and_runs_still_work(monkeypatch):
    """Where the kernel or the system offers less, one warning says what applies instead."""
    import warnings

    from posttrain.sandbox import runner, seccomp

    class NoCgroups:
        version, bases, why = None, {}, "no cgroup hierarchy (test)"

    monkeypatch.setattr(runner, "_warned", set())
    monkeypatch.setattr(runner, "cgroup_support", lambda: NoCgroups())
    monkeypatch.setattr(seccomp, "filter_bpf", lambda: (None, "libseccomp is missing (test)"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        boxes = [Sandbox(SMALL, isolation="namespace" if HAS_NAMESPACE else "process",
                         python=None if HAS_NAMESPACE else PROCESS_PYTHON) for _ in range(2)]
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert sum("not the run as a whole" in m and "(test)" in m for m in messages) == 1
    assert sum("no seccomp filter (libseccomp is missing (test))" in m for m in messages) == 1
    if HAS_NAMESPACE or PROCESS_REFUSAL is None:
        assert boxes[1].run("print('degraded but running')").stdout == "degraded but running\n"


def test_seccomp_filter_degrades_with_a_clear_reason_without_pyseccomp(monkeypatch):
    from posttrain.sandbox import seccomp

    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import fails as if not installed
    program, why = seccomp._build()
    assert program is None and "pyseccomp/libseccomp is not usable" in why and "libseccomp" in why
