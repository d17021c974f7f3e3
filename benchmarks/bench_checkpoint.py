"""Checkpoint save time: files hashed as they are written (``train.checkpoint._write_file``)
against the same save followed by reading every file back to hash it (what
``checksums.json`` cost before), side by side in one process.

Run: ``python benchmarks/bench_checkpoint.py [--params 135e6]``. The state is an fp32 model of
``--params`` parameters plus AdamW's two moments (3 x 4 bytes per parameter: 1.6 GB for the
default model), written into a temporary directory next to ``--dir``. The page cache holds
what was just written, so the read-back is memory speed: the saving measured here is the
hashing pass over the bytes, the least it costs (more on a disk that evicts them).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from posttrain.train import checkpoint as ckpt
from posttrain.train.distributed import DistInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=135e6)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    count = int(args.params)
    files = {"model.pt": {"w": torch.randn(count)},
             "optimizer.pt": {"exp_avg": torch.randn(count), "exp_avg_sq": torch.rand(count)}}
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    times: dict[str, list[float]] = {"hashed while written": [], "written, then read back": []}
    try:
        for repeat in range(args.repeats):
            for name in times:
                started = time.perf_counter()
                path = ckpt.write_checkpoint(root / name.split()[0], repeat, files, {"step": repeat}, info, keep_last=1)
                if name.startswith("written"):  # the former checksums pass: every file read and hashed again
                    for file in sorted(path.rglob("*.pt")):
                        ckpt.file_digest(file)
                times[name].append(time.perf_counter() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    size = sum(t.numel() * t.element_size() for state in files.values() for t in state.values())
    print(f"checkpoint of {size / 1e9:.2f} GB ({count / 1e6:.0f}M params fp32 + AdamW moments), best of "
          f"{args.repeats}, load average {os.getloadavg()[0]:.2f}")
    best = {name: min(values) for name, values in times.items()}
    for name, seconds in best.items():
        print(f"  {name:26s} {seconds:6.2f} s")
    print(f"  saving: {best['written, then read back'] - best['hashed while written']:.2f} s per save "
          f"({best['hashed while written'] / best['written, then read back']:.2f}x the time)")


if __name__ == "__main__":
    main()
