"""The seccomp filter every sandboxed process runs under, compiled once with libseccomp.

``seccomp(2)`` lets a process restrict the system calls it and its descendants may make;
libseccomp (``seccomp_init(3)``, ``seccomp_rule_add(3)``) compiles rules into the
classic-BPF program the kernel runs, and ``seccomp_export_bpf(3)`` writes that program
out. posttrain builds the filter in the caller through ``pyseccomp`` (a ctypes binding of
the system's ``libseccomp.so.2``), exports the BPF bytes once per process, and the
sandbox bootstrap installs them with ``prctl(PR_SET_NO_NEW_PRIVS)`` +
``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)`` just before it ``exec``s untrusted code, so
the sandboxed interpreter needs neither libseccomp nor any site-packages. See also the
kernel's ``Documentation/userspace-api/seccomp_filter.rst``.

Policy: allow by default, fail with ``EPERM`` what a test program has no business doing:

- other processes: ``ptrace``, ``process_vm_readv/writev``, ``kcmp``, ``pidfd_open``,
  ``pidfd_getfd``, ``pidfd_send_signal``;
- namespaces and mounts: ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag,
  ``mount``, ``umount2``, ``pivot_root``, ``chroot`` and the new mount API;
- the kernel keyrings (state that would outlive the run): ``keyctl``, ``add_key``,
  ``request_key``;
- network: ``socket``/``socketpair`` of any family but ``AF_UNIX``;
- kernel attack surface: ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring_*``
  (which would bypass this filter), module loading, ``kexec_*``, ``reboot``, ``swapon``,
  clocks, ``open_by_handle_at``, ``ioctl(TIOCSTI/TIOCLINUX)`` (typing into a terminal).

``clone3`` answers ``ENOSYS`` (its flags live in memory, out of BPF's reach), so the C
library falls back to ``clone``, whose flags are checked. Other architectures' system call
tables (for example 32-bit ``int 0x80`` calls) kill the process (libseccomp's default).

Cost: building the filter takes a few milliseconds once per caller process; installing it
is one ``prctl`` per sandboxed process (measured in ``runner.py``'s docstring).
"""

from __future__ import annotations

import errno
import os
import tempfile
import threading

DENIED_SYSCALLS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_open", "pidfd_getfd",
    "pidfd_send_signal",
    "unshare", "setns", "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot",
    "swapon", "swapoff", "syslog", "acct", "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "sethostname", "setdomainname", "iopl", "ioperm", "quotactl", "lookup_dcookie", "open_by_handle_at",
    "name_to_handle_at", "fanotify_init", "vhangup", "uselib", "nfsservctl",
)
CLONE_NEW_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x00000080)
# NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
AF_UNIX = 1

_lock = threading.Lock()
_cache: dict[str, tuple[bytes | None, str]] = {}


def filter_bpf() -> tuple[bytes | None, str]:
    """``(bpf_program_bytes, "")``, or ``(None, why)`` where seccomp cannot be used here."""
    with _lock:
        if "bpf" not in _cache:
            _cache["bpf"] = _build()
        return _cache["bpf"]


def _build() -> tuple[bytes | None, str]:
    if not os.path.exists("/proc/self/status") or "Seccomp:" not in open("/proc/self/status").read():
        return None, "the kernel has no seccomp support"
    try:
        import pyseccomp as sc
    except (ImportError, RuntimeError, OSError) as e:  # pyseccomp raises RuntimeError without libseccomp
        return None, f"pyseccomp/libseccomp is not usable ({e}); install libseccomp2 (apt) or libseccomp (dnf)"
    try:
        f = sc.SyscallFilter(sc.ALLOW)
        deny = sc.ERRNO(errno.EPERM)
        for name in DENIED_SYSCALLS:
            try:
                f.add_rule(deny, name)
            except (OSError, ValueError, RuntimeError):
                continue  # not a system call on this architecture
        for flag in CLONE_NEW_FLAGS:
            f.add_rule(deny, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
        f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socket", sc.Arg(0, sc.NE, AF_UNIX))
        f.add_rule(sc.ERRNO(errno.EAFNOSUPPORT), "socketpair", sc.Arg(0, sc.NE, AF_UNIX))
        for request in (TIOCSTI, TIOCLINUX):
            f.add_rule(deny, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            program = out.read()
    except Exception as e:  # a libseccomp too old for a rule, ...
        return None, f"libseccomp could not build the filter ({type(e).__name__}: {e})"
    if not program or len(program) % 8:
        return None, "libseccomp exported an empty or malformed BPF program"
    return program, ""
