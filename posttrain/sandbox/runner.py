"""Run model-written Python as hostile input: fresh, limited, isolated processes per run.

Used by the ``code`` reward (RL, HumanEval evaluation) and by the agent's ``python`` tool
(``Sandbox.run_cells``). ``Sandbox.run`` runs a program with a given stdin (stdin/stdout
tests); ``Sandbox.run_tests`` runs a program and a list of assert-style tests **in two
different processes**: the program (untrusted) only answers calls, the tests run in a
separate judge process under another uid, and only plain data crosses between them
(``judge.py`` describes the wire). So nothing the program does inside its interpreter
(replacing builtins, walking frames or ``gc``, patching ``math``/``random``, returning
objects whose ``__eq__`` lies) reaches the code that decides pass or fail, and the program
holds no channel to the caller's verdict.

Isolation layers and how strong each one is (be honest about what protects what):

=========================  ========================================  ============================
layer                      ``namespace`` (root on Linux; required    ``process`` (unsafe; an
                           for RL rewards and eval)                  explicit opt-in)
=========================  ========================================  ============================
who judges the tests       a separate judge process, another uid,    a separate judge process;
                           plain data only (see above)               another uid when root, else
                                                                     the same uid (non-dumpable)
program's interpreter      the base interpreter (not the venv's),    same
                           ``-I -S -B``, fresh per run
env vars of the parent     not passed (fixed minimal env)            same
files                      chroot into a root holding only the       everything the uid can read
                           base interpreter, its standard library    (the project, the venv and
                           (no ``site-packages``, no tests), the     its benchmark data, home);
                           shared libraries they load, the loader's  a PEP 578 audit hook refuses
                           cache, tz data and the C.UTF-8 locale     writes outside the temp dir
                           (``build_root_image``), read-only; no     (bypassable)
                           ``/usr`` tree, project, venv, home,
                           ``/proc``, nor any other Python
                           environment, at any depth
lockable files             the root through an overlay of the run's  the host's own files
                           own and fresh ``/dev`` nodes: a lock or
                           watch on any file is the run's alone
                           (invisible to other runs and the host)
uid                        two private uids per worker slot          private uids when root,
                           (program, judge), never the caller's      else the caller's own
system calls (seccomp)     denied: ptrace, mount, unshare/setns,     same filter (when the
                           keyctl, bpf, perf, io_uring, non-unix     caller may install it)
                           sockets, pidfd_*, kexec, ... (see
                           ``seccomp.py``)
network                    new network namespace (only a down        seccomp refuses non-unix
                           loopback) and seccomp                     sockets; audit hook
memory, processes          the whole run: a cgroup (v2, or v1        same cgroup when root; else
                           memory + pids) holds the program and      per process (RLIMIT_AS) and
                           all it forks: ``memory_mb`` and           per uid (RLIMIT_NPROC) only
                           ``max_processes`` bound them together;
                           plus RLIMIT_AS/CPU/FSIZE/NOFILE per
                           process; the judge: RLIMIT_AS of
                           ``memory_mb`` too (a reply too costly
                           to decode fails its test)
disk                       one size-limited tmpfs for the whole      RLIMIT_FSIZE per file only
                           run (``tmpfs_mb``); RLIMIT_FSIZE per file
wall clock, output size    the caller kills the run at               same
                           ``wall_seconds`` / ``max_output_bytes``
killing the caller         impossible: other uid, no capabilities    root: other uid; else only
                                                                     the audit hook (bypassable)
leftovers                  tmpfs and namespaces vanish; every        temp dir removed; processes
                           process of the run's uids and cgroup is   of the uids / cgroup /
                           SIGKILLed; keyrings denied by seccomp     process group killed; files
                                                                     written elsewhere stay
=========================  ========================================  ============================

``process`` isolation never runs code as root: as root it drops to the private uids, and
refuses (one-line ``ValueError``) when that uid cannot execute the interpreter (one under
``/root``, say); pass ``python=`` an interpreter outside a private home, or use
``namespace``.

The root image is built once per caller process (hard links to the host's files, copies
across file systems; ~1-2 s, in a private temp directory removed at exit) and each run sees
it through its own overlay. Where the kernel offers less, the sandbox says so once
(``RuntimeWarning``): without overlayfs the image is bound read-only as it is, so concurrent
runs see each other's locks on its files; without a
writable cgroup (``memory``/``pids`` v1 controllers or a v2 hierarchy with both enabled,
under this process's own cgroup) ``memory_mb`` bounds each process and ``max_processes``
each uid, not the run; without seccomp (no ``libseccomp.so.2``) the system calls above are
allowed (namespace isolation still hides files and network; keyring entries could then
outlive a run on the same uid).

``process`` isolation runs model-written code with the filesystem in view and behind an
audit hook (PEP 578: "not a security boundary"), so ``choose_isolation`` (the ``code``
reward, the agent's ``python`` tool) refuses it unless the config says
``unsafe_process_isolation: true``, and ``auto`` never falls back to it there.

References: PEP 578 (audit hooks); ``seccomp(2)``, ``seccomp_rule_add(3)``,
``seccomp_export_bpf(3)``; ``namespaces(7)``, ``pid_namespaces(7)``, ``chroot(2)``;
the kernel's ``Documentation/admin-guide/cgroup-v2.rst`` and
``Documentation/admin-guide/cgroup-v1/{memory,pids}.rst``.

Cost (``namespace``, a 2-core machine shared with other jobs, load 4-8, medians of 40
interleaved runs), against a baseline that runs the tests in the program's interpreter
without seccomp or cgroup: ``run`` 145 ms (baseline 140 ms); ``run_tests`` 154 ms
(baseline 128 ms; the judge is a fork of the bootstrap's interpreter, not a third
start-up). Seccomp costs nothing measurable per run (within noise; building the filter
takes ~35 ms once per caller process); the cgroup's system calls take ~2 ms per run
(create + limits 0.3 ms, attaching the program 1.3 ms, kill + remove 0.4 ms), within the
noise of the medians. The 164 HumanEval canonical solutions all pass: 165 ms per problem
with 1 worker (baseline 143 ms), 107 ms with the default workers, 2 here (baseline 88 ms),
same load, back to back. On the idle machine the baseline takes 83 ms (1 worker) and 58 ms (2).
"""

