"""Contract: posttrain's packages form layers, and a module imports only from its own layer or
the layers below it, at module level or inside a function alike (docs/ARCHITECTURE.md).

    commands   cli, api, pipeline, chat, inspect_data, report, __main__
    train      loops, checkpoints, logging, distribution
    library    data < models < config < sandbox < rollout < rewards < agent < eval
    base       errors, log, hub, plugins, algorithms (torch-only math; its own test keeps it so)

Inside the library the folders are ordered too: a library module imports only its own folder
or the folders before it in ``LIBRARY_ORDER``. So ``rewards/model.py`` scores with
``models/scalar_head.py`` without reaching into a trainer, the renderer (``data/``) never
imports the agent that samples what it renders, and nothing a trainer uses can import a
command."""

import ast
import pathlib

import pytest

import posttrain

LIBRARY_ORDER = ["data", "models", "config", "sandbox", "rollout", "rewards", "agent", "eval"]
LAYERS = {
    "base": {"errors", "log", "hub", "plugins", "algorithms", "__version__"},
    "library": set(LIBRARY_ORDER),
    "train": {"train"},
    "commands": {"cli", "api", "pipeline", "chat", "inspect_data", "report", "model_card", "__main__"},
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


def library_folders_above(own: str, path: pathlib.Path) -> set[str]:
    """The library folders after ``own`` in ``LIBRARY_ORDER`` that ``path`` imports (any depth)."""
    rank = LIBRARY_ORDER.index(own)
    return {imported for imported in imported_top_levels(path)
            if imported in LIBRARY_ORDER and LIBRARY_ORDER.index(imported) > rank}


MODULES = sorted(PACKAGE_DIR.rglob("*.py"))
LIBRARY_MODULES = [path for path in MODULES if path.relative_to(PACKAGE_DIR).with_suffix("").parts[0] in LIBRARY_ORDER]


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


@pytest.mark.parametrize("path", LIBRARY_MODULES, ids=lambda p: str(p.relative_to(PACKAGE_DIR)))
def test_library_modules_import_only_their_own_folder_or_lower_ones(path):
    own = path.relative_to(PACKAGE_DIR).with_suffix("").parts[0]
    above = library_folders_above(own, path)
    assert not above, (f"{path.relative_to(PACKAGE_DIR)} ({own}) imports posttrain.{', posttrain.'.join(sorted(above))}, "
                       f"after {own} in the library order {' < '.join(LIBRARY_ORDER)}")


def test_the_checker_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from posttrain.train.loop import optimizer_step\n    import posttrain.cli\n")
    assert imported_top_levels(module) == {"train", "cli"}


def test_the_library_checker_sees_function_local_upward_imports(tmp_path):
    module = tmp_path / "render.py"
    module.write_text("from posttrain.data.formats import read_rows\nfrom posttrain.hub import hub_status\n\n"
                      "def f():\n    from posttrain.agent.tools import python_tool\n    from posttrain import rewards\n")
    assert library_folders_above("data", module) == {"agent", "rewards"}
    assert library_folders_above("eval", module) == set()

