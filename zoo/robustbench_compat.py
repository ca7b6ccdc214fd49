"""RobustBench alongside us, despite its packaging problems.

robustbench 1.1.1 imports ``pkg_resources`` (gone from setuptools >= 81) and ``from autoattack import
AutoAttack`` (fra31's API) while PyPI's AutoAttack installs as ``pyautoattack`` with another API. Importing
this module registers ``autoattack`` as an adapter with fra31's API over pyautoattack
(:mod:`zoo.autoattack_compat`), so ``robustbench.utils.load_model`` and ``robustbench.eval.benchmark`` run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings

from . import autoattack_compat
from .domain import THREAT_TABLE
from .errors import DownloadError, ZooError

_THREATS = {**{t.name: t.robustbench for t in THREAT_TABLE.values()}, "corruptions": "corruptions"}


def import_robustbench():
    """Import robustbench, or raise a ZooError saying exactly what to install."""
    if importlib.util.find_spec("robustbench") is None:
        raise ZooError("RobustBench is not installed",
                       hint="pip install 'score-zoo[robustbench]' (adds robustbench and setuptools<81)")
    if importlib.util.find_spec("pkg_resources") is None:
        raise ZooError("RobustBench needs pkg_resources, which setuptools >= 81 no longer ships",
                       hint="pip install 'setuptools<81'")
    if "autoattack" not in sys.modules and importlib.util.find_spec("autoattack") is None:
        if importlib.util.find_spec("pyautoattack") is None:
            raise ZooError("RobustBench imports AutoAttack, which is not installed", hint="pip install pyautoattack")
        autoattack_compat.install()
    with warnings.catch_warnings():  # its imports warn about pkg_resources and torch.jit: noise for our users
        warnings.simplefilter("ignore")
        return importlib.import_module("robustbench")


def is_robustbench_name(name: str, dataset: str, threat: str) -> bool:
    """True when RobustBench is importable and lists ``name`` for this dataset and threat."""
    try:
        import_robustbench()
        from robustbench.model_zoo import model_dicts
        from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
        return name in model_dicts[BenchmarkDataset(dataset)][ThreatModel(_THREATS.get(threat, threat))]
    except (ZooError, ValueError, KeyError, ImportError):
        return False


def architecture(name: str, dataset: str, threat: str):
    """RobustBench's network for ``name`` with untrained weights (what --dry-run times): nothing downloaded."""
    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel(_THREATS.get(threat, threat))][name]
    return entry["model"]().eval()


def load(name: str, dataset: str, threat: str, device=None):
    robustbench = import_robustbench()
    try:
        model = robustbench.utils.load_model(model_name=name, dataset=dataset,
                                             threat_model=_THREATS.get(threat, threat))
    except Exception as exc:  # RobustBench raises requests/gdown/OS errors of many kinds when a download fails
        raise DownloadError(f"RobustBench could not load {name} ({type(exc).__name__}: {exc})",
                            hint="check the network, or download the weights where RobustBench can and copy its "
                                 "models/ folder here") from None
    if device is not None:
        model = model.to(device)
    return model.eval()


if importlib.util.find_spec("pyautoattack") is not None:
    autoattack_compat.install()   # importing this module is how users ask for the adapter (see the docstring)