from __future__ import annotations

import atexit
import glob
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from posttrain.errors import ConfigError
from posttrain.sandbox import seccomp

Isolation = Literal["auto", "namespace", "process"]

_BOOT_SOURCE = Path(__file__).with_name("boot.py").read_text()
_STAGE2_SOURCE = Path(__file__).with_name("judge.py").read_text()
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
    """Per-run limits. Small defaults: a reward call is a few asserts, not a workload.

    ``memory_mb`` and ``max_processes`` bound the program and everything it forks together
    where a cgroup is available (see the module docstring), else each process / uid.
    """

    wall_seconds: float = 10.0
    cpu_seconds: int = 10  # per process (RLIMIT_CPU); the run as a whole: wall_seconds
    memory_mb: int = 1024
    max_processes: int = 32  # threads count too
    max_output_bytes: int = 1_000_000  # stdout + stderr read at most; beyond: killed
    max_file_bytes: int = 16 * 1024 * 1024
    max_open_files: int = 256
    tmpfs_mb: int = 64  # namespace isolation: everything the run may write, in total
    max_message_bytes: int = 16 * 1024 * 1024  # one call's arguments or return value


@dataclass
class SandboxResult:
    """What one run did. ``status``: ok | error | timeout | output_limit | setup_failed.

    For ``run_tests``, ``ok`` means the judge ran every test (each may have failed); for
    ``run_cells``, that every cell ran to its end (``cells_completed`` of them did).
    ``limit``: the limit that ended the run, as ``name=value`` (``wall_seconds=10``,
    ``cpu_seconds=10``, ``memory_mb=1024``, ``max_output_bytes=1000000``), else empty.
    """

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_seconds: float
    isolation: str
    tests_passed: list[bool] = field(default_factory=list)
    cells_completed: int = 0
    limit: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


_warned: set[str] = set()
_warn_lock = threading.Lock()


def _warn_once(key: str, message: str) -> None:
    with _warn_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def base_python() -> str:
    """The real interpreter binary behind this one (a venv's ``python`` is only a link)."""
    exe = getattr(sys, "_base_executable", None) or sys.executable
    real = os.path.realpath(exe)
    return real if os.path.exists(real) else os.path.realpath(sys.executable)


# ------------------------------------------------------------------ the run's root image
_STDLIB_PROBE = (
    "import json, sys, sysconfig\n"
    "print(json.dumps({'path': sys.path, 'names': sorted(getattr(sys, 'stdlib_module_names', ())),"
    " 'site': sorted({sysconfig.get_path('purelib'), sysconfig.get_path('platlib')}),"
    " 'tzpath': sysconfig.get_config_var('TZPATH') or ''}))\n"
)
_SYSTEM_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/usr/share/zoneinfo",
                 "/usr/lib/locale/C.utf8", "/usr/lib/locale/C.UTF-8")


