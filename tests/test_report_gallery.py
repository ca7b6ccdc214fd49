"""`zoo-report gallery`: fooled examples drawn from a small record written here, with a `file` data source."""

from __future__ import annotations

import base64
import re
from dataclasses import replace

import numpy as np
import pytest
from zoo.evaluate.record import PerExample, per_example_path
from zoo.evaluate.report.cli import main

from tests.support.helpers import run_without_torch
from tests.support.reports import make_record
from zoo.fileio import sha256_file

pytest.importorskip("matplotlib")

N, EPS = 12, 8 / 255


def write_run(root, broken_by=(0, -1, 1, -1, 2, 0, -1, 3, -2, -1, -2, 1)):
    """A 12-image run on a uint8 .npz: ``broken_by`` -1 = robust, -2 = misclassified from the start."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N, 32, 32, 3), dtype=np.uint8)
    y = np.arange(N, dtype=np.int64) % 10
    data = root / "mine.npz"
    np.savez(data, x=x, y=y)
    broken = np.array(broken_by, dtype=np.int16)
    clean_correct = broken != -2
    broken[broken == -2] = -1
    fooled = broken >= 0
    positions = np.flatnonzero(fooled)
    x_float = x.transpose(0, 3, 1, 2).astype(np.float32) / 255
    sign = np.where(rng.random(x_float[positions].shape) < 0.5, -1, 1).astype(np.float32)
    x_adv = np.clip(x_float[positions] + EPS * sign, 0, 1)
    clean_pred = np.where(clean_correct, y, (y + 1) % 10)
    adv_pred = np.where(fooled, (y + 3) % 10, -1)
    record = replace(make_record(n=N, clean=int(clean_correct.sum()), robust=int((clean_correct & ~fooled).sum()),
                                 stages=tuple(int(clean_correct.sum() - (fooled & (broken <= k)).sum())
                                              for k in range(4)), run_id="gallery-run"),
                     data={"source": "file", "path": str(data), "sha256": sha256_file(data)})
    path = record.write(root / "results")
    PerExample(indices=np.arange(N), clean_correct=clean_correct, robust=clean_correct & ~fooled, broken_by=broken,
               clean_pred=clean_pred, adv_pred=adv_pred, adv_positions=positions,
               x_adv=x_adv.astype(np.float32)).write(per_example_path(path))
    return path, data


def test_gallery_png_and_self_contained_html(tmp_path, capsys):
    path, _ = write_run(tmp_path)
    out = tmp_path / "gal"
    assert main(["gallery", str(path), "-n", "3", "-o", str(out)]) == 0
    assert (out / "gallery.png").read_bytes().startswith(b"\x89PNG")
    page = (out / "gallery.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and not re.search(r"(src|href)=\"(?!data:)", page)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 9 and all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    # the first three fooled examples (positions 0, 2, 4), their labels and the attack that broke each
    assert [int(i) for i in re.findall(r"<tr><td>(\d+)</td>", page)] == [0, 2, 4]
    assert "true: airplane" in page and "now: cat" in page and "broken by apgd-ce" in page
    assert "true: bird" in page and "broken by apgd-t" in page and "broken by fab-t" in page
    assert "3 of 6 fooled examples" in page and "perturbation ×" in page
    assert "wrote" in capsys.readouterr().err


def test_default_count_and_folder(tmp_path, monkeypatch):
    path, _ = write_run(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["gallery", str(path)]) == 0
    page = (tmp_path / "gallery" / "gallery-run" / "gallery.html").read_text()
    assert len(re.findall(r"<tr><td>", page)) == 6  # all six fooled examples (fewer than the default 8)


def test_missing_or_changed_data_source_is_named(tmp_path, capsys):
    path, data = write_run(tmp_path)
    data.rename(tmp_path / "elsewhere.npz")
    assert main(["gallery", str(path), "-o", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert f"the data file of run gallery-run, {data}, is missing" in err and "fix:" in err
    np.savez(data, x=np.zeros((N, 32, 32, 3), np.uint8), y=np.zeros(N, np.int64))
    assert main(["gallery", str(path), "-o", str(tmp_path / "g")]) == 2
    assert "has changed since run gallery-run" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_missing_torchvision_folder_is_named(tmp_path, capsys):
    path, _ = write_run(tmp_path)
    record_text = path.read_text()
    folder = str(tmp_path / "cifar" / "cifar-10-batches-py")
    path.write_text(re.sub(r'"data": \{[^}]*\}', f'"data": {{"source": "torchvision", "name": "cifar10", '
                           f'"path": "{folder}", "sha256": null}}', record_text))
    assert main(["gallery", str(path), "-o", str(tmp_path / "g")]) == 2
    assert f"the CIFAR folder of run gallery-run, {folder}, is missing" in capsys.readouterr().err


def test_missing_arrays_and_nothing_fooled(tmp_path, capsys):
    path, _ = write_run(tmp_path, broken_by=(-1,) * N)
    assert main(["gallery", str(path)]) == 2
    assert "no attack fooled any example" in capsys.readouterr().err
    per_example_path(path).unlink()
    assert main(["gallery", str(path)]) == 2
    assert "gallery-run.npz are missing" in capsys.readouterr().err


def test_gallery_does_not_import_torch_for_a_file_source(tmp_path):
    path, _ = write_run(tmp_path)
    run_without_torch("zoo.evaluate.report.cli", ["gallery", str(path), "-n", "2", "-o", "g"], tmp_path)
    assert (tmp_path / "g" / "gallery.png").exists()


def test_torchvision_source_read_without_download(tmp_path, monkeypatch):
    """A CIFAR-10 folder in torchvision's layout (test_batch + batches.meta pickles) made from the run's images;
    torchvision's md5 check is switched off since these are not the real files."""
    import pickle

    torchvision = pytest.importorskip("torchvision")
    path, data = write_run(tmp_path)
    with np.load(data) as npz:
        x, y = npz["x"], npz["y"]
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    flat = x.transpose(0, 3, 1, 2).reshape(N, -1)  # CIFAR's row layout: all R, then G, then B
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({"data": flat, "labels": y.tolist()}, fh)
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": names}, fh)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    text = re.sub(r'"data": \{[^}]*\}', f'"data": {{"source": "torchvision", "name": "cifar10", "path": "{folder}", '
                  '"sha256": null}', path.read_text())
    path.write_text(text)
    assert main(["gallery", str(path), "-n", "2", "-o", str(tmp_path / "g")]) == 0
    page = (tmp_path / "g" / "gallery.html").read_text()
    assert "true: plane" in page and "now: cat" in page  # class names from the data set's own meta file
