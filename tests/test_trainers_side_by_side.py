"""Contract: the trainers stand side by side. ``train/sft.py``, ``train/rm.py``,
``train/dpo.py`` and RL (``train/rl.py`` with its stage modules ``train/rl_*.py``) each import
what they share from the shared modules of ``train/`` (``train.steps``, ``train.loop``,
``train.session``, ...) and from the library (preference pairs: ``data.preference``), never
from another trainer, at module level or inside a function alike; and the shared modules
import no trainer. So changing one trainer cannot break another, and what two trainers use
lives where both can see it (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import pathlib

import pytest

import posttrain

TRAIN_DIR = pathlib.Path(posttrain.__file__).parent / "train"


def trainer_of(module: str) -> str | None:
    """The trainer a ``posttrain.train`` module belongs to (None: a shared module)."""
    if module in ("sft", "rm", "dpo", "rl") or module.startswith("rl_"):
        return "rl" if module.startswith("rl") else module
    return None


def imported_train_modules(path: pathlib.Path) -> set[str]:
    """``X`` for every import of ``posttrain.train.X`` in ``path``, at any depth: ``import
    posttrain.train.X``, ``from posttrain.train.X import ...``, ``from posttrain.train import X``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "posttrain.train":
                names = [f"posttrain.train.{alias.name}" for alias in node.names]
            else:
                names = [node.module]
        else:
            continue
        found.update(name.split(".")[2] for name in names if name.startswith("posttrain.train."))
    return found


MODULES = sorted(p for p in TRAIN_DIR.glob("*.py") if p.stem != "__init__")


def test_every_trainer_is_seen():
    trainers = {trainer_of(p.stem) for p in MODULES} - {None}
    assert trainers == {"sft", "rm", "dpo", "rl"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_no_trainer_imports_another_trainer(path):
    own = trainer_of(path.stem)
    for module in imported_train_modules(path):
        other = trainer_of(module)
        if own is None:
            assert other is None, f"train/{path.name}, a shared module, imports the {other} trainer (train/{module}.py)"
        else:
            assert other in (None, own), (f"train/{path.name} ({own}) imports train/{module}.py ({other}): "
                                          f"move what both use to a shared module (train.steps, data/, models/)")


def test_the_checker_sees_every_form_of_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import posttrain.train.sft\n"
                      "from posttrain.train import rm, checkpoint as ckpt\n"
                      "def f():\n    from posttrain.train.rl_update import Trainables\n")
    assert imported_train_modules(module) == {"sft", "rm", "checkpoint", "rl_update"}
    assert [trainer_of(m) for m in ("rl_update", "rl", "dpo", "steps", "loop")] == ["rl", "rl", "dpo", None, None]