def elf_interpreter(path: str) -> str | None:
    """The dynamic loader an ELF executable names (its ``PT_INTERP`` header), or None.

    See the System V ABI's "Program Header" (``elf(5)``): 32- and 64-bit, either byte order.
    """
    import struct

    with open(path, "rb") as f:
        head = f.read(64)
        if len(head) < 52 or head[:4] != b"\x7fELF":
            return None
        wide, order = head[4] == 2, "<" if head[5] == 1 else ">"
        phoff = struct.unpack_from(order + ("Q" if wide else "I"), head, 32 if wide else 28)[0]
        phentsize, phnum = struct.unpack_from(order + "HH", head, 54 if wide else 42)
        for i in range(phnum):
            f.seek(phoff + i * phentsize)
            header = f.read(phentsize)
            if struct.unpack_from(order + "I", header, 0)[0] != 3:  # PT_INTERP
                continue
            if wide:
                offset, size = struct.unpack_from(order + "Q", header, 8)[0], struct.unpack_from(order + "Q", header, 32)[0]
            else:
                offset, size = struct.unpack_from(order + "I", header, 4)[0], struct.unpack_from(order + "I", header, 16)[0]
            f.seek(offset)
            return f.read(size).rstrip(b"\0").decode()
    return None


def _shared_libraries(loader: str, files: Sequence[str]) -> set[str]:
    """Every shared library ``files`` load, as the dynamic loader resolves them (``ld.so --list``,
    what ``ldd`` runs; ``ld.so(8)``), with an empty environment as in the sandbox."""
    import re

    found = set()
    for path in files:
        try:
            listing = subprocess.run([loader, "--list", path], capture_output=True, text=True, timeout=60, env={}).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found.update(re.findall(r"(/\S+) \(0x[0-9a-f]+\)", listing))
    return found


def _stdlib_files(python: str) -> tuple[list[str], list[str]]:
    """(paths of ``python``'s standard library, the directories holding its extension modules).

    Only what ``python -I -S`` imports from: each ``sys.path`` entry, keeping in a directory
    only the entries named after a standard-library module (``sys.stdlib_module_names``,
    their ``__pycache__`` files, ``_sysconfigdata*``), never its ``site-packages``, its tests
    or anything else installed there; plus the tz database ``zoneinfo`` reads.
    """
    probe = subprocess.run([python, "-I", "-S", "-B", "-c", _STDLIB_PROBE], capture_output=True, text=True,
                           timeout=60, env={})
    if probe.returncode != 0:
        raise ValueError(f"python: {python} could not report its standard library ({probe.stderr.strip()[-200:]})")
    info = json.loads(probe.stdout)
    names = set(info["names"])
    site = {os.path.realpath(p) for p in info["site"] if p}
    excluded = {"site-packages", "dist-packages", "test", "tests"}

    def wanted(entry: str) -> bool:
        stem = entry.split(".")[0]
        if stem.startswith("_sysconfigdata"):
            return True
        return stem in names if names else stem not in excluded

    paths, dynload = [], []
    for entry in info["path"]:
        if os.path.isfile(entry):
            paths.append(entry)
            continue
        if not os.path.isdir(entry) or os.path.realpath(entry) in site:
            continue
        for name in sorted(os.listdir(entry)):
            full = os.path.join(entry, name)
            if os.path.realpath(full) in site:
                continue
            if name == "__pycache__":
                paths.extend(os.path.join(full, f) for f in sorted(os.listdir(full)) if wanted(f))
            elif wanted(name):
                paths.append(full)
                if name.endswith(".so"):
                    dynload.append(full)
    for tzdir in info["tzpath"].split(os.pathsep):
        if tzdir and os.path.isdir(tzdir):
            paths.append(tzdir)
    return paths, dynload


