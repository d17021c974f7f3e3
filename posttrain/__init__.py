"""posttrain: post-train language models (SFT, reward models, RL) from a laptop CPU to a GPU cluster.

The Python API (``posttrain.api``) is reached from here and imported on first use, so
``import posttrain as pt`` stays cheap::

    import posttrain as pt
    result = pt.sft("configs/sft_quickstart.yaml", overrides={"train.max_steps": 4})

``pt.pipeline`` and ``pt.eval`` are also the names of the modules ``posttrain.pipeline`` and
``posttrain.eval``: those two modules are callable, a call running the API function, so both
uses of the name work whichever was imported first.
"""

import sys
import types

__version__ = "0.1.0"

API = ("sft", "rm", "dpo", "rl", "eval", "pipeline", "push", "make_config", "Result", "Plan")
MODULE_COMMANDS = ("eval", "pipeline")  # API functions sharing their name with a submodule
__all__ = ["__version__", *API]


class _CommandModule(types.ModuleType):
    """A submodule whose call is the API function of the same name (``pt.pipeline(config)``)."""

    def __call__(self, *args, **kwargs):
        from posttrain import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name, value):
        # the import system sets a submodule on its package when it first loads it
        if name in MODULE_COMMANDS and isinstance(value, types.ModuleType):
            value.__class__ = _CommandModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):
    if name in MODULE_COMMANDS:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    if name in API:
        from posttrain import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(API))
