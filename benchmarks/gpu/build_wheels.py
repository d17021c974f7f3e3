"""Assemble the wheels a bare GPU machine needs to run ``benchmarks/gpu/check.sh`` offline.

The GPU machine is assumed to have Python 3.12 with torch, transformers, peft, accelerate,
triton, safetensors, tensorboard, matplotlib, rich, pyyaml and pytest, and no network. What
else the GPU check imports (pydantic for the config; math-verify for the GRPO reward;
trl and datasets for the TRL side of the benchmarks) is the dependency closure of
``NEEDED`` minus the closure of ``PREINSTALLED``, both read from this environment's installed
metadata (``importlib.metadata``), at the versions installed here (the ones the tests ran
with). They are fetched with ``pip download --no-deps`` for CPython 3.12 on manylinux x86_64
(https://pip.pypa.io/en/stable/cli/pip_download/) into ``.gpu-wheels/`` (git-ignored), and
the total is checked against the 64 MiB a device run can carry. pyarrow (which ``datasets``,
and so TRL's trainers, import) alone is 52 MiB as published, so wheels over 1 MiB are
re-compressed in place with LZMA (a zip compression method, PKWARE APPNOTE 6.3, that pip
installs like the usual deflate: https://docs.python.org/3/library/zipfile.html): the files
inside, and so the wheel's RECORD hashes, are unchanged; pyarrow goes to 38 MiB.

Run: ``python benchmarks/gpu/build_wheels.py [--out .gpu-wheels]``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
NEEDED = ["pydantic", "math-verify", "trl", "datasets"]
# Carried even where a preinstalled package may already pull it in (transformers -> typer ->
# pydantic here, not in every version): posttrain's config cannot load without it.
ALWAYS = ["pydantic"]
PREINSTALLED = ["torch", "transformers", "peft", "accelerate", "triton", "safetensors", "tensorboard",
                "matplotlib", "rich", "pyyaml", "pytest", "pip", "setuptools", "wheel"]
LIMIT_MIB = 64.0
TARGET_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.0",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def closure(names: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of ``names`` and everything they require (no extras)."""
    seen: dict[str, str] = {}
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name in map(canonicalize_name, PREINSTALLED):
                continue
            raise SystemExit(f"{name} is not installed here; install the bench extra first") from None
        seen[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(TARGET_ENV):
                todo.append(requirement.name)
    return seen


def recompress_lzma(wheel: Path) -> None:
    """Rewrite ``wheel`` with every member LZMA-compressed (same names, bytes and modes)."""
    import zipfile

    packed = wheel.with_suffix(".lzma-tmp")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(packed, "w", compression=zipfile.ZIP_LZMA) as target:
        for info in source.infolist():
            member = zipfile.ZipInfo(info.filename, info.date_time)
            member.external_attr = info.external_attr
            member.compress_type = zipfile.ZIP_LZMA
            target.writestr(member, source.read(info))
    os.replace(packed, wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / ".gpu-wheels"))
    args = parser.parse_args()
    have = closure(PREINSTALLED)
    wanted = {name: version for name, version in closure(NEEDED).items() if name not in have}
    wanted.update(closure(ALWAYS))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--abi", "abi3",
               "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
               "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(out),
               *[f"{name}=={version}" for name, version in sorted(wanted.items())]]
    subprocess.run(command, check=True)
    wheels = sorted(out.glob("*.whl"))
    for wheel in wheels:
        if wheel.stat().st_size > 2**20:
            recompress_lzma(wheel)
    total = sum(w.stat().st_size for w in wheels) / 2**20
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    missing = [n for n in wanted if not any(canonicalize_name(re.split(r"-\d", w.name)[0]) == n for w in wheels)]
    if missing:
        raise SystemExit(f"no wheel for: {', '.join(missing)}")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {out} (limit {LIMIT_MIB:.0f} MiB)")
    if total > LIMIT_MIB:
        raise SystemExit(f"the wheels take {total:.1f} MiB, over the {LIMIT_MIB:.0f} MiB a device run carries")


if __name__ == "__main__":
    main()
