"""Bootstrap of one sandboxed run. A standalone script: it imports nothing from posttrain.

``posttrain.sandbox.runner`` starts ``python -I -S -B -c <this file's text> <config json>``
with an empty environment, a new session, stdin/stdout/stderr pipes and, for test runs, a
report pipe whose number is in the config. Stdin starts with a 10-digit length and that
many bytes of JSON payload (``{"program": ..., "judge": ... or null}``); whatever follows
is the program's own stdin.

Trusted steps (as the caller's uid; root in ``namespace`` isolation):

1. open the run's cgroup ``cgroup.procs`` files (before the filesystem disappears);
2. ``namespace``: unshare mount/network/IPC/UTS/PID namespaces; build a new root on a
   size-limited tmpfs: the caller's root image (``runner.build_root_image``: the base
   interpreter, its standard library and the shared libraries they load, nothing else)
   through a read-only overlay of this run's own (its files' inodes, so their locks and
   watches, belong to this run alone), a writable ``/tmp`` and fresh ``/dev`` nodes;
   ``chroot`` into it. ``process``: ``chdir`` into the caller's temp dir;
3. write each side's payload to a file that is opened and unlinked at once, so only the
   holder of the descriptor can read it;
4. fork the supervisor (in ``namespace`` isolation the PID namespace's init: when it exits
   the kernel kills every other process of the run), which forks
   - the program: joins the run's cgroup, sets resource limits, drops to the run's uid with
     no groups (all capabilities lost), keeps only fds 0-2, its payload (3) and its end of
     the call pipes (4 requests in, 5 replies out) or, for cells, the report pipe (4),
     installs the seccomp filter, ``exec``s the base interpreter with ``judge.py``
     (role ``script``, ``server`` or ``cells``);
   - for test runs, the judge: the same steps under a second uid, without the cgroup (the
     program cannot starve it of memory), with fds 3 (its payload: tests, trusted
     prefix), 4 (replies in), 5 (requests out) and 6 (the report pipe to the caller); it
     runs ``judge.run_judge`` in this forked (trusted) interpreter rather than
     paying for a new one (``process`` isolation: in a fresh program interpreter, since
     a private uid may not reach this one's standard library);
   and waits for the judge (test runs) or the program (script runs), then exits with its
   status.
"""
import json
import os
import resource
import stat
import sys

EXIT_SETUP_FAILED = 120

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
PR_SET_PDEATHSIG, PR_SET_SECCOMP, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 22, 38, 36
SECCOMP_MODE_FILTER = 2
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
MAX_FD = 65536


