"""score-zoo: verified SCORE checkpoints and a faithful AutoAttack harness.

    import zoo
    model = zoo.load("score-wrn-28-10")           # eval-mode nn.Module taking [0, 1] NCHW images

Attributes load lazily (like huggingface_hub's ``__init__``): ``import zoo`` and the registry commands do not
import torch; ``zoo.load`` does, on first use.
"""

from importlib import metadata

from ._lazy import lazy_attributes

try:
    __version__ = metadata.version("score-zoo")
except metadata.PackageNotFoundError:   # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["load", "info", "list_models", "ZooError", "__version__"]
__getattr__, __dir__ = lazy_attributes(__name__, {"load": ".api", "info": ".registry", "list_models": ".registry",
                                                  "ZooError": ".errors"})
