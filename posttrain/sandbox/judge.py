"""The two sides of a sandboxed test run, and the plain-data wire between them.

A standalone script: it imports only the standard library, because the sandbox runs its
text with the base interpreter inside a root where neither posttrain nor any
site-packages exist: the program's side as ``python -I -S -B -c <this file> <role>``, the
judge as ``run_judge()`` in the sandbox bootstrap's own forked interpreter (no second
start-up; role ``judge`` in ``process`` isolation). ``posttrain.sandbox.runner`` also imports it normally (codec, tests).

Roles:

- ``script``: run the program as ``__main__`` with the caller's stdin (stdin/stdout tests).
- ``cells``: run a session's cells in one namespace, the output of all but the last sent to
  ``/dev/null``, and after each cell returns write ``<index> <token>`` on fd 4 (the
  caller's report pipe; the token is the run's own, from the payload); an exception prints
  its traceback from the cell's own frame and ends the run with status 1.
- ``server`` (untrusted uid): run the program, say ``("ready",)`` on fd 5, then answer
  call requests on fd 4 with replies on fd 5 until fd 4 closes. A request is ``(name, args, kwargs)``; a reply is
  ``("ok", value)`` or ``("raise", exception type name, message)``. The server is the
  program's own code as far as trust goes: the program may replace it and answer anything.
- ``judge`` (a second uid, never sharing memory with the server): run the row's trusted
  prefix (HumanEval's prompt, which defines helpers such as ``poly``), bind proxies for the
  names the tests call on the program (a standard-library module name a test uses
  without importing it is the judge's own module), wait for ``ready`` (no test counts for a program
  that crashes or never finishes loading), run each test, and write ``<index> pass|fail`` and
  finally ``done`` on fd 6, which only the judge holds.

Wire format: a 10-digit byte length, then JSON of tagged values. Exact builtin types only:
``None``, ``bool``, ``int``, ``float`` (``nan``/``inf`` too), ``complex``, ``str``,
``bytes``, ``list``, ``tuple``, ``dict``, ``set``, ``frozenset``; subclasses are refused
when encoding, and the judge's decoder builds fresh builtins from JSON, so an object
whose ``__eq__`` always returns True, or an ``int`` subclass, cannot cross. Replies are
capped in bytes (``max_reply_bytes``), nesting depth (``MAX_DEPTH``) and node count
(``MAX_NODES``, counted in the bytes before any value is built); the judge decodes them under
the run's ``memory_mb`` (its address-space limit, as the program's), so a reply too costly to
decode fails its test instead of growing the judge.

Exceptions the program raises re-raise in the judge as the builtin class of that name when
it is a subclass of ``Exception`` other than ``StopIteration``/``StopAsyncIteration``
(which would end a ``map``/``all`` loop in the test and turn a failure into a pass);
anything else raises ``CandidateError``. Calls pass copies: a test that checks how the
candidate mutated its argument cannot see the mutation; classes and other objects the
program defines cannot be called from tests (only functions and other callables can).
"""
import builtins
import json
import os
import re
import sys

MAX_DEPTH = 100
MAX_NODES = 2_000_000
_SAFE_INT = 2 ** 53


class WireError(ValueError):
    """A value that may not cross the sandbox boundary, or a malformed message."""


class CandidateError(Exception):
    """The program raised a non-builtin exception, or stopped answering."""


def encode(value):
    """``value`` (exact builtin types only) as a JSON-able tagged structure.

    >>> encode((1, [2.5, None], {"a": b"x"}))
    ['t', [1, ['l', [2.5, None]], ['d', [['a', ['y', 'x']]]]]]
    """
    nodes = [0]
    return _enc(value, 0, nodes)


def _enc(v, depth, nodes):
    nodes[0] += 1
    if depth > MAX_DEPTH or nodes[0] > MAX_NODES:
        raise WireError("value is nested deeper than %d or has more than %d parts" % (MAX_DEPTH, MAX_NODES))
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if -_SAFE_INT < v < _SAFE_INT else ["I", hex(v)]
    if t is float:
        return v if v == v and v not in (float("inf"), float("-inf")) else ["f", repr(v)]
    if t is complex:
        return ["c", _enc(v.real, depth + 1, nodes), _enc(v.imag, depth + 1, nodes)]
    if t is bytes:
        return ["y", v.decode("latin-1")]
    if t is list or t is tuple or t is set or t is frozenset:
        tag = {list: "l", tuple: "t", set: "s", frozenset: "F"}[t]
        return [tag, [_enc(x, depth + 1, nodes) for x in v]]
    if t is dict:
        return ["d", [[_enc(k, depth + 1, nodes), _enc(x, depth + 1, nodes)] for k, x in v.items()]]
    raise WireError("a value of type %s cannot cross the sandbox boundary (plain data only)" % t.__name__)


