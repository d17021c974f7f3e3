"""Contract: posttrain's packages form layers, and a module imports only from its own layer or
the layers below it, at module level or inside a function alike (docs/ARCHITECTURE.md).

    commands   cli, pipeline, chat, inspect_data, report, __main__
    train      loops, checkpoints, logging, distribution
    library    config, data, models, rewards, rollout, eval
    base       errors, log, algorithms (torch-only math; its own test keeps it so)

So ``rewards/model.py`` scores with ``models/scalar_head.py`` without reaching into a
trainer, and nothing a trainer uses can import a command."""

import ast
import pathlib

import pytest

import posttrain

LAYERS = {
    "base": {"errors", "log", "algorithms", "__version__"},
    "library": {"config", "data", "models", "rewards", "rollout", "eval", "agent"},
    "train": {"train"},
    "commands": {"cli", "pipeline", "chat", "inspect_data", "report", "__main__"},
}
ORDER = list(LAYERS)
PACKAGE_DIR = pathlib.Path(posttrain.__file__).parent


def layer_of(top_level: str) -> str:
    for layer, members in LAYERS.items():
        if top_level in members:
            return layer
    raise AssertionError(f"posttrain.{top_level} belongs to no layer: add it to LAYERS in this test")


def imported_top_levels(path: pathlib.Path) -> set[str]:
    """posttrain.<X> for every import of a posttrain module in ``path`` (any depth)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "posttrain" else [f"posttrain.{a.name}" for a in node.names]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("posttrain."))
    return found


MODULES = sorted(PACKAGE_DIR.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_modules_import_only_their_own_layer_or_below(path):
    own = path.relative_to(PACKAGE_DIR).with_suffix("").parts[0]
    if own == "__init__":
        return
    own_rank = ORDER.index(layer_of(own))
    for imported in imported_top_levels(path):
        rank = ORDER.index(layer_of(imported))
        assert rank <= own_rank, (f"{path.relative_to(PACKAGE_DIR)} ({layer_of(own)}) imports posttrain.{imported} "
                                  f"({layer_of(imported)}), a layer above it")


def test_the_checker_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from posttrain.train.loop import optimizer_step\n    import posttrain.cli\n")
    assert imported_top_levels(module) == {"train", "cli"}
