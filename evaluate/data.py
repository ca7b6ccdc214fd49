"""Evaluation images: the CIFAR test sets via torchvision, or a user's ``.npz`` file.

Whatever the source, the runner gets contiguous NCHW float32 in [0, 1] (pyautoattack's APGD-T crashes on
channels-last strides) and int64 labels, plus a content hash so a resumed run can prove it sees the same
images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo import constants
from zoo.domain import DATASET_TABLE, Dataset
from zoo.errors import BadInputError, DataError, DownloadError, OfflineError
from zoo.fileio import sha256_file

from .integrity import content_sha256



@dataclass(frozen=True)
class EvalData:
    x: torch.Tensor               # (n, C, H, W) float32, contiguous, in [0, 1]
    y: torch.Tensor               # (n,) int64
    indices: tuple[int, ...]      # positions in the source data set
    dataset: str                  # cifar10 | cifar100 | custom
    num_classes: int | None       # known for CIFAR; for files, the model decides
    source: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def content_sha256(self) -> str:
        return self.source["content_sha256"]


def default_data_dir() -> Path:
    return constants.cache_dir() / "data"


def load(dataset: str = "cifar10", n_ex: int | None = None, data: str | Path | None = None,
         data_dir: str | Path | None = None, data_root: str | Path | None = None) -> EvalData:
    """The first ``n_ex`` test images of ``dataset`` (from ``data_root`` when given, else from ``data_dir``,
    downloading there if needed), or of the file ``data``."""
    given = [name for name, value in (("--data", data), ("--data-dir", data_dir), ("--data-root", data_root))
             if value is not None]
    if len(given) > 1:
        raise DataError(f"{' and '.join(given)} both say where the images are", hint="pass only one of them")
    if data is not None:
        return load_file(data, n_ex)
    if data_root is not None:
        return load_cifar_root(dataset, n_ex, data_root)
    return load_cifar(dataset, n_ex, data_dir)


def for_planning(dataset: str, n_ex: int | None, data: str | Path | None, data_dir: str | Path | None,
                 data_root: str | Path | None) -> EvalData:
    """What --dry-run needs to know about the data without downloading it: a local file is read; for CIFAR,
    the count and image shape (blank images: planning times the model, it does not classify)."""
    if data is not None or data_root is not None:
        return load(dataset, n_ex, data, data_dir, data_root)
    entry, n = _cifar(dataset, n_ex)
    x = torch.zeros(1, 3, 32, 32).expand(n, 3, 32, 32)   # a view: no memory for n images
    source = {"source": "torchvision", "name": dataset, "path": None, "sha256": None, "n": n,
              "content_sha256": None, "planned": True}
    return EvalData(x=x, y=torch.zeros(n, dtype=torch.int64), indices=tuple(range(n)), dataset=dataset,
                    num_classes=entry.num_classes, source=source)


def _cifar(dataset: str, n_ex: int | None) -> tuple[Dataset, int]:
    """The data set's table entry and how many of its test images to take; unknown names fail here."""
    if dataset not in DATASET_TABLE:
        raise DataError(f"unknown dataset {dataset!r}", hint=f"use one of {sorted(DATASET_TABLE)}, "
                                                             "or --data FILE.npz for your own images")
    entry = DATASET_TABLE[dataset]
    return entry, _check_n_ex(entry.test_size if n_ex is None else n_ex, entry.test_size, f"the {dataset} test set")


def _check_n_ex(n_ex: int | None, available: int, what: str) -> int:
    if n_ex is None:
        return available
    if isinstance(n_ex, bool) or not isinstance(n_ex, (int, np.integer)) or n_ex <= 0:
        raise DataError(f"--n-ex must be a positive integer, got {n_ex!r}")
    if n_ex > available:
        raise DataError(f"--n-ex {n_ex} is larger than {what}, which has {available} images",
                            hint=f"pass --n-ex {available} or less")
    return int(n_ex)


def load_cifar(dataset: str, n_ex: int | None = None, data_dir: str | Path | None = None) -> EvalData:
    entry, n_ex = _cifar(dataset, n_ex)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    cls_name, archive, folder = entry.torchvision_class, entry.archive, entry.folder
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    fix = (f"download {archive} from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it into {root} "
           f"(so that {root / folder} exists), pass --data-dir to a folder holding {folder}, "
           f"or pass --data FILE.npz with your own images")
    try:
        ds = cls(root=str(root), train=False, download=False)
    except RuntimeError:  # not there (or damaged): torchvision says "Dataset not found or corrupted"
        if constants.hf_offline():
            raise OfflineError(f"the {dataset} test set is not in {root} and offline mode is on "
                               "(HF_HUB_OFFLINE)", hint=fix) from None
        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = cls(root=str(root), train=False, download=True)
        except Exception as exc:  # URLError, HTTPError, OSError, checksum RuntimeError: all mean "no data"
            raise DownloadError(f"could not download the {dataset} test set into {root} "
                                f"({type(exc).__name__}: {exc})", hint=fix) from None
    source = {"source": "torchvision", "name": dataset, "path": str(root / folder), "sha256": None}
    return _from_torchvision(ds, n_ex, dataset, source)


