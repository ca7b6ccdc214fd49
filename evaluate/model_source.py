"""Where the evaluated network comes from, named by one string so the CLI, resume and records agree:

- ``score-wrn-28-10`` (or a RobustBench id that is an alias of a registry entry): the registry;
- ``robustbench:ID``: RobustBench's own model zoo (any of its CIFAR models, loaded through RobustBench);
- ``factory:package.module:function``: a user's callable returning an ``nn.Module`` on [0, 1] NCHW images,
  with ``--checkpoint`` weights loaded strictly into it when given (``zoo-eval --model-factory`` spells it).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

from torch import nn

from zoo.errors import BadInputError

ROBUSTBENCH = "robustbench:"
FACTORY = "factory:"


def kind_of(name: str) -> str:
    """``registry``, ``robustbench`` or ``factory`` for a model string."""
    if name.startswith(ROBUSTBENCH):
        return "robustbench"
    if name.startswith(FACTORY):
        return "factory"
    return "registry"


def default_label(name: str) -> str:
    """The results-folder name of a model string: the RobustBench id, or the factory function's name."""
    if name.startswith(ROBUSTBENCH):
        return name[len(ROBUSTBENCH):]
    if name.startswith(FACTORY):
        return name.rpartition(":")[2]
    return name


def build_factory(name: str, checkpoint: str | Path | None) -> nn.Module:
    """Import and call the factory of ``factory:package.module:function``; load ``checkpoint`` into the result."""
    spec = name[len(FACTORY):]
    module_name, colon, function_name = spec.partition(":")
    fix = "pass --model-factory package.module:function, a callable that takes no arguments and returns an nn.Module"
    if not colon or not module_name or not function_name.isidentifier():
        raise BadInputError(f"cannot read model factory {spec!r}", hint=fix)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:   # as `python -m`, a module in the working folder
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:   # ImportError, or whatever the module raises while importing
        raise BadInputError(f"cannot import {module_name!r} for the model factory ({type(exc).__name__}: {exc})",
                            hint=fix) from None
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise BadInputError(f"{module_name} has no callable {function_name!r}", hint=fix)
    try:
        model = factory()
    except Exception as exc:
        raise BadInputError(f"model factory {spec} raised {type(exc).__name__}: {exc}", hint=fix) from None
    if not isinstance(model, nn.Module):
        raise BadInputError(f"model factory {spec} returned {type(model).__name__}, not a torch.nn.Module",
                            hint=fix)
    if checkpoint is not None:
        from zoo.checkpoint import load_into, read_state_dict
        load_into(model, read_state_dict(checkpoint), origin=str(checkpoint))
    return model


def factory_source(name: str) -> str:
    """Where a factory's code lives, for the record (its module file)."""
    module_name = name[len(FACTORY):].partition(":")[0]
    module = sys.modules.get(module_name)
    try:
        return f"factory {name[len(FACTORY):]} ({inspect.getsourcefile(module)})"
    except TypeError:
        return f"factory {name[len(FACTORY):]}"
