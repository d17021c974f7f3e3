"""Contract: posttrain.algorithms imports only torch (and its own modules, stdlib typing, math, dataclasses)."""

import ast
import pathlib

import posttrain.algorithms as algorithms

ALLOWED_ROOTS = {"torch", "__future__", "typing", "math", "dataclasses", "posttrain"}


def test_algorithms_import_only_torch():
    package_dir = pathlib.Path(algorithms.__file__).parent
    for path in sorted(package_dir.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                root = name.split(".")[0]
                assert root in ALLOWED_ROOTS, f"{path.name} imports {name}"
                if root == "posttrain":
                    assert name.startswith("posttrain.algorithms"), f"{path.name} imports {name}"


def test_public_api_is_exported():
    for name in algorithms.__all__:
        assert hasattr(algorithms, name), name