def _place(src: str, dst: str) -> None:
    """``dst`` as a hard link to ``src`` (no copy), or a copy across file systems."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _mirror(host_path: str, image: str) -> None:
    """Reproduce ``host_path`` under ``image`` as the host resolves it: every symlink on the way
    as the same symlink, directories created, the file (or whole directory) it names placed."""
    todo = [p for p in Path(host_path).parts[1:]]
    current, hops = "/", 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = os.path.dirname(current)
            continue
        host = os.path.join(current, name)
        dest = image + host
        if os.path.islink(host):
            hops += 1
            if hops > 40:
                raise OSError(f"too many symlinks resolving {host_path}")
            target = os.readlink(host)
            if not os.path.lexists(dest):
                os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
                os.symlink(target, dest)
            if os.path.isabs(target):
                current = "/"
            todo = list(Path(target).parts[1:] if os.path.isabs(target) else Path(target).parts) + todo
            continue
        if not os.path.exists(host):
            return
        if todo or os.path.isdir(host):
            if not os.path.isdir(dest):
                os.makedirs(dest, 0o755, exist_ok=True)
                os.chmod(dest, 0o755)
            if not todo:
                _mirror_tree(host, dest)
            current = host
        elif not os.path.lexists(dest):
            os.makedirs(os.path.dirname(dest), 0o755, exist_ok=True)
            _place(host, dest)


def _mirror_tree(src: str, dst: str) -> None:
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.lexists(d):
            continue
        if os.path.islink(s):
            os.symlink(os.readlink(s), d)
        elif os.path.isdir(s):
            os.mkdir(d, 0o755)
            os.chmod(d, 0o755)
            _mirror_tree(s, d)
        elif os.path.isfile(s):
            _place(s, d)


def build_root_image(pythons: Sequence[str], image: str) -> None:
    """Fill the empty directory ``image`` with what the sandbox's root holds, at the same paths
    as on the host: each interpreter in ``pythons``, its standard library (``_stdlib_files``),
    every shared library these load, the loader's cache, the time zone and the C.UTF-8 locale,
    and empty ``/tmp`` and ``/dev`` (mount points). Nothing else: no ``/usr`` tree, no
    ``site-packages``, no other Python environment, wherever it is installed."""
    wanted: set[str] = set(p for p in _SYSTEM_FILES if os.path.exists(p))
    for python in pythons:
        wanted.add(python)
        paths, dynload = _stdlib_files(python)
        wanted.update(paths)
        loader = elf_interpreter(python)
        if loader is None:
            continue
        libraries = _shared_libraries(loader, [python, *dynload])
        wanted.add(loader)
        wanted.update(libraries)
        for library in list(libraries):  # glibc loads libgcc_s on demand (thread exit, cancellation)
            helper = os.path.join(os.path.dirname(library), "libgcc_s.so.1")
            if os.path.basename(library).startswith("libc.so") and os.path.exists(helper):
                wanted.add(helper)
    for path in sorted(wanted):
        _mirror(path, image)
    for mount_point in ("tmp", "dev"):
        os.makedirs(os.path.join(image, mount_point), 0o755, exist_ok=True)
        os.chmod(os.path.join(image, mount_point), 0o755)
    os.chmod(image, 0o755)


_images: dict[tuple[str, ...], str] = {}
_images_lock = threading.Lock()
_IMAGE_PREFIX = "posttrain-rootimage-"


def root_image(pythons: Sequence[str]) -> str:
    """The root image for these interpreters, built once per process in a private temp
    directory (removed at exit; one a dead process left is removed by the next build)."""
    key = tuple(sorted(set(pythons)))
    with _images_lock:
        if key not in _images:
            _remove_stale_images()
            top = tempfile.mkdtemp(prefix="%s%d-" % (_IMAGE_PREFIX, os.getpid()))
            try:
                image = os.path.join(top, "root")
                os.mkdir(image)
                os.mkdir(os.path.join(top, "empty"), 0o755)  # the overlay's second (empty) layer
                os.mkdir(os.path.join(top, "run"), 0o755)  # where each run mounts its own tmpfs
                build_root_image(key, image)
            except BaseException:
                shutil.rmtree(top, ignore_errors=True)
                raise
            if not _images:
                atexit.register(_remove_images)
            _images[key] = top
        return _images[key]


def _remove_images() -> None:
    for top in _images.values():
        shutil.rmtree(top, ignore_errors=True)


def _remove_stale_images() -> None:
    for top in glob.glob(os.path.join(tempfile.gettempdir(), _IMAGE_PREFIX + "*")):
        try:
            pid = int(os.path.basename(top)[len(_IMAGE_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not os.path.exists("/proc/%d" % pid):
            shutil.rmtree(top, ignore_errors=True)


def overlay_available() -> bool:
    """Whether the kernel offers overlayfs (``/proc/filesystems``), which gives each run its own
    inodes over the shared image (so locks and watches on them are the run's own)."""
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1:] == ["overlay"] for line in f)
    except OSError:
        return False


def _unreachable_by_others(path: str) -> str | None:
    """The first directory on ``path`` (or the file) a private uid may not traverse/execute."""
    parts = Path(path).parts
    for i in range(1, len(parts) + 1):
        p = os.path.join(*parts[:i])
        try:
            mode = os.stat(p).st_mode
        except OSError:
            return p
        if not mode & 0o001:
            return p
    return None


class _UidSlot:
    """Claim a pair of unused uids (program, judge) for one run, across processes.

    The lock is a bound name in the abstract socket namespace: no file is created and the
    kernel releases it when the holder dies.
    """

    def __init__(self, uid_base: int, slot_count: int):
        self.uid_base, self.slot_count = uid_base, slot_count

    def acquire(self) -> tuple[int, int, socket.socket]:
        deadline = time.monotonic() + 60
        while True:
            for slot in range(self.slot_count):
                uid = self.uid_base + 2 * slot
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.bind("\0posttrain-sandbox-uid-%d" % uid)
                    return uid, uid + 1, sock
                except OSError:
                    sock.close()
            if time.monotonic() > deadline:
                raise RuntimeError("no free sandbox uid slot in %d..%d" % (self.uid_base, self.uid_base + 2 * self.slot_count))
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