def decode(obj):
    """The value ``encode`` made, rebuilt from exact builtin types; anything else is refused.

    >>> decode(encode((1, {2: [3.0, float("inf")]}, frozenset({"a"})))) == (1, {2: [3.0, float("inf")]}, frozenset({"a"}))
    True
    """
    nodes = [0]
    return _dec(obj, 0, nodes)


def _dec(o, depth, nodes):
    nodes[0] += 1
    if depth > MAX_DEPTH or nodes[0] > MAX_NODES:
        raise WireError("reply is nested deeper than %d or has more than %d parts" % (MAX_DEPTH, MAX_NODES))
    t = type(o)
    if o is None or t is bool or t is str or t is int:
        return o
    if t is float:
        return float(o)
    if t is not list or not o or type(o[0]) is not str:
        raise WireError("malformed value on the wire")
    tag = o[0]
    try:
        if tag == "I" and len(o) == 2 and type(o[1]) is str:
            return int(o[1], 16)
        if tag == "f" and len(o) == 2 and o[1] in ("nan", "inf", "-inf"):
            return float(o[1])
        if tag == "c" and len(o) == 3:
            re, im = _dec(o[1], depth + 1, nodes), _dec(o[2], depth + 1, nodes)
            if type(re) is not float or type(im) is not float:
                raise WireError("malformed complex on the wire")
            return complex(re, im)
        if tag == "y" and len(o) == 2 and type(o[1]) is str:
            return o[1].encode("latin-1")
        if tag in ("l", "t", "s", "F") and len(o) == 2 and type(o[1]) is list:
            items = [_dec(x, depth + 1, nodes) for x in o[1]]
            return {"l": list, "t": tuple, "s": set, "F": frozenset}[tag](items)
        if tag == "d" and len(o) == 2 and type(o[1]) is list:
            out = {}
            for pair in o[1]:
                if type(pair) is not list or len(pair) != 2:
                    raise WireError("malformed dict on the wire")
                out[_dec(pair[0], depth + 1, nodes)] = _dec(pair[1], depth + 1, nodes)
            return out
    except (TypeError, ValueError, UnicodeError) as e:  # unhashable key, bad hex, ...
        raise WireError("malformed value on the wire: %s" % e) from None
    raise WireError("unknown tag %r on the wire" % tag[:20])


def dumps(value) -> bytes:
    body = json.dumps(encode(value), separators=(",", ":")).encode()
    return b"%010d" % len(body) + body


def _read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def read_message(fd, max_bytes):
    """The next value on ``fd``; None at a clean end of stream; WireError on anything odd,
    including a message this process has no memory left to decode."""
    head = _read_exact(fd, 10)
    if head is None:
        return None
    if not head.isdigit():
        raise WireError("malformed message header")
    n = int(head)
    if n > max_bytes:
        raise WireError("message of %d bytes is over the %d-byte cap" % (n, max_bytes))
    try:
        return _decode_body(_read_exact(fd, n))
    except MemoryError:
        raise WireError("message of %d bytes needs more memory than the run's memory_mb to decode" % n) from None


def _decode_body(body):
    if body is None:
        raise WireError("message truncated")
    if json_value_count(body) > 4 * MAX_NODES:  # what json_value_count counts for one part: 4 at most
        raise WireError("message holds more than the %d parts a value may have" % MAX_NODES)
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise WireError("message is not valid JSON (%s)" % str(e)[:100]) from None
    del body
    return decode(obj)


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_value_count(body):
    """An upper bound on the number of values in the JSON text ``body`` (commas and brackets
    outside strings, plus one), found without building them; a part ``decode`` counts is at
    most 4 of these (``["l",[]]``). JSON objects never cross the wire, so a
    body holding one is refused here, before ``json.loads`` would build millions of dicts.

    >>> json_value_count(b'["t",["ok",["l",[1,"a,[b",[]]]]]')  # 10 values
    11
    """
    bare = _JSON_STRING.sub(b"0", body)
    if b"{" in bare:
        raise WireError("malformed message: JSON objects never cross the wire")
    return bare.count(b",") + bare.count(b"[") + 1


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def exception_from(name, message):
    """The exception the judge raises for the program's ``raise <name>(<message>)``."""
    cls = getattr(builtins, name, None) if type(name) is str and name.isidentifier() else None
    if (isinstance(cls, type) and issubclass(cls, Exception)
            and not issubclass(cls, (StopIteration, StopAsyncIteration))):
        try:
            return cls(message)
        except Exception:
            pass
    return CandidateError("%s: %s" % (str(name)[:100], message))


