"""Run model-written Python as hostile input: one fresh, limited, isolated process per run.

Used by the ``code`` reward (RL, seed section 4.4 "Rule-based: does the code pass") and by
HumanEval evaluation. Every run is ``python -I`` in a new session with an empty
environment, its own temporary working directory, hard resource limits and a wall-clock
deadline; the caller reads at most ``max_output_bytes`` and kills the run beyond that.

Isolation layers and how strong each one is (be honest about what protects what):

=========================  =====================================  ==========================
layer                      ``namespace`` (root; default when it   ``process`` (fallback,
                           works)                                 any user)
=========================  =====================================  ==========================
separate interpreter       ``python -I -B``, fresh per run         same
env vars of the parent     not passed (fixed minimal env)          same
CPU / memory / file size   RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE     same (kernel-enforced)
wall clock, output size    caller kills the whole session          same
network                    new network namespace: no interfaces    audit hook refuses socket
                           but a down loopback (kernel-enforced)   creation (bypassable by
                                                                   native code; defence only)
files outside the workdir  chroot into a tmpfs root with read-only audit hook refuses writes
                           binds of only /usr, the interpreter,    outside the workdir;
                           the venv and /dev/{null,zero,random,    reads are NOT restricted
                           urandom}: the rest of the machine is    (same uid as the caller)
                           not even visible; /tmp is size-limited
processes / fork bombs     a private uid per worker slot +         audit hook refuses fork,
                           RLIMIT_NPROC; after the run every       exec, subprocess, kill;
                           process of that uid is SIGKILLed        process group killed after
killing the caller         impossible: different uid, no caps      audit hook refuses os.kill
leftovers                  tmpfs vanishes with the namespace       temp dir removed
=========================  =====================================  ==========================

Audit hooks (PEP 578) are not a security boundary: code that reaches native code (an
extension module already imported, or a bug in CPython) can bypass them. ``process``
isolation therefore only suits trusted-ish code (for example canonical solutions on a
laptop); run RL on real model output where ``namespace`` isolation is available (root or
a container with CAP_SYS_ADMIN). Neither mode uses seccomp; the kernel attack surface is
that of an ordinary unprivileged process.

Cost: about 50 ms per run here (two interpreter starts, a handful of mounts); the 164
HumanEval canonical solutions take 18 s with 1 worker and 7 s with 4 on a 2-core machine.

Test results travel on a separate pipe as lines carrying a per-run random nonce,
so ``exit(0)`` or printing a fake "all passed" cannot fake a pass. A program that walks
the interpreter's frames could still find the nonce: the reward is hard to game by
accident or by simple tricks, not impossible to game by design.
"""

from __future__ import annotations

import json
import os
import secrets
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

Isolation = Literal["auto", "namespace", "process"]

_BOOT_SOURCE = Path(__file__).with_name("sandbox_boot.py").read_text()
_EXIT_SETUP_FAILED = 120
_SANDBOX_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/tmp",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits. Small defaults: a reward call is a few asserts, not a workload."""

    wall_seconds: float = 10.0
    cpu_seconds: int = 10
    memory_mb: int = 1024
    max_processes: int = 32  # threads count too (RLIMIT_NPROC); namespace isolation only
    max_output_bytes: int = 1_000_000  # stdout + stderr read at most; beyond: killed
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 256
    tmpfs_mb: int = 64  # namespace isolation: everything the run may write, in total