# ------------------------------------------------------------------------ cgroups
class _CgroupSupport:
    """Where this process may create run cgroups: v2 (memory + pids) or v1 memory and pids.

    New groups go under this process's own cgroup (so the limits of whoever runs posttrain
    still apply above them), named ``posttrain-sandbox-<pid>-<n>``.
    """

    def __init__(self):
        self.version: int | None = None
        self.bases: dict[str, str] = {}
        self.why = ""
        try:
            self._probe()
        except OSError as e:
            self.version, self.bases, self.why = None, {}, str(e)

    def _probe(self) -> None:
        mounts_v1, mount_v2 = {}, None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fstype, _, options = right.split()[:3]
                mountpoint = left.split()[4]
                if fstype == "cgroup2":
                    mount_v2 = mount_v2 or mountpoint
                elif fstype == "cgroup":
                    for ctl in options.split(","):
                        if ctl in ("memory", "pids"):
                            mounts_v1[ctl] = mountpoint
        own_v1, own_v2 = {}, None
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctls, path = line.rstrip("\n").split(":", 2)
                if ctls == "":
                    own_v2 = path
                for ctl in ctls.split(","):
                    own_v1[ctl] = path
        if mount_v2 is not None and own_v2 is not None:
            base = mount_v2 + own_v2.rstrip("/")
            if self._v2_ready(base):
                self.version, self.bases = 2, {"unified": base}
                return
        if "memory" in mounts_v1 and "pids" in mounts_v1 and "memory" in own_v1 and "pids" in own_v1:
            bases = {c: mounts_v1[c] + own_v1[c].rstrip("/") for c in ("memory", "pids")}
            if all(os.access(b, os.W_OK) for b in bases.values()):
                self.version, self.bases = 1, bases
                return
            self.why = "no write access to %s" % " / ".join(bases.values())
            return
        self.why = self.why or "no cgroup v2 with memory+pids enabled and no v1 memory+pids hierarchies"

    def _v2_ready(self, base: str) -> bool:
        try:
            with open(os.path.join(base, "cgroup.subtree_control")) as f:
                enabled = set(f.read().split())
            if not {"memory", "pids"} <= enabled:
                with open(os.path.join(base, "cgroup.subtree_control"), "w") as f:
                    f.write("+memory +pids")  # EBUSY when this cgroup holds processes (not the root)
            return os.access(base, os.W_OK)
        except OSError as e:
            self.why = "cgroup v2 at %s: cannot enable memory+pids for children (%s)" % (base, e.strerror)
            return False


_cgroup_support: _CgroupSupport | None = None
_cgroup_lock = threading.Lock()
_cgroup_seq = [0]


def cgroup_support() -> _CgroupSupport:
    global _cgroup_support
    with _cgroup_lock:
        if _cgroup_support is None:
            _cgroup_support = _CgroupSupport()
            _remove_stale_groups(_cgroup_support)
        return _cgroup_support


def _remove_stale_groups(support: _CgroupSupport) -> None:
    """Empty groups left by a caller that died (their name carries its pid)."""
    for base in support.bases.values():
        for path in glob.glob(os.path.join(base, "posttrain-sandbox-*-*")):
            try:
                pid = int(os.path.basename(path).split("-")[2])
                if pid != os.getpid() and not os.path.exists("/proc/%d" % pid):
                    os.rmdir(path)
            except (ValueError, OSError):
                pass


class _RunCgroup:
    """One run's cgroup(s): created with its limits, emptied and removed afterwards."""

    def __init__(self, support: _CgroupSupport, limits: SandboxLimits):
        with _cgroup_lock:
            _cgroup_seq[0] += 1
            name = "posttrain-sandbox-%d-%d" % (os.getpid(), _cgroup_seq[0])
        self.version = support.version
        self.dirs = {ctl: os.path.join(base, name) for ctl, base in support.bases.items()}
        memory = str(int(limits.memory_mb) * 1024 * 1024)
        try:
            for d in self.dirs.values():
                os.mkdir(d, 0o755)
            if self.version == 2:
                d = self.dirs["unified"]
                self._write(d, "memory.max", memory)
                self._write(d, "memory.swap.max", "0", optional=True)
                self._write(d, "pids.max", str(limits.max_processes))
            else:
                self._write(self.dirs["memory"], "memory.limit_in_bytes", memory)
                self._write(self.dirs["memory"], "memory.memsw.limit_in_bytes", memory, optional=True)
                self._write(self.dirs["pids"], "pids.max", str(limits.max_processes))
        except OSError:
            self.remove()
            raise

    @staticmethod
    def _write(d: str, name: str, value: str, optional: bool = False) -> None:
        try:
            with open(os.path.join(d, name), "w") as f:
                f.write(value)
        except FileNotFoundError:
            if not optional:
                raise

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs.values()]

    def oom_kills(self) -> int:
        d = self.dirs.get("unified") or self.dirs.get("memory")
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(d, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def kill(self) -> None:
        """SIGKILL everything in the group until it is empty (processes cannot leave it)."""
        if self.version == 2:
            try:
                self._write(self.dirs["unified"], "cgroup.kill", "1")
            except OSError:
                pass
        for _ in range(400):
            pids = set()
            for procs in self.procs_files:
                try:
                    with open(procs) as f:
                        pids.update(int(p) for p in f.read().split())
                except OSError:
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.005)

    def remove(self) -> None:
        for d in self.dirs.values():
            for _ in range(200):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # EBUSY while the last killed tasks are being released
                    time.sleep(0.005)