# --------------------------------------------------------------------------- roles
def _read_payload():
    with os.fdopen(3, "rb") as f:
        return json.loads(f.read())


def _audit_hook(root):
    """Process isolation only: a PEP 578 hook, a speed bump rather than a boundary."""
    import os.path as _p

    blocked = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.system",
               "os.fork", "os.kill", "os.killpg", "os.setuid", "os.setgid", "pty.")
    write_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink",
                    "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.move")
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path):
        try:
            real = _p.realpath(os.fsdecode(path) if not isinstance(path, int) else ".")
        except Exception:
            return False
        return real == root or real.startswith(root + "/")

    def hook(event, args):
        if event.startswith(blocked) or event == "import" and args[0] in ("_ctypes", "_posixsubprocess"):
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes)) and (_p.realpath(os.fsdecode(path)) + "/").startswith("/proc/"):
                raise PermissionError("sandbox: /proc is not readable")
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not isinstance(path, int) and not inside(path):
                raise PermissionError("sandbox: writing outside the working directory is not allowed")
        elif event in write_events:
            for a in args[:2]:
                if isinstance(a, (str, bytes, os.PathLike)) and not inside(a):
                    raise PermissionError("sandbox: %s outside the working directory is not allowed" % event)

    return hook


def _program_namespace():
    # -S skips `site`, which is what defines exit()/quit(); programs may call them.
    builtins.exit = builtins.quit = sys.exit
    return {"__name__": "__main__", "__builtins__": builtins}


def run_script():
    payload = _read_payload()
    if payload.get("audit"):
        sys.addaudithook(_audit_hook(os.path.realpath(os.getcwd())))
    code = compile(payload.pop("program"), "solution.py", "exec")
    exec(code, _program_namespace())


def run_cells():
    payload = _read_payload()
    if payload.get("audit"):
        sys.addaudithook(_audit_hook(os.path.realpath(os.getcwd())))
    _run_cells(payload.pop("cells"), payload.pop("nonce").encode())


def _run_cells(cells, token, write=os.write, dup=os.dup, dup2=os.dup2, close=os.close, stdout=sys.stdout,
               stderr=sys.stderr, run=exec, build=compile, exit_now=os._exit):
    """The ``cells`` harness. Whatever it calls is bound here, before any cell runs, so a cell
    that patches ``os``, ``sys`` or the builtins changes nothing the harness does next."""
    import linecache
    import traceback

    print_exception = traceback.print_exception
    scope = _program_namespace()
    sink = os.open(os.devnull, os.O_WRONLY)
    last = len(cells) - 1
    for index, source in enumerate(cells):
        name = "<cell %d>" % (index + 1)
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        saved = None
        if index < last:  # a replayed cell: its output, from Python or straight to fd 1, is dropped
            _flush(stdout, sys.stdout)
            saved = dup(1)
            dup2(sink, 1)
        try:
            run(build(source, name, "exec"), scope)
        except BaseException as error:  # SystemExit too: a cell that exits did not run to its end
            _flush(stdout, sys.stdout)
            if saved is not None:
                dup2(saved, 1)
            try:
                print_exception(type(error), error, error.__traceback__.tb_next, file=stderr)
            except BaseException:
                write(2, ("%s in %s\n" % (type(error).__name__, name)).encode())
            _flush(stderr, sys.stderr)
            exit_now(1)
        _flush(stdout, sys.stdout)
        if saved is not None:
            dup2(saved, 1)
            close(saved)
        write(4, b"%d %s\n" % (index, token))


def _flush(*streams):
    for stream in streams:
        try:
            stream.flush()
        except BaseException:
            pass


