"""Every reward module's docstring examples run (DESIGN habit 8: runnable examples)."""

import doctest
import importlib

import pytest

MODULES = [
    "posttrain.rewards.output",
    "posttrain.rewards.math",
    "posttrain.rewards.code",
    "posttrain.rewards.format",
    "posttrain.rewards.length",
    "posttrain.rewards.composite",
    "posttrain.rewards.registry",
    "posttrain.rewards.reasoning_gym",
    "posttrain.sandbox.runner",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