# ------------------------------------------------------------------------ sandbox
class Sandbox:
    """Run untrusted Python programs, one isolated run each, ``max_workers`` at a time.

    ``python``: the interpreter that runs the code (default: the base interpreter behind
    this one; never a virtualenv's, whose packages the code must not see).

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
        python: str | None = None,
    ):
        self.limits = limits or SandboxLimits()
        self.max_workers = max_workers or max(1, min(8, os.cpu_count() or 1))
        self.uid_slots = _UidSlot(uid_base, 64)
        self.isolation = resolve_isolation(isolation)
        if isolation == "auto" and self.isolation == "process":
            _warn_once("auto-process", "posttrain sandbox: namespace isolation is not available here (it needs root "
                       "on Linux), so isolation=auto runs code in 'process' mode, which is NOT a security boundary")
        self.python = os.path.realpath(python) if python else base_python()
        if not os.access(self.python, os.X_OK):
            raise ValueError(f"python: {self.python} is not an executable interpreter")
        self._image = root_image([self.python, base_python()]) if self.isolation == "namespace" else None
        self._overlay = overlay_available()
        if self.isolation == "namespace" and not self._overlay:
            _warn_once("overlay", "posttrain sandbox: no overlayfs in this kernel, so runs see the root image's "
                       "files through a plain read-only bind: concurrent runs can lock (flock/fcntl) the same files")
        self._root = os.geteuid() == 0 if hasattr(os, "geteuid") else False
        if self.isolation == "process" and self._root:
            blocked = _unreachable_by_others(self.python)
            if blocked:
                raise ValueError(
                    f"isolation='process' never runs code as root, and a private uid cannot run {self.python} "
                    f"({blocked} is not world-searchable); use isolation='namespace'")
        bpf, why = seccomp.filter_bpf() if sys.platform.startswith("linux") else (None, "not Linux")
        self._seccomp = bpf.hex() if bpf else None
        if bpf is None:
            _warn_once("seccomp", f"posttrain sandbox: no seccomp filter ({why}); sandboxed code may call ptrace, "
                       "mount, unshare, keyctl, bpf and open network sockets, limited only by the isolation mode")
        self._cgroups = cgroup_support() if self._root and sys.platform.startswith("linux") else None
        if self._cgroups is None or self._cgroups.version is None:
            why = self._cgroups.why if self._cgroups is not None else "creating cgroups needs root"
            _warn_once("cgroup", f"posttrain sandbox: no run-wide cgroup ({why}); memory_mb bounds each process "
                       "(RLIMIT_AS) and max_processes each uid (RLIMIT_NPROC), not the run as a whole")

    # ----------------------------------------------------------------- public
    def run(self, program: str, stdin: str = "", limits: SandboxLimits | None = None) -> SandboxResult:
        """Run ``program`` as a script with ``stdin``; status ``ok`` iff it exits 0 in limits."""
        return self._run(program, None, stdin, limits or self.limits)

    def run_tests(self, program: str, tests: Sequence[str], limits: SandboxLimits | None = None, *,
                  trusted_prefix: str = "", entry_point: str | None = None) -> SandboxResult:
        """Run ``program``; run each test snippet in the judge, calling the program's functions.

        ``tests_passed[i]`` is True iff test ``i`` ran without raising; a test that never
        ran (timeout, crash, output limit) counts as failed. ``trusted_prefix`` (the row's
        own code, such as a HumanEval prompt) runs in the judge and its names are the
        judge's own, except ``entry_point``, which is always the program's. Without an
        ``entry_point``, every name a test uses that is neither a builtin nor defined by the
        prefix or the test is looked up in the program.
        """
        judge = {"tests": list(tests), "prefix": trusted_prefix, "entry_point": entry_point}
        return self._run(program, judge, "", limits or self.limits)

    def run_cells(self, cells: Sequence[str], limits: SandboxLimits | None = None) -> SandboxResult:
        """Run ``cells`` one after another in one interpreter and one namespace (a notebook
        session rebuilt from its cells); only the last cell's stdout is kept.

        A cell counts as run only when the harness (``judge.run_cells``) reports it on
        a pipe of its own after the cell returned: a line carrying a random token drawn here
        for this run, which no cell is handed. A cell that ends the interpreter in any way
        (``os._exit``, ``sys.exit``, a signal, an ``atexit`` exit, an exit only when it is
        replayed) never gets that line, nor does any cell after it; status ``ok`` needs every
        cell's line and a clean exit. The harness is in the cells' own process, so a cell
        that goes looking for the token in the harness's frames could still forge its line;
        no cell gets it by printing, exiting, or patching builtins and modules.
        """
        nonce = os.urandom(16).hex()
        return self._run("", None, "", limits or self.limits, cells=(list(cells), nonce))

    def map(self, fn, items: Sequence) -> list:
        """Apply ``fn`` (which calls ``run``/``run_tests``) to items on the bounded pool."""
        if len(items) <= 1 or self.max_workers == 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(fn, items))

    # --------------------------------------------------------------- internal
    def _run(self, program: str, judge: dict | None, stdin: str, limits: SandboxLimits,
             cells: tuple[list[str], str] | None = None) -> SandboxResult:
        namespace = self.isolation == "namespace"
        cfg = {
            "isolation": self.isolation,
            "role": "cells" if cells is not None else "server" if judge is not None else "script",
            "python": self.python,
            "stage2": _STAGE2_SOURCE,
            "env": _SANDBOX_ENV,
            "cpu_seconds": max(1, int(limits.cpu_seconds)),
            "memory_bytes": int(limits.memory_mb) * 1024 * 1024,
            "max_file_bytes": int(limits.max_file_bytes),
            "max_open_files": int(limits.max_open_files),
            "max_processes": int(limits.max_processes),
            "tmpfs_kb": int(limits.tmpfs_mb) * 1024,
            "tmpfs_inodes": 4096,
            "image": self._image,
            "overlay": self._overlay,
            "seccomp": self._seccomp,
            "uid": None,
            "judge_uid": None,
            "cgroup_procs": [],
        }
        program_payload = {"program": program, "audit": not namespace,
                           "max_message_bytes": int(limits.max_message_bytes)}
        if cells is not None:
            program_payload.update(cells=cells[0], nonce=cells[1])
        if judge is not None:
            judge = dict(judge, max_message_bytes=int(limits.max_message_bytes), undumpable=not self._root)
        lock, workdir, group = None, None, None
        try:
            if self._root:
                cfg["uid"], cfg["judge_uid"], lock = self.uid_slots.acquire()
            if not namespace:
                workdir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
                if self._root:
                    os.chown(workdir, cfg["uid"], cfg["uid"])
                cfg["workdir"] = workdir
            if self._cgroups is not None and self._cgroups.version is not None:
                group = _RunCgroup(self._cgroups, limits)
                cfg["cgroup_procs"] = group.procs_files
            payload = json.dumps({"program": program_payload, "judge": judge}).encode()
            return self._spawn(cfg, payload, stdin.encode(), None if judge is None else len(judge["tests"]), limits, group,
                               cells)
        finally:
            if group is not None:
                group.kill()
                group.remove()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
            if lock is not None:
                lock.close()

    def _spawn(self, cfg, payload, stdin, n_tests, limits, group, cells=None) -> SandboxResult:
        tests = n_tests is not None or cells is not None  # a report pipe: the judge's, or the cells harness's
        report_r, report_w = os.pipe() if tests else (None, None)
        if tests:
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
                pass_fds=(report_w,) if tests else (),
            )
        finally:
            if tests:
                os.close(report_w)
        writer = threading.Thread(target=_feed, args=(proc.stdin, b"%010d" % len(payload) + payload + stdin), daemon=True)
        writer.start()
        out, err, report, status = self._collect(proc, report_r, start + limits.wall_seconds, limits.max_output_bytes)
        returncode = proc.poll()
        wall = time.monotonic() - start
        self._cleanup(proc, cfg, group)
        writer.join(timeout=1)
        if returncode is None:
            returncode = proc.wait()
        passed, done = _parse_report(report, n_tests) if n_tests is not None else ([], False)
        completed = _cells_completed(report, cells[1]) if cells is not None else 0
        finished = (done if n_tests is not None else completed == len(cells[0]) if cells is not None else True)
        oom = group is not None and group.oom_kills()
        limit = {"timeout": "wall_seconds=%g" % limits.wall_seconds,
                 "output_limit": "max_output_bytes=%d" % limits.max_output_bytes}.get(status or "", "")
        if status is None:
            if returncode == _EXIT_SETUP_FAILED and b"sandbox setup failed" in err:
                status = "setup_failed"
            elif finished and returncode == 0:
                status = "ok"
            elif returncode in (-signal.SIGXCPU, -signal.SIGKILL, 128 + signal.SIGXCPU, 128 + signal.SIGKILL):
                status = "timeout"
                limit = "memory_mb=%d" % limits.memory_mb if oom else "cpu_seconds=%d" % max(1, int(limits.cpu_seconds))
            else:
                status = "error"
        if oom:
            err += b"\nsandbox: the run reached memory_mb=%d and the kernel killed a process\n" % limits.memory_mb
        return SandboxResult(
            status=status,
            returncode=returncode,
            stdout=out.decode("utf-8", "replace"),
            stderr=err.decode("utf-8", "replace"),
            wall_seconds=wall,
            isolation=self.isolation,
            tests_passed=passed,
            cells_completed=completed,
            limit=limit,
        )

    def _collect(self, proc, report_fd, deadline, max_output):
        bufs = {"out": bytearray(), "err": bytearray(), "report": bytearray()}
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        report_file = os.fdopen(report_fd, "rb", buffering=0) if report_fd is not None else None
        if report_file is not None:
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
                    if len(bufs["out"]) + len(bufs["err"]) > max_output or len(bufs["report"]) > 1_000_000:
                        status = "output_limit"
                        break
                if status is not None:
                    break
        finally:
            sel.close()
            if report_file is not None:
                report_file.close()
        for name in ("out", "err"):
            del bufs[name][max_output:]
        return bytes(bufs["out"]), bytes(bufs["err"]), bytes(bufs["report"]), status

    def _cleanup(self, proc, cfg, group):
        if group is not None:
            group.kill()
        uids = [uid for uid in (cfg["uid"], cfg["judge_uid"]) if uid is not None]
        for uid in uids:
            # Killing the run's uids kills the PID namespace's processes; the root boot
            # process then exits by itself.
            kill_uid(uid)
        if cfg["uid"] is not None:
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
        for uid in uids:
            # again: a child forked by a root process takes the uid only when it drops root,
            # possibly after the first pass looked; none is left when run() returns
            kill_uid(uid)


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
        stream.close()
    except (BrokenPipeError, OSError, ValueError):
        pass


def _parse_report(report: bytes, n_tests: int) -> tuple[list[bool], bool]:
    """The judge's ``<index> pass|fail`` lines (first verdict per index wins) and ``done``."""
    verdict = [False] * n_tests
    seen = set()
    done = False
    for line in report.decode("ascii", "replace").splitlines():
        parts = line.split()
        if parts == ["done"]:
            done = True
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            continue
        i = int(parts[0])
        if 0 <= i < n_tests and i not in seen:
            seen.add(i)
            verdict[i] = parts[1] == "pass"
    return verdict, done


