"""Lazy package attributes (as huggingface_hub's ``__init__`` does): a package names what it exports and the
module each comes from; nothing is imported until used, so ``import zoo`` and the reports never load torch."""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any, Callable


def lazy_attributes(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the relative module defining it;
    any other name is tried as a submodule (``zoo.registry`` after a bare ``import zoo``)."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            value = getattr(import_module(exports[name], package), name)
        else:
            try:
                value = import_module(f".{name}", package)
            except ModuleNotFoundError as exc:
                if exc.name != f"{package}.{name}":
                    raise
                raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