def load_cifar_root(dataset: str, n_ex: int | None, data_root: str | Path) -> EvalData:
    """The test set from an existing torchvision CIFAR folder (a cluster's local copy); never downloads.

    torchvision checks every file of the folder against the published md5 sums before reading; the record
    keeps the sha256 of each test file, so the run counts as the real data set (RobustBench-eligible).
    """
    entry, n_ex = _cifar(dataset, n_ex)
    cls_name, archive, folder = entry.torchvision_class, entry.archive, entry.folder
    root = Path(data_root).expanduser().resolve()
    if root.name == folder:   # the unpacked folder itself was named
        root = root.parent
    import torchvision

    cls = getattr(torchvision.datasets, cls_name)
    try:
        ds = cls(root=str(root), train=False, download=False)
    except RuntimeError:   # "Dataset not found or corrupted": a file is missing or fails its md5
        raise DataError(f"{root / folder} is not a complete, intact torchvision {dataset} folder (a file is missing "
                        "or fails its published md5)", hint=f"point --data-root at the folder holding {folder} (the "
                                                             f"unpacked {archive}), or drop it to download") from None
    files = {name: sha256_file(root / folder / name) for name, _ in cls.test_list}
    source = {"source": "torchvision", "name": dataset, "path": str(root / folder), "sha256": None,
              "files_sha256": files, "verified": "torchvision md5 of every file"}
    return _from_torchvision(ds, n_ex, dataset, source)


def _from_torchvision(ds, n_ex: int, dataset: str, source: dict[str, Any]) -> EvalData:
    x = _from_uint8_nhwc(np.asarray(ds.data[:n_ex]))
    y = np.asarray(ds.targets[:n_ex], dtype=np.int64)
    return _finish(x, y, dataset, DATASET_TABLE[dataset].num_classes, source)


def load_file(path: str | Path, n_ex: int | None = None) -> EvalData:
    """A user's ``.npz`` with ``x`` (uint8 NHWC 0-255 or float NCHW in [0, 1]) and integer labels ``y``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist", hint="pass the path of an .npz file with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(f"data file {path} has no array(s) {missing} (it has {npz.files})",
                                    hint="save it with np.savez(path, x=images, y=labels)")
            x_raw, y_raw = npz["x"], npz["y"]
    except BadInputError:
        raise
    except Exception as exc:  # zipfile/pickle/format errors
        raise DataError(f"data file {path} is not a readable .npz ({type(exc).__name__}: {exc})",
                            hint="save it with np.savez(path, x=images, y=labels)") from None
    where = f"data file {path}"
    if x_raw.ndim != 4:
        raise DataError(f"{where}: x must be 4-dimensional (N images), got shape {x_raw.shape}")
    if y_raw.ndim != 1 or len(y_raw) != len(x_raw):
        raise DataError(f"{where}: y must be a 1-D array with one label per image; "
                            f"x has {len(x_raw)} images, y has shape {y_raw.shape}")
    if not np.issubdtype(y_raw.dtype, np.integer):
        raise DataError(f"{where}: y must hold integer class labels, got dtype {y_raw.dtype}")
    if len(y_raw) and y_raw.min() < 0:
        raise DataError(f"{where}: y holds negative labels (min {y_raw.min()})")
    n_ex = _check_n_ex(n_ex, len(x_raw), where)
    x_raw, y_raw = x_raw[:n_ex], y_raw[:n_ex]
    if x_raw.dtype == np.uint8:
        if x_raw.shape[-1] not in (1, 3):
            raise DataError(f"{where}: uint8 images must be NHWC with 1 or 3 channels last, got shape "
                                f"{x_raw.shape}", hint="or store float32 NCHW images in [0, 1]")
        x = _from_uint8_nhwc(x_raw)
    elif np.issubdtype(x_raw.dtype, np.floating):
        if x_raw.shape[1] not in (1, 3):
            raise DataError(f"{where}: float images must be NCHW with 1 or 3 channels, got shape "
                                f"{x_raw.shape}", hint="or store uint8 NHWC images in 0-255")
        if not np.all(np.isfinite(x_raw)):
            raise DataError(f"{where}: x contains NaN or infinite values")
        if x_raw.min() < 0 or x_raw.max() > 1:
            raise DataError(f"{where}: float images must lie in [0, 1], got [{x_raw.min():g}, {x_raw.max():g}]",
                                hint="divide 0-255 images by 255")
        x = torch.from_numpy(np.ascontiguousarray(x_raw, dtype=np.float32))
    else:
        raise DataError(f"{where}: x must be uint8 (0-255, NHWC) or float (0-1, NCHW), got dtype {x_raw.dtype}")
    source = {"source": "file", "name": path.name, "path": str(path.resolve()), "sha256": sha256_file(path)}
    return _finish(x, y_raw.astype(np.int64), "custom", None, source)


def check_labels(data: EvalData, num_classes: int) -> None:
    """Every label must be a class the model can output."""
    if len(data) and int(data.y.max()) >= num_classes:
        bad = int((data.y >= num_classes).sum())
        raise DataError(f"{bad} label(s) in the data are >= {num_classes}, the model's number of classes "
                            f"(largest label {int(data.y.max())})",
                            hint="check that the data set matches the model (CIFAR-10 vs CIFAR-100)")


def _from_uint8_nhwc(x: np.ndarray) -> torch.Tensor:
    # .contiguous() after permute: channels-last strides crash pyautoattack's APGD-T.
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div(255).contiguous()


def _finish(x: torch.Tensor, y: np.ndarray, dataset: str, num_classes: int | None, source: dict) -> EvalData:
    x = x.contiguous()
    y_t = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    source = {**source, "n": int(len(y_t)), "content_sha256": content_sha256(x.numpy(), y_t.numpy())}
    return EvalData(x=x, y=y_t, indices=tuple(range(len(y_t))), dataset=dataset, num_classes=num_classes,
                    source=source)
