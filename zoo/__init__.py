"""score-zoo: verified SCORE checkpoints and a faithful AutoAttack harness.

    import zoo
    model = zoo.load("score-wrn-28-10")           # eval-mode nn.Module taking [0, 1] NCHW images

Attributes load lazily (like huggingface_hub's ``__init__``): ``import zoo`` and the registry commands do not
import torch; ``zoo.load`` does, on first use.
"""

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("score-zoo")
except metadata.PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"

_LAZY = {"load": ".api", "info": ".registry", "list_models": ".registry", "ZooError": ".errors"}
__all__ = ["load", "info", "list_models", "ZooError", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
    else:   # a submodule (``zoo.registry`` after a bare ``import zoo``), as an eager __init__ would have it
        try:
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'zoo' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
