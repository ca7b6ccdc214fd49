"""``zoo.load``: registry entry -> verified weights -> eval-mode network."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from . import registry
from .checkpoint import load_into, read_state_dict
from .errors import UnknownModelError
from .fetch import Fetched, fetch, fetch_local
from .models import build_model


def load(name: str, dataset: str = "cifar10", threat: str = "linf", device: str | torch.device | None = None,
         revision: str | None = None, checkpoint: str | Path | None = None) -> nn.Module:
    """The trained network ``name`` for ``dataset``/``threat``, in eval mode, taking [0, 1] NCHW images.

    ``checkpoint=PATH`` overrides every download source. RobustBench ids are aliases for registry names;
    other RobustBench models load through RobustBench when the ``robustbench`` extra is installed.
    The returned module carries ``checkpoint_info`` (source, path, sha256) for result records.
    """
    try:
        model_info = registry.info(name)
    except UnknownModelError:
        from . import robustbench_compat
        if checkpoint is None and robustbench_compat.is_robustbench_name(name, dataset, threat):
            return robustbench_compat.load(name, dataset, threat, device)
        raise
    variant = model_info.variant(dataset, threat)
    fetched: Fetched = fetch_local(checkpoint, variant) if checkpoint is not None else \
        fetch(model_info, variant, revision)
    net = build_model(model_info, variant)
    load_into(net, read_state_dict(fetched.path), origin=str(fetched.path))
    net.checkpoint_info = fetched
    if device is not None:
        net = net.to(device)
    return net.eval()
