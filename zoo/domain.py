"""The domain in one table: threat models, data sets and precisions, with every spelling we meet.

AutoAttack writes a norm ``Linf``, RobustBench a threat model ``Linf`` and a data set ``cifar10``, our records
``linf``; each of these facts lives here once (like RobustBench's ``enums.py``) and every module reads it.
Pure Python: importing it costs nothing (the registry and the report commands use it without torch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Threat:
    name: str            # our spelling: linf
    norm: str            # AutoAttack's: Linf
    robustbench: str     # RobustBench's ThreatModel value: Linf
    default_eps: str     # the usual budget on CIFAR ("" where there is no budget)
    kind: str = "norm"   # "norm": an eps-ball attacked by AutoAttack; "corruptions": fixed corrupted test sets


@dataclass(frozen=True)
class Dataset:
    name: str                          # our and RobustBench's spelling: cifar10
    label: str                         # as printed in tables: CIFAR-10
    num_classes: int
    test_size: int
    mean: tuple[float, float, float]   # per-channel statistics of the training images
    std: tuple[float, float, float]
    torchvision_class: str             # torchvision.datasets class
    archive: str                       # the file torchvision downloads
    folder: str                        # the folder it unpacks to


THREAT_TABLE: dict[str, Threat] = {t.name: t for t in (
    Threat("linf", "Linf", "Linf", "8/255"),
    Threat("l2", "L2", "L2", "0.5"),
    Threat("l1", "L1", "L1", "12"),
    # CIFAR-10-C / CIFAR-100-C (Hendrycks & Dietterich, ICLR 2019): no norm, no eps (zoo.evaluate.corruptions)
    Threat("corruptions", "", "corruptions", "", kind="corruptions"),
)}

DATASET_TABLE: dict[str, Dataset] = {d.name: d for d in (
    Dataset("cifar10", "CIFAR-10", 10, 10_000, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616),
            "CIFAR10", "cifar-10-python.tar.gz", "cifar-10-batches-py"),
    Dataset("cifar100", "CIFAR-100", 100, 10_000, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
            "CIFAR100", "cifar-100-python.tar.gz", "cifar-100-python"),
)}

THREATS: tuple[str, ...] = tuple(THREAT_TABLE)
DATASETS: tuple[str, ...] = tuple(DATASET_TABLE)

#: Arithmetic an evaluation may attack in: exact fp32, TF32 tensor cores, or bf16 autocast (checked in fp32).
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16")

#: The threats with a norm ball (what AutoAttack attacks and a checkpoint can be trained for).
NORM_THREATS: tuple[str, ...] = tuple(t.name for t in THREAT_TABLE.values() if t.kind == "norm")

#: AutoAttack's norm spelling for each norm threat (``linf`` -> ``Linf``).
NORMS: dict[str, str] = {t.name: t.norm for t in THREAT_TABLE.values() if t.kind == "norm"}


def parse_eps(value: str | float | int) -> float:
    """'8/255' -> 0.0313...; plain numbers pass through. Raises ValueError on anything else (nan, inf too)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    else:
        numerator, slash, denominator = str(value).strip().partition("/")
        try:
            result = float(numerator) / float(denominator) if slash else float(numerator)
        except (ValueError, ZeroDivisionError) as exc:
            raise ValueError(f"cannot parse eps {value!r}: use a number or a fraction like 8/255") from exc
    if not math.isfinite(result):
        raise ValueError(f"cannot parse eps {value!r}: use a finite number or a fraction like 8/255")
    return result


#: Budgets on the 1/255 pixel grid: RobustBench's model_info files write 8/255 both as "8/255" and as "0.031".
PIXEL_STEPS = 255
PIXEL_GRID_TOLERANCE = 1e-3


def snap_to_pixel_grid(value: float, tolerance: float = PIXEL_GRID_TOLERANCE) -> float:
    """k/255 when ``value`` is within ``tolerance`` of it (0.031 -> 8/255), else ``value`` unchanged.

    The grid step (0.0039) is more than twice the tolerance, so at most one k can match."""
    steps = round(value * PIXEL_STEPS)
    if steps >= 1 and abs(value - steps / PIXEL_STEPS) <= tolerance:
        return steps / PIXEL_STEPS
    return value


#: Class names by label, for pictures of examples (torchvision's spelling). CIFAR-100's hundred names come from
#: the data set's own meta file when it is read through torchvision.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
}