def _cells_completed(report: bytes, nonce: str) -> int:
    """How many cells, from the first on, the harness reported run to their end: ``<index>
    <nonce>`` lines in order; a line without this run's token, or out of order, ends the count."""
    count = 0
    for line in report.decode("ascii", "replace").splitlines():
        if line.split() != [str(count), nonce]:
            break
        count += 1
    return count


_isolation_cache: dict[str, str] = {}
_isolation_lock = threading.Lock()


def namespace_available() -> bool:
    """Whether a probe run in ``namespace`` isolation works here (root, Linux); cached."""
    with _isolation_lock:
        if "namespace" not in _isolation_cache:
            ok = False
            if sys.platform.startswith("linux") and os.geteuid() == 0:
                probe = Sandbox(SandboxLimits(wall_seconds=10), isolation="namespace", max_workers=1)
                ok = probe.run("print('ok')").stdout == "ok\n"
            _isolation_cache["namespace"] = "yes" if ok else "no"
        return _isolation_cache["namespace"] == "yes"


def resolve_isolation(isolation: Isolation) -> str:
    """``auto`` -> ``namespace`` if a probe run works here (root, Linux), else ``process``."""
    if isolation != "auto":
        if isolation not in ("namespace", "process"):
            raise ValueError("isolation must be auto, namespace or process, not %r" % isolation)
        return isolation
    return "namespace" if namespace_available() else "process"