def run_server():
    payload = _read_payload()
    if payload.get("audit"):
        sys.addaudithook(_audit_hook(os.path.realpath(os.getcwd())))
    ns = _program_namespace()
    try:
        exec(compile(payload.pop("program"), "solution.py", "exec"), ns)
    except BaseException as e:
        print("solution raised %s: %s" % (type(e).__name__, str(e)[:500]), file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    max_bytes = payload["max_message_bytes"]
    write_all(5, dumps(("ready",)))
    while True:
        try:
            request = read_message(4, max_bytes)
        except WireError as e:
            print("sandbox server: %s" % e, file=sys.stderr)
            os._exit(1)
        if request is None:
            os._exit(0)
        name, args, kwargs = request
        try:
            fn = ns[name]
            if not callable(fn):
                raise TypeError("%r is not callable" % name)
            reply = ("ok", fn(*args, **kwargs))
        except KeyError:
            reply = ("raise", "NameError", "name %r is not defined by the program" % name)
        except BaseException as e:  # SystemExit too: the judge decides what it means
            reply = ("raise", type(e).__name__, str(e)[:1000])
        try:
            data = dumps(reply)
            if len(data) > max_bytes:
                raise WireError("return value of %d bytes is over the %d-byte cap" % (len(data), max_bytes))
        except (WireError, RecursionError) as e:
            data = dumps(("raise", "TypeError", str(e)[:1000]))
        write_all(5, data)


def _global_names(code):
    """Names ``code`` (and the functions it defines) load as globals."""
    import dis

    names = {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            names |= _global_names(const)
    return names


def _stdlib_module(name):
    """The judge's own import of a standard-library module a test uses without importing it
    (MBPP-style ``assert math.isclose(f(x), y)`` where the solution imported ``math``)."""
    if name in ("this", "antigravity") or name not in getattr(sys, "stdlib_module_names", ()):
        return None
    try:
        return __import__(name)
    except Exception:
        return None


def _make_proxy(name, max_bytes):
    def call(*args, **kwargs):
        try:
            request = dumps((name, tuple(args), dict(kwargs)))
        except WireError as e:
            raise TypeError("argument to %s(): %s" % (name, e)) from None
        try:
            write_all(5, request)
            reply = read_message(4, max_bytes)
        except (BrokenPipeError, OSError):
            reply = None
        except WireError as e:
            raise CandidateError("reply from %s(): %s" % (name, e)) from None
        if reply is None:
            raise CandidateError("the program stopped answering (it exited or crashed)")
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "ok":
            return reply[1]
        if type(reply) is tuple and len(reply) == 3 and reply[0] == "raise" and type(reply[2]) is str:
            raise exception_from(reply[1], reply[2])
        raise CandidateError("malformed reply from %s()" % name)

    call.__name__ = call.__qualname__ = name
    return call


def run_judge():
    payload = _read_payload()
    report = os.fdopen(6, "w", buffering=1)
    if payload.get("undumpable"):  # same uid as the program: keep it out of /proc/<pid>/mem
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
    tests = payload["tests"]
    base = {"__name__": "__main__", "__builtins__": builtins}
    try:
        exec(compile(payload["prefix"], "prefix.py", "exec"), base)
    except BaseException as e:
        print("the row's trusted prefix raised %s: %s" % (type(e).__name__, e), file=sys.stderr)
        base = None
    compiled = []
    for i, test in enumerate(tests):
        try:
            compiled.append(compile(test, "test_%d.py" % i, "exec"))
        except SyntaxError as e:
            print("test %d does not compile: %s" % (i, e), file=sys.stderr)
            compiled.append(None)
    entry = payload.get("entry_point")
    if entry:
        remote = {entry}
    else:
        remote = set()
        for code in compiled:
            if code is not None:
                remote |= _global_names(code)
        remote = {n for n in remote if not (n.startswith("__") or hasattr(builtins, n) or base is None or n in base)}
    proxies = {}
    for n in remote:
        module = None if n == entry else _stdlib_module(n)
        proxies[n] = module if module is not None else _make_proxy(n, payload["max_message_bytes"])
    try:  # tests count only once the program has run to its end without raising
        ready = read_message(4, 1024) == ("ready",)
    except (WireError, OSError):
        ready = False
    if not ready:
        print("the program did not run to its end, so no test runs", file=sys.stderr)
        base = None
    for i, code in enumerate(compiled):
        ok = False
        if code is not None and base is not None:
            ns = dict(base)
            ns.update(proxies)
            try:
                exec(code, ns)
                ok = True
            except BaseException as e:
                print("test %d failed: %s: %s" % (i, type(e).__name__, str(e)[:200]), file=sys.stderr)
        report.write("%d %s\n" % (i, "pass" if ok else "fail"))
    report.write("done\n")
    report.close()


if __name__ == "__main__":
    {"script": run_script, "server": run_server, "judge": run_judge, "cells": run_cells}[sys.argv[1]]()
