"""Bootstrap of one sandboxed run. A standalone script: it imports nothing from posttrain.

``posttrain.rewards.sandbox`` starts ``python -I -S -B -c <this file's text> <config json>``
with an empty environment, a new session, stdin/stdout/stderr pipes and a results pipe whose
number is in the config. Stdin starts with a 10-digit length and that many bytes of JSON payload (program,
tests, nonce); whatever follows is the program's own stdin.

Two phases:

1. ``boot`` (trusted, runs as the caller's uid; as root in ``namespace`` isolation):
   - ``namespace``: unshare mount/network/IPC/UTS/PID namespaces; build a new root on a
     size-limited tmpfs holding read-only bind mounts of only what Python needs
     (``/usr``, the interpreter prefix, the virtualenv, a few ``/dev`` nodes) and a
     writable ``/tmp``; ``chroot`` into it; fork the PID namespace's init, which sets
     resource limits and drops to the run's unprivileged uid/gid with no supplementary
     groups (all capabilities are lost) before ``exec``; the boot process only waits.
   - ``process``: set resource limits and ``chdir`` into the temporary directory the
     caller made; nothing else (see the strength table in ``sandbox.py``).
   The payload is written to a file that is opened and unlinked before untrusted code
   exists, so the untrusted program cannot read the nonce from disk.
2. ``stage2`` (``exec``-ed fresh interpreter ``python -I -B``): reads the payload from
   the inherited fd, installs audit hooks in ``process`` isolation, then runs the program
   (script mode) or the program followed by each test in a fresh copy of its globals
   (tests mode), reporting ``<nonce> <index> <pass|fail>`` lines on the results pipe.
"""
import json
import os
import resource
import sys

EXIT_SETUP_FAILED = 120

STAGE2 = r'''
import os, sys
_fd, _report_fd = int(sys.argv[1]), int(sys.argv[2]); del sys.argv[1:]
with os.fdopen(_fd, "rb") as _f:
    _payload = __import__("json").loads(_f.read())
def _make_hook(root):
    import os.path as _p
    _blocked_prefixes = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn",
                         "os.system", "os.fork", "os.kill", "os.killpg", "os.setuid", "os.setgid", "pty.")
    _write_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                     "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move")
    _write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _inside(path):
        try:
            real = _p.realpath(os.fsdecode(path) if not isinstance(path, int) else ".")
        except Exception:
            return False
        return real == root or real.startswith(root + "/")
    def _hook(event, args):
        if event.startswith(_blocked_prefixes) or event == "import" and args[0] in ("_ctypes", "_posixsubprocess"):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and (_p.realpath(os.fsdecode(path)) + "/").startswith("/proc/"):
                raise PermissionError("sandbox: /proc is not readable")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & _write_flags)
            if writing and not isinstance(path, int) and not _inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
        elif event in _write_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                    raise PermissionError("sandbox: %s outside the working directory is not allowed" % event)
    return _hook
if _payload["audit"]:
    sys.addaudithook(_make_hook(os.path.realpath(os.getcwd())))
del _make_hook
def _main(payload):
    nonce, program, tests = payload["nonce"], payload["program"], payload["tests"]
    report = os.fdopen(_report_fd, "w", buffering=1) if tests is not None else None
    del payload
    code = compile(program, "solution.py", "exec")
    if tests is None:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
        return
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(code, ns)
    except BaseException as e:
        print("solution raised %s: %s" % (type(e).__name__, e), file=sys.stderr)
        for i in range(len(tests)):
            report.write("%s %d fail\n" % (nonce, i))
        return
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), dict(ns))
            ok = True
        except BaseException as e:
            print("test %d failed: %s: %s" % (i, type(e).__name__, str(e)[:200]), file=sys.stderr)
            ok = False
        report.write("%s %d %s\n" % (nonce, i, "pass" if ok else "fail"))
_main(globals().pop("_payload"))
'''


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def check(result, what):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, "%s: %s" % (what, os.strerror(err)))

    def unshare(flags):
        check(libc.unshare(flags), "unshare")

    def die_with_parent():
        check(libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0), "prctl")

    def mount(source, target, fstype, flags, data=None):
        enc = lambda s: s.encode() if s is not None else None  # noqa: E731
        check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
              "mount %s" % target)

    return unshare, mount, die_with_parent


CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = (
    0x00020000, 0x04000000, 0x08000000, 0x20000000, 0x40000000)
PR_SET_PDEATHSIG = 1
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18


def _read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            raise EOFError("payload truncated")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _build_root(cfg, mount):
    """Mount a tmpfs at /tmp (this namespace only) and build the new root under it."""
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
          "size=%dk,nr_inodes=%d,mode=755" % (cfg["tmpfs_kb"], cfg["tmpfs_inodes"]))
    root = "/tmp/root"
    os.mkdir(root, 0o755)
    for name in ("bin", "lib", "lib64", "sbin", "lib32", "libx32"):
        host = "/" + name
        if os.path.islink(host):
            os.symlink(os.readlink(host), root + host)
    for host in cfg["ro_binds"]:
        if not os.path.exists(host):
            continue
        target = root + host
        if os.path.isdir(host):
            os.makedirs(target, 0o755, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
            open(target, "w").close()
        mount(host, target, None, MS_BIND | MS_REC)
        mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.makedirs(root + "/dev", 0o755)
    for node in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + node, "w").close()
        mount("/dev/" + node, root + "/dev/" + node, None, MS_BIND)
    os.mkdir(root + "/tmp")
    os.chmod(root + "/tmp", 0o1777)
    return root


def _set_limits(cfg):
    def lim(which, soft, hard=None):
        resource.setrlimit(which, (soft, soft if hard is None else hard))

    lim(resource.RLIMIT_CPU, cfg["cpu_seconds"], cfg["cpu_seconds"] + 1)
    lim(resource.RLIMIT_AS, cfg["memory_bytes"])
    lim(resource.RLIMIT_FSIZE, cfg["max_file_bytes"])
    lim(resource.RLIMIT_NOFILE, cfg["max_open_files"])
    lim(resource.RLIMIT_CORE, 0)
    if cfg["isolation"] == "namespace":  # per-uid count: only meaningful for the run's own uid
        lim(resource.RLIMIT_NPROC, cfg["max_processes"])


def _drop_privileges(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() != uid or os.geteuid() != uid or os.getgid() != uid:
        raise OSError("failed to drop privileges")


def _exit_like(status):
    """Exit with the child's wait status: its code, or 128 + the signal that killed it."""
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


def boot():
    cfg = json.loads(sys.argv[1])
    payload = _read_exact(0, int(_read_exact(0, 10)))
    namespace = cfg["isolation"] == "namespace"
    try:
        unshare, mount, die_with_parent = _libc()
        die_with_parent()  # the caller dies -> this run dies (and with it, the namespace)
    except (OSError, AttributeError):  # not Linux: the caller's own cleanup has to do
        unshare = mount = die_with_parent = None
    try:
        if namespace:
            unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWPID)
            mount(None, "/", None, MS_REC | MS_PRIVATE)
            root = _build_root(cfg, mount)
            os.chroot(root)
            os.chdir("/tmp")
        else:
            os.chdir(cfg["workdir"])
        payload_path = ".payload-%d" % os.getpid()
        fd = os.open(payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        os.close(fd)
        payload_fd = os.open(payload_path, os.O_RDONLY)
        os.unlink(payload_path)
        os.set_inheritable(payload_fd, True)
    except Exception as e:  # the caller reads this line and may fall back to `process`
        os.write(2, ("sandbox setup failed: %s\n" % e).encode())
        os._exit(EXIT_SETUP_FAILED)
    python = cfg["python"]
    argv = [python, "-I", "-B", "-c", STAGE2, str(payload_fd), str(cfg["report_fd"])]
    if not namespace:
        _set_limits(cfg)
        os.execve(python, argv, cfg["env"])
    # The first child in the new PID namespace is its init: when it dies the kernel kills
    # and reaps every other process of the run. This process stays outside, as root, only
    # to wait for it (the untrusted uid cannot signal it).
    child = os.fork()
    if child == 0:
        try:
            _set_limits(cfg)
            _drop_privileges(cfg["uid"])
            die_with_parent()
            os.execve(python, argv, cfg["env"])
        except BaseException as e:
            os.write(2, ("sandbox setup failed: %s\n" % e).encode())
        os._exit(EXIT_SETUP_FAILED)
    os.close(payload_fd)
    os.close(cfg["report_fd"])
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except InterruptedError:
            continue
    _exit_like(status)


if __name__ == "__main__":
    boot()