class Libc:
    """The few libc calls the standard library does not wrap (Linux); None elsewhere."""

    def __init__(self):
        import ctypes

        self.ctypes = ctypes
        self.libc = ctypes.CDLL(None, use_errno=True)

    def _check(self, result, what):
        if result != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))

    def prctl(self, option, arg2=0, what="prctl"):
        c = self.ctypes
        self._check(self.libc.prctl(c.c_int(option), c.c_ulong(arg2), c.c_ulong(0), c.c_ulong(0), c.c_ulong(0)), what)

    def unshare(self, flags):
        self._check(self.libc.unshare(self.ctypes.c_int(flags)), "unshare")

    def mount(self, source, target, fstype, flags, data=None):
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        self._check(self.libc.mount(enc(source), enc(target), enc(fstype), self.ctypes.c_ulong(flags), enc(data)),
                    "mount %s" % target)

    def install_seccomp(self, bpf):
        """``prctl(PR_SET_NO_NEW_PRIVS)`` then ``prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER)``."""
        c = self.ctypes

        class SockFprog(c.Structure):
            _fields_ = [("len", c.c_ushort), ("filter", c.c_void_p)]

        buf = c.create_string_buffer(bpf, len(bpf))
        prog = SockFprog(len(bpf) // 8, c.cast(buf, c.c_void_p))
        self.prctl(PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")
        self._check(self.libc.prctl(c.c_int(PR_SET_SECCOMP), c.c_ulong(SECCOMP_MODE_FILTER), c.byref(prog),
                                    c.c_ulong(0), c.c_ulong(0)), "prctl(PR_SET_SECCOMP)")


def _read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("payload truncated")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


DEVICES = (("null", 1, 3), ("zero", 1, 5), ("random", 1, 8), ("urandom", 1, 9))


def _build_root(cfg, libc):
    """Mount a tmpfs on the image's ``run`` directory (in this mount namespace only) and build
    the new root in it.

    The root is the caller's image (only the interpreter, its standard library and the
    libraries they load) seen through an overlay of this run's own, so every file has an
    inode of this run alone: a lock (``flock``/``fcntl``) or a watch on it is invisible to
    other runs and to the host. /tmp is a directory of the size-limited tmpfs; /dev is a
    tmpfs of fresh device nodes (no host device inode is shared either).
    """
    run = cfg["image"] + "/run"
    libc.mount("tmpfs", run, "tmpfs", MS_NOSUID | MS_NODEV,
               "size=%dk,nr_inodes=%d,mode=755" % (cfg["tmpfs_kb"], cfg["tmpfs_inodes"]))
    root, scratch = run + "/root", run + "/scratch"
    os.mkdir(root, 0o755)
    os.mkdir(scratch)
    os.chmod(scratch, 0o1777)
    image, empty = cfg["image"] + "/root", cfg["image"] + "/empty"
    readonly = MS_RDONLY | MS_NOSUID | MS_NODEV
    if cfg["overlay"]:
        libc.mount("overlay", root, "overlay", readonly, "lowerdir=%s:%s" % (empty, image))
    else:
        libc.mount(image, root, None, MS_BIND | MS_REC)
        libc.mount(None, root, None, MS_BIND | MS_REMOUNT | readonly)
    libc.mount(scratch, root + "/tmp", None, MS_BIND)
    libc.mount("tmpfs", root + "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=4k,nr_inodes=16,mode=755")
    for name, major, minor in DEVICES:
        path = root + "/dev/" + name
        try:
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
            os.chmod(path, 0o666)
        except PermissionError:  # a device cgroup that refuses mknod: the host's node instead
            open(path, "w").close()
            libc.mount("/dev/" + name, path, None, MS_BIND)
    libc.mount(None, root + "/dev", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC)
    return root


def _set_limits(cfg, uid):
    def lim(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    lim(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
    lim(resource.RLIMIT_AS, cfg["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    lim(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    lim(resource.RLIMIT_CORE, 0)
    if uid is not None:  # a per-uid count: only meaningful for a private uid
        lim(resource.RLIMIT_NPROC, cfg["max_processes"])


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise OSError("failed to drop privileges")


def _place_fds(mapping):
    """Make ``target`` a copy of ``source`` for each pair, then close every other fd above 2."""
    import fcntl

    high = {target: fcntl.fcntl(source, fcntl.F_DUPFD, 100) for target, source in mapping.items()}
    for target, fd in high.items():
        os.dup2(fd, target)
    os.closerange(max(mapping, default=2) + 1, MAX_FD)


def _payload_fd(data):
    path = ".payload-%d-%d" % (os.getpid(), id(data))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, json.dumps(data).encode())
    os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    os.unlink(path)
    return fd


def _enter_sandbox(cfg, libc, uid, memory_bytes):
    """Limits, then the private uid (no groups, no capabilities), then the seccomp filter."""
    _set_limits(dict(cfg, memory_bytes=memory_bytes), uid)
    if uid is not None:
        _drop_privileges(uid)
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, 9)  # after the uid change, which clears it
        if cfg["seccomp"]:
            libc.install_seccomp(bytes.fromhex(cfg["seccomp"]))


def _exec_sandboxed(cfg, libc, role, uid, memory_bytes):
    _enter_sandbox(cfg, libc, uid, memory_bytes)
    python = cfg["python"]
    os.execve(python, [python, "-I", "-S", "-B", "-c", cfg["stage2"], role], cfg["env"])


def _supervise(cfg, libc, program_fd, judge_fd, cgroup_fds):
    """Fork the program (and the judge), wait for the one that decides, exit with its status."""
    tests = judge_fd is not None
    if tests:
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
    program = os.fork()
    if program == 0:
        try:
            for fd in cgroup_fds:
                os.write(fd, b"0")  # "0": the writing process itself (and all it will fork)
            fds = {3: program_fd, 4: req_r, 5: rep_w} if tests else {3: program_fd}
            if cfg["role"] == "cells":  # the harness's own pipe: which cells ran to their end
                fds[4] = cfg["report_fd"]
            _place_fds(fds)
            _exec_sandboxed(cfg, libc, cfg["role"], cfg["uid"], cfg["memory_bytes"])
        except BaseException as e:
            os.write(2, ("sandbox setup failed: %s\n" % e).encode())
        os._exit(EXIT_SETUP_FAILED)
    main = program
    if tests:
        judge = os.fork()
        if judge == 0:
            try:
                null = os.open("/dev/null", os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(2, 1)
                _place_fds({3: judge_fd, 4: rep_r, 5: req_w, 6: cfg["report_fd"]})
                os.chdir("/")
                judge_memory = cfg["memory_bytes"]  # the program's own bound, per process
                if cfg["isolation"] != "namespace":
                    # this interpreter's standard library may be out of the judge uid's reach
                    # (a private home): run the judge in the program's interpreter instead
                    _exec_sandboxed(cfg, libc, "judge", cfg["judge_uid"], judge_memory)
                _enter_sandbox(cfg, libc, cfg["judge_uid"], judge_memory)
            except BaseException as e:
                os.write(2, ("sandbox setup failed: %s\n" % e).encode())
                os._exit(EXIT_SETUP_FAILED)
            # A fresh interpreter would cost a start-up: the judge runs in this forked one,
            # which is trusted code and shares no memory with the program's process.
            code = 1
            try:
                judge_ns = {"__name__": "judge"}
                exec(compile(cfg["stage2"], "judge.py", "exec"), judge_ns)
                judge_ns["run_judge"]()
                code = 0
            except BaseException as e:
                os.write(2, ("judge failed: %s: %s\n" % (type(e).__name__, e)).encode())
            finally:
                for stream in (sys.stdout, sys.stderr):
                    try:
                        stream.flush()
                    except Exception:
                        pass
            os._exit(code)
        main = judge
        for fd in (req_r, req_w, rep_r, rep_w, judge_fd):
            os.close(fd)
    os.close(program_fd)
    for fd in cgroup_fds:
        os.close(fd)
    if cfg.get("report_fd") is not None:
        os.close(cfg["report_fd"])
    os.close(0)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(EXIT_SETUP_FAILED)
        if pid == main:
            break
    if tests:
        try:
            os.kill(program, 9)  # the judge is done: the program has nothing left to answer
        except OSError:
            pass
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def boot():
    cfg = json.loads(sys.argv[1])
    payload = json.loads(_read_exact(0, int(_read_exact(0, 10))))
    namespace = cfg["isolation"] == "namespace"
    try:
        libc = Libc()
        libc.prctl(PR_SET_PDEATHSIG, 9)  # the caller dies -> this run dies (and with it, the namespace)
    except (OSError, AttributeError):  # not Linux: the caller's own cleanup has to do
        libc = None
    try:
        cgroup_fds = [os.open(path, os.O_WRONLY) for path in cfg["cgroup_procs"]]
        if namespace:
            libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID)
            libc.mount(None, "/", None, MS_REC | MS_PRIVATE)
            os.chroot(_build_root(cfg, libc))
            os.chdir("/tmp")
        else:
            os.chdir(cfg["workdir"])
            if libc is not None:  # orphans of the run become ours, so they are reaped here
                libc.prctl(PR_SET_CHILD_SUBREAPER, 1)
        program_fd = _payload_fd(payload["program"])
        judge_fd = _payload_fd(payload["judge"]) if payload["judge"] is not None else None
    except Exception as e:  # the caller reads this line
        os.write(2, ("sandbox setup failed: %s\n" % e).encode())
        os._exit(EXIT_SETUP_FAILED)
    if not namespace:
        _supervise(cfg, libc, program_fd, judge_fd, cgroup_fds)
    # The first child in the new PID namespace is its init (the supervisor): when it exits
    # the kernel kills and reaps every other process of the run. This process stays
    # outside, as root, only to wait for it (the untrusted uids cannot signal it).
    child = os.fork()
    if child == 0:
        _supervise(cfg, libc, program_fd, judge_fd, cgroup_fds)
    for fd in [program_fd, judge_fd, *cgroup_fds, cfg.get("report_fd")]:
        if fd is not None:
            os.close(fd)
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    boot()
