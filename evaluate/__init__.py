"""AutoAttack evaluation harness (installed as ``zoo.evaluate``): ``run``, ``plan``, ``merge``.

Attributes load lazily, so ``zoo.evaluate.record`` (read by the reports and ``zoo publish``) can be imported
without the runner, the attacks or torch.
"""

from importlib import import_module
from typing import Any

_LAZY = {"run": ".runner", "plan": ".runner", "merge": ".runner", "RunOptions": ".options",
         "RunRecord": ".record", "PerExample": ".record"}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
    else:   # a submodule (``zoo.evaluate.runner`` after ``import zoo.evaluate``), as an eager __init__ gives
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'zoo.evaluate' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