@dataclass
class SandboxResult:
    """What one run did. ``status``: ok | error | timeout | output_limit | setup_failed."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    isolation: str
    tests_passed: list[bool] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _namespace_binds() -> list[str]:
    """Host paths the chroot needs, read-only: the system, the interpreter and the venv."""
    paths = ["/usr", "/etc/ld.so.cache", "/etc/localtime"]
    for prefix in {sys.base_prefix, sys.prefix, os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix)}:
        if not any(prefix == p or prefix.startswith(p.rstrip("/") + "/") for p in paths):
            paths.append(prefix)
    # Host directories that are real directories (not /usr symlinks) and hold libraries.
    for name in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.isdir(name) and not os.path.islink(name):
            paths.append(name)
    return paths


class _UidSlot:
    """Claim an unused uid for one run, across processes, with an abstract unix socket lock.

    The lock is a bound name in the abstract socket namespace: no file is created and the
    kernel releases it when the holder dies.
    """

    def __init__(self, uid_base: int, uid_count: int):
        self.uid_base, self.uid_count = uid_base, uid_count

    def acquire(self) -> tuple[int, socket.socket]:
        deadline = time.monotonic() + 60
        while True:
            for uid in range(self.uid_base, self.uid_base + self.uid_count):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind("\0posttrain-sandbox-uid-%d" % uid)
                    return uid, sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError("no free sandbox uid slot in %d..%d" % (self.uid_base, self.uid_base + self.uid_count))
            time.sleep(0.01)


def _pids_of_uid(uid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/status" % entry) as f:
                for line in f:
                    if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                        break  # already dead, waiting to be reaped by its parent
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            pids.append(int(entry))
                        break
        except (OSError, ValueError):
            continue
    return pids


def kill_uid(uid: int, rounds: int = 200) -> int:
    """SIGKILL every process whose real uid is ``uid`` until none is left; return how many."""
    killed = 0
    for _ in range(rounds):
        pids = _pids_of_uid(uid)
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    raise RuntimeError("processes of sandbox uid %d survive SIGKILL" % uid)


class Sandbox:
    """Run untrusted Python programs, one isolated process each, ``max_workers`` at a time.

    >>> box = Sandbox(SandboxLimits(wall_seconds=5))
    >>> box.run("print(sum(range(10)))").stdout
    '45\\n'
    >>> box.run("import sys; print(sys.stdin.read().upper())", stdin="hi").stdout
    'HI\\n'
    >>> box.run_tests("def f(x):\\n    return 2 * x", ["assert f(2) == 4", "assert f(3) == 7"]).tests_passed
    [True, False]
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolation: Isolation = "auto",
        max_workers: int | None = None,
        uid_base: int = 1_990_000,
    ):
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or max(1, min(8, os.cpu_count() or 1))
        self.uid_slots = _UidSlot(uid_base, 64)
        self.isolation = resolve_isolation(isolation)
        self._binds = _namespace_binds()

    # ----------------------------------------------------------------- public
    def run(self, program: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
        """Run ``program`` as a script with ``stdin``; status ``ok`` iff it exits 0 in limits."""
        return self._run(program, None, stdin, limits or self.limits)

    def run_tests(self, program: str, tests: Sequence[str], limits: SandboxLimits | None = None) -> SandboxResult:
        """Define ``program``, then run each test snippet against a copy of its globals.

        ``tests_passed[i]`` is True iff test ``i`` ran without raising; a test that never
        ran (timeout, crash, output limit) counts as failed.
        """
        return self._run(program, list(tests), "", limits or self.limits)

    def map(self, fn, items: Sequence) -> list:
        """Apply ``fn`` (which calls ``run``/``run_tests``) to items on the bounded pool."""
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(fn, items))

    # --------------------------------------------------------------- internal
    def _run(self, program: str, tests: list[str] | None, stdin: str, limits: SandboxLimits) -> SandboxResult:
        nonce = secrets.token_hex(16)
        payload = json.dumps(
            {"program": program, "tests": tests, "nonce": nonce, "audit": self.isolation == "process"}
        ).encode()
        cfg = {
            "isolation": self.isolation,
            "python": sys.executable,
            "env": _SANDBOX_ENV,
            "cpu_seconds": max(1, int(limits.cpu_seconds)),
            "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
            "max_file_bytes": int(limits.max_file_bytes),
            "max_open_files": int(limits.max_open_files),
            "max_processes": int(limits.max_processes),
            "tmpfs_kb": int(limits.tmpfs_mb) * 1024,
            "tmpfs_inodes": 4096,
            "ro_binds": self._binds,
        }
        uid, lock, workdir = None, None, None
        try:
            if self.isolation == "namespace":
                uid, lock = self.uid_slots.acquire()
                cfg["uid"] = uid
            else:
                workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
                cfg["workdir"] = workdir
            return self._spawn(cfg, payload, stdin.encode(), nonce, tests, limits, uid)
        finally:
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if lock is not None:
                lock.close()

    def _spawn(self, cfg, payload, stdin, nonce, tests, limits, uid) -> SandboxResult:
        report_r, report_w = os.pipe()
        os.set_inheritable(report_w, True)
        start = time.monotonic()
        cfg = dict(cfg, report_fd=report_w)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _BOOT_SOURCE, json.dumps(cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={},
                cwd="/",
                start_new_session=True,
                pass_fds=(report_w,),
            )
        finally:
            os.close(report_w)
        writer = threading.Thread(target=_feed, args=(proc.stdin, b"%010d" % len(payload) + payload + stdin), daemon=True)
        writer.start()
        out, err, report, status = self._collect(proc, report_r, start + limits.wall_seconds, limits.max_output_bytes)
        returncode = proc.poll()
        wall = time.monotonic() - start
        self._cleanup(proc, uid)
        writer.join(timeout=1)
        if returncode is None:
            returncode = proc.wait()
        if status is None:
            if returncode == 0:
                status = "ok"
            elif returncode == _EXIT_SETUP_FAILED and b"sandbox setup failed" in err:
                status = "setup_failed"
            elif returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
                status = "timeout"
            else:
                status = "error"
        passed = _parse_report(report, nonce, len(tests) if tests is not None else 0)
        return SandboxResult(
            status=status,
            returncode=returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            wall_seconds=wall,
            isolation=self.isolation,
            tests_passed=passed,
        )

    def _collect(self, proc, report_fd, deadline, max_output):
        bufs = {"out": bytearray(), "err": bytearray(), "report": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        report_file = os.fdopen(report_fd, "rb", buffering=0)
        sel.register(report_file, selectors.EVENT_READ, "report")
        status = None
        exited_at = None
        try:
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    status = "timeout"
                    break
                if exited_at is None and proc.poll() is not None:
                    exited_at = now
                if exited_at is not None and now - exited_at > 0.2:
                    break  # the main process is gone; descendants holding pipes get killed
                for key, _ in sel.select(timeout=min(0.05, max(0.0, deadline - now))):
                    chunk = os.read(key.fileobj.fileno(), 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    bufs[key.data] += chunk
                    if len(bufs["out"]) + len(bufs["err"]) > max_output:
                        status = "output_limit"
                        break
                    if len(bufs["report"]) > 1_000_000:
                        status = "output_limit"
                        break
                if status is not None:
                    break
        finally:
            sel.close()
            report_file.close()
        for name in ("out", "err"):
            del bufs[name][max_output:]
        return bytes(bufs["out"]), bytes(bufs["err"]), bytes(bufs["report"]), status

    def _cleanup(self, proc, uid):
        if uid is not None:
            # Killing the run's uid kills the PID namespace's init, so the kernel kills and
            # reaps the rest; the root boot process then exits by itself.
            kill_uid(uid)
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
        proc.wait()


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _parse_report(report: bytes, nonce: str, n_tests: int) -> list[bool]:
    verdict = [False] * n_tests
    seen = set()
    for line in report.decode("ascii", "replace").splitlines():
        parts = line.split()
        if len(parts) != 3 or parts[0] != nonce or not parts[1].isdigit():
            continue
        i = int(parts[1])
        if 0 <= i < n_tests and i not in seen:
            seen.add(i)
            verdict[i] = parts[2] == "pass"
    return verdict


_isolation_cache: dict[str, str] = {}
_isolation_lock = threading.Lock()


def resolve_isolation(isolation: Isolation) -> str:
    """``auto`` -> ``namespace`` if a probe run works here (root, Linux), else ``process``."""
    if isolation != "auto":
        if isolation not in ("namespace", "process"):
            raise ValueError("isolation must be auto, namespace or process, not %r" % isolation)
        return isolation
    with _isolation_lock:
        if "auto" not in _isolation_cache:
            chosen = "process"
            if sys.platform.startswith("linux") and os.geteuid() == 0:
                probe = Sandbox(SandboxLimits(wall_seconds=10), isolation="namespace", max_workers=1)
                if probe.run("print('ok')").stdout == "ok\n":
                    chosen = "namespace"
            _isolation_cache["auto"] = chosen
        return _isolation_cache["auto"]


def describe(result: SandboxResult) -> dict:
    return asdict(result)
