"""Running a trainer in 1 process or under torchrun (N CPU processes, gloo), for the tests
that check N ranks train exactly like one (fast paths checked against slow references: 2 ranks vs 1).

A worker is a Python script (its text) that takes ``model_dir out_dir`` as arguments, trains,
and on rank 0 prints one line ``RESULT <json>`` with the logged history.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def small_vocab_model_dir(tmp_path: Path, tokenizer) -> Path:
    """A saved tiny Llama with a 320-token vocabulary (random ids below 300 stay valid) and
    the real tokenizer beside it, so workers load it as a model spec."""
    from conftest import build_tiny_llama

    model_dir = tmp_path / "model"
    build_tiny_llama(tokenizer, vocab_size=320).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def run_worker(worker: str, tmp_path: Path, model_dir: str | Path, nproc: int, *, name: str | None = None,
               env: dict[str, str] | None = None, timeout: float = 600) -> tuple[list[dict], Path]:
    """Run ``worker`` (script text) in one process (``nproc`` 1) or under torchrun with
    ``nproc`` ranks; returns rank 0's RESULT history and the run directory ``out/run``.

    ``name``: the output folder under ``tmp_path`` (default ``out<nproc>``); ``env``: extra
    environment variables. Fails the test with the tail of stderr if the worker fails.
    """
    script = tmp_path / "worker.py"
    script.write_text(worker)
    out = tmp_path / (name or f"out{nproc}")
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
                   **(env or {})}
    if nproc == 1:
        command = [sys.executable, str(script), str(model_dir), str(out)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(script), str(model_dir), str(out)]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), out / "run"
