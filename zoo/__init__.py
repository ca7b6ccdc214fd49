"""score-zoo: verified SCORE checkpoints and a faithful AutoAttack harness.

    import zoo
    model = zoo.load("score-wrn-28-10")           # eval-mode nn.Module taking [0, 1] NCHW images
"""

from .api import load
from .errors import ZooError
from .registry import info, list_models

__version__ = "0.1.0"
__all__ = ["load", "info", "list_models", "ZooError", "__version__"]
