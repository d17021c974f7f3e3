"""``make demo``'s job timed: the quickstart pipeline (baseline eval -> SFT -> eval -> GRPO ->
eval on the bundled model) into a fresh run directory, with the CPU's flags, its cores and the
load average before and after, and each stage's wall time from the run's ``pipeline.json``.

Run: ``python benchmarks/bench_demo.py`` (``make bench`` runs it after the TRL comparisons).
The model is already cached (``make install`` converted it), so the time is the job's alone.
Target (issue: the quickstart in five minutes): <= 300 s on 2 cores, with or without native bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_flags

REPO = Path(__file__).resolve().parents[1]
TARGET_S = 300.0




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides passed to the pipeline (a shortened "
                                                     "job is not judged against the target)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (default: removed, it holds GBs)")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "posttrain", "pipeline", args.config, f"run.output_dir={out}",
                           "run.name=demo", *args.overrides], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
        sys.exit(f"bench_demo: the pipeline failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    stages = json.loads((out / "demo" / "pipeline.json").read_text())["stages"]
    verdict = (f"target {TARGET_S:.0f} s: {'met' if wall <= TARGET_S else 'missed'} ({wall / TARGET_S:.2f}x)"
               if not args.overrides else f"shortened by {' '.join(args.overrides)}: not judged against the target")
    print(f"make demo's job ({args.config}): {wall:.0f} s wall on {os.cpu_count()} cores, CPU {platform.machine()} "
          f"[{cpu_flags()}], load average {load_before:.2f} before / {os.getloadavg()[0]:.2f} after; {verdict}")
    for stage in stages:
        scores = " ".join(f"{k}={v:.2f}" for k, v in (stage.get("scores") or {}).items())
        print(f"  {stage['name']:10s} {stage.get('wall_s', float('nan')):7.1f} s  {scores}")
    if args.keep:
        print(f"run directory: {out / 'demo'}")
    else:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
