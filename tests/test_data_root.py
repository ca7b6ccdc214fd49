"""--data-root: a local torchvision CIFAR folder counts as the real data set, with its files' checksums."""

import pickle

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from zoo.errors import DataError
from zoo.evaluate import data as data_mod
from zoo.evaluate import run


def _cifar10_folder(root, n=12):
    """A stand-in in torchvision's CIFAR-10 layout (test_batch + batches.meta); its md5 cannot match the
    published one, so tests that read it patch torchvision's integrity check (and one test does not)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": images, "labels": labels}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)
    return folder, images, labels


@pytest.fixture
def trusted(monkeypatch):
    """torchvision's md5 checks (of the data files and of the metadata file) pass for the stand-in."""
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)


def test_a_local_copy_is_recorded_as_cifar10_with_checksums(tmp_path, trusted):
    folder, images, labels = _cifar10_folder(tmp_path / "cifar")
    data = data_mod.load("cifar10", 5, data_root=tmp_path / "cifar")
    assert data.dataset == "cifar10" and data.num_classes == 10 and len(data) == 5
    expected = torch.from_numpy(images[:5].reshape(5, 3, 32, 32)).float().div(255)
    assert torch.equal(data.x, expected) and data.y.tolist() == labels[:5]
    assert set(data.source["files_sha256"]) == {"test_batch"} and data.source["path"] == str(folder.resolve())
    assert data_mod.load("cifar10", 5, data_root=folder).content_sha256 == data.content_sha256   # the folder itself


def test_run_on_a_local_copy_writes_a_cifar10_record(tmp_path, trusted):
    _cifar10_folder(tmp_path / "cifar")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    record = run(model, data_root=tmp_path / "cifar", n_ex=4, version="custom", attacks=["apgd-ce"], eps="1/255",
                 device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run", model_label="lin",
                 progress=False)
    assert record.dataset == "cifar10" and record.data["files_sha256"]["test_batch"]
    assert record.relative_path().parts[0] == "cifar10"


def test_a_folder_failing_torchvisions_check_is_refused(tmp_path):
    _cifar10_folder(tmp_path / "cifar")   # no training batches, and md5 sums that are not CIFAR's
    with pytest.raises(DataError, match="not a complete, intact torchvision cifar10 folder") as info:
        data_mod.load("cifar10", 5, data_root=tmp_path / "cifar")
    assert "--data-root" in str(info.value)


def test_only_one_data_location(tmp_path):
    with pytest.raises(DataError, match="--data and --data-root both say where the images are"):
        data_mod.load("cifar10", 5, data=tmp_path / "d.npz", data_root=tmp_path)
