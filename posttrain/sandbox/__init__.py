"""The code sandbox: model-written Python run as hostile input, in fresh, limited, isolated
processes (namespaces, private uids, seccomp, a run-wide cgroup).

Used by the ``code`` reward and by the agent's ``python`` tool; it imports nothing else of
the library. ``runner.py``: the caller's side (``Sandbox``, ``SandboxLimits``, the root
image, the isolation a caller may choose) and the table of what protects what;
``boot.py``: the bootstrap of one run; ``judge.py``: the program's and the judge's sides of
a test run and the plain-data wire between them; ``seccomp.py``: the system-call filter.
``boot.py`` and ``judge.py`` are standalone scripts that run inside the sandbox.
"""