PROCESS_REFUSED = (
    "'process' isolation runs model-written code as a plain process that can read the whole filesystem "
    "(the venv's benchmark answers included), behind an audit hook that is not a security boundary; "
    "use 'namespace' (root on Linux) or set unsafe_process_isolation: true to accept the risk"
)


def choose_isolation(isolation: str, unsafe_process_isolation: bool = False) -> str:
    """The isolation model-written code may run under (the ``code`` reward, the agent's
    ``python`` tool): ``namespace``, or ``process`` only when opted in.

    ``auto`` means ``namespace`` where it works; it never falls back to ``process`` silently.
    """
    if isolation not in ("auto", "namespace", "process"):
        raise ConfigError(f"isolation: must be auto, namespace or process, not {isolation!r}")
    if isolation == "auto":
        if namespace_available():
            return "namespace"
        if not unsafe_process_isolation:
            raise ConfigError(
                "isolation: auto found no namespace isolation here (it needs root on Linux) and does not fall "
                "back to 'process' for rewards: " + PROCESS_REFUSED)
        warnings.warn("code reward: namespace isolation is unavailable; running model-written code in 'process' "
                      "isolation because unsafe_process_isolation is set", RuntimeWarning, stacklevel=3)
        return "process"
    if isolation == "process" and not unsafe_process_isolation:
        raise ConfigError("isolation: " + PROCESS_REFUSED)
    return isolation
