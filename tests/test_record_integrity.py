"""Tamper-evident records: every reader refuses an edited record, naming the file and the mismatch.

One real tiny evaluation (the trained tiny CNN through --model-factory with --checkpoint, 8 images of a
--data file, APGD-CE, CPU) runs twice per module (seeds 0 and 1, same images); each test edits a copy.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.support import helpers as h
from zoo.evaluate import cli as eval_cli
from zoo.evaluate import integrity
from zoo.evaluate.integrity import LEGACY_NOTE
from zoo.evaluate.record import PerExample, RunRecord
from zoo.evaluate.report.cli import main as report_main
from zoo.errors import RecordError

FACTORY_MODULE = "integrity_tiny_nets"
N = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{seed: results folder} of two finished runs on the same images, plus the shared folder."""
    root = tmp_path_factory.mktemp("integrity")
    (root / f"{FACTORY_MODULE}.py").write_text("from tests.support.helpers import TinyCNN\n\n\ndef tiny():\n"
                                               "    return TinyCNN()\n")
    _, weights, data = h.tiny_cnn_files(root, N, seed=3)
    with pytest.MonkeyPatch.context() as mp, h.one_thread():
        mp.syspath_prepend(str(root))
        mp.setenv("SCORE_ZOO_CACHE", str(root / "cache"))
        for seed in (0, 1):
            assert eval_cli.main(["--model-factory", f"{FACTORY_MODULE}:tiny", "--checkpoint", str(weights),
                                  "--data", str(data), "--version", "custom", "--attacks", "apgd-ce", "--eps",
                                  str(h.TINY_EPS), "--batch-size", "4", "--device", "cpu", "--seed", str(seed),
                                  "--results-dir", str(root / f"results{seed}"), "--no-progress"]) == 0
        yield root
    sys.modules.pop(FACTORY_MODULE, None)


def _paths(results: Path) -> tuple[Path, Path]:
    (json_path,) = results.rglob("*.json")
    return json_path, json_path.with_suffix(".npz")


@pytest.fixture
def copy(runs, tmp_path):
    """A fresh copy of the seed-0 results: (json path, npz path)."""
    shutil.copytree(runs / "results0", tmp_path / "results")
    return _paths(tmp_path / "results")


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _save(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _arrays(path: Path) -> dict:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def _save_arrays(path: Path, arrays: dict) -> None:
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays)


def _reseal(json_path: Path, npz_path: Path) -> None:
    """What a forger who recomputes the .npz hash does."""
    data = _load(json_path)
    data["integrity"]["per_example_sha256"] = hashlib.sha256(npz_path.read_bytes()).hexdigest()
    _save(json_path, data)


def _accuracy(correct: int, total: int) -> dict:
    from zoo.evaluate.record import Accuracy
    return Accuracy(correct, total).to_dict()


# ---------------------------------------------------------------- the edits (each returns the json and npz
# paths a reader should now be given, and a regex the refusal must match besides the file name)

def edit_robust_count(j, z, runs):
    d = _load(j)
    d["robust"]["correct"] += 1
    _save(j, d)
    return j, z, r"robust"


def edit_robust_count_and_percent(j, z, runs):
    d = _load(j)
    new = d["robust"]["correct"] + 1
    d["robust"] = _accuracy(new, N)
    d["stages"][-1]["robust"] = _accuracy(new, N)
    _save(j, d)
    return j, z, r"robust count \d+ in the record, \d+ in the arrays"


def edit_eps(j, z, runs):
    d = _load(j)
    d["eps"], d["eps_value"] = "0.01", 0.01
    _save(j, d)
    return j, z, r"eps differs from the stored configuration"


def edit_dataset(j, z, runs):
    d = _load(j)
    d["dataset"] = "cifar10"
    _save(j, d)
    target = j.parents[3] / "cifar10" / "linf" / "tiny"
    target.mkdir(parents=True)
    return j.rename(target / j.name), z.rename(target / z.name), r"dataset differs from the stored configuration"


def edit_config_hash(j, z, runs):
    d = _load(j)
    d["config_hash"] = "f" * 64
    _save(j, d)
    return j, z, r"config_hash f+\.\.\. is not the hash of the stored configuration"


def edit_checkpoint_sha(j, z, runs):
    d = _load(j)
    d["checkpoint"]["sha256"] = "e" * 64
    _save(j, d)
    return j, z, r"checkpoint_sha256 differs from the stored configuration"


def edit_indices(j, z, runs):
    d = _load(j)
    d["indices"] = list(range(100, 100 + N))
    _save(j, d)
    return j, z, r"indices differs from the stored configuration"


def edit_flip_flag(j, z, runs):
    a = _arrays(z)
    a["robust"][int(np.flatnonzero(a["robust"])[0])] = False
    _save_arrays(z, a)
    return j, z, r"(not the file this record was written with|robust flags disagree)"


def _push_out_of_ball(z):
    a = _arrays(z)
    assert len(a["x_adv"]), "the fixture run must fool at least one example"
    a["x_adv"][0] = np.where(a["x_adv"][0] > 0.5, 0.0, 1.0).astype(np.float32)
    _save_arrays(z, a)


def edit_x_adv_out_of_ball(j, z, runs):
    _push_out_of_ball(z)
    return j, z, r"not the file this record was written with"


def _fool_one_more(j, z):
    a = _arrays(z)
    p = int(np.flatnonzero(a["robust"])[0])
    a["robust"][p], a["broken_by"][p], a["adv_pred"][p] = False, 0, (a["clean_pred"][p] + 1) % 10
    x_clean = np.load(_load(j)["data"]["path"])["x"][p]
    order = np.searchsorted(a["adv_positions"], p)
    a["adv_positions"] = np.insert(a["adv_positions"], order, p)
    a["x_adv"] = np.insert(a["x_adv"], order, x_clean, axis=0)
    _save_arrays(z, a)
    d = _load(j)
    new = d["robust"]["correct"] - 1
    d["robust"] = _accuracy(new, N)
    d["stages"][-1]["robust"] = _accuracy(new, N)
    _save(j, d)


def edit_one_more_fooled(j, z, runs):
    _fool_one_more(j, z)
    return j, z, r"not the file this record was written with"


def edit_delete_npz(j, z, runs):
    z.unlink()
    return j, z, r"(are missing|No such file)"


def edit_swap_other_run_npz(j, z, runs):
    _, other = _paths(runs / "results1")
    shutil.copyfile(other, z)
    return j, z, r"not the file this record was written with"


def edit_truncate_json(j, z, runs):
    text = j.read_text()
    j.write_text(text[: len(text) // 2])
    return j, z, r"cannot read result record"


def edit_x_adv_out_of_ball_resealed(j, z, runs):
    """Beyond the 13: the forger also rewrites the .npz hash; the eps-ball check (clean images from the
    record's data file) still catches it."""
    _push_out_of_ball(z)
    _reseal(j, z)
    return j, z, r"fails the eps-ball check: 1 adversarial image\(s\) exceed the Linf budget"


EDITS = {f.__name__.removeprefix("edit_"): f for f in (
    edit_robust_count, edit_robust_count_and_percent, edit_eps, edit_dataset, edit_config_hash, edit_checkpoint_sha,
    edit_indices, edit_flip_flag, edit_x_adv_out_of_ball, edit_one_more_fooled, edit_delete_npz,
    edit_swap_other_run_npz, edit_truncate_json, edit_x_adv_out_of_ball_resealed)}


def _report(argv, capsys) -> tuple[int, str, str]:
    code = report_main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------- the untouched record passes


def test_untouched_record_passes_every_reader(copy, capsys, monkeypatch):
    j, z = copy
    record, notes = RunRecord.read_checked(j)
    assert notes == [] and record.integrity["per_example_sha256"]
    assert PerExample.read(z).config_hash == record.config_hash
    unpacked = []   # read_with_arrays (gallery, verify) unpacks the .npz once, not once per check
    monkeypatch.setattr(integrity, "load_arrays", lambda *a, _load=integrity.load_arrays: unpacked.append(1)
                        or _load(*a))
    both, arrays = RunRecord.read_with_arrays(j)
    assert both == record and arrays.config_hash == record.config_hash and len(unpacked) == 1
    code, out, err = _report(["leaderboard", "--results", str(j.parents[3]), "--dataset", "custom",
                              "--version", "custom"], capsys)
    assert code == 0 and "tiny" in out and "warning" not in err, err
    code, out, err = _report(["paper", "--results", str(j.parents[3])], capsys)
    assert code == 0 and "warning" not in err, err
    for command in ("model-info", "submission"):   # read fine, then refused for the custom data set only
        code, out, err = _report([command, str(j)], capsys)
        assert code == 2 and "evaluated on custom data" in err, err


# ---------------------------------------------------------------- every edit is refused by every reader


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_edit_is_refused_by_every_reader(edit, copy, runs, capsys):
    j, z, mismatch = edit(*copy, runs)
    results = copy[0].parents[3]
    good_json, good_npz = _paths(runs / "results1")   # an untouched run beside it, so the board is not empty
    shutil.copy2(good_json, copy[0].parent / good_json.name)
    shutil.copy2(good_npz, copy[0].parent / good_npz.name)
    tampered_id = copy[0].stem
    with pytest.raises(RecordError, match=mismatch) as info:
        RunRecord.read(j)
    assert str(j) in str(info.value)
    with pytest.raises(RecordError, match=mismatch) as info:
        PerExample.read(z)
    assert str(z) in str(info.value)
    with pytest.raises(RecordError, match=mismatch):
        RunRecord.read_with_arrays(j)

    # leaderboard and paper: the record is named on stderr and left out; the untouched run is ranked
    code, out, err = _report(["leaderboard", "--results", str(results), "--dataset", "custom",
                              "--version", "custom", "--format", "csv"], capsys)
    assert code == 0 and f"warning: {j}" in err and "-- excluded" in err, err
    assert re.search(mismatch, err) and good_json.stem in out and tampered_id not in out, (err, out)
    code, out, err = _report(["paper", "--results", str(results)], capsys)
    assert code == 0 and f"warning: {j}" in err and "-- excluded" in err, err
    # model-info and submission take records explicitly: a bad one stops the command (exit 2)
    for command in ("model-info", "submission"):
        code, out, err = _report([command, str(j)], capsys)
        assert code == 2 and str(j) in err and out == "", err
        assert "custom data" not in err   # refused as tampered, before anything else


def test_every_listed_edit_is_covered():
    assert len(EDITS) == 14   # the 13 edits, plus the out-of-ball x_adv with a recomputed .npz hash


# ---------------------------------------------------------------- older records


def test_record_without_integrity_fields_is_read_with_a_note(copy, capsys):
    j, z = copy
    d = _load(j)
    del d["integrity"]
    _save(j, d)
    a = _arrays(z)
    del a["config_hash"]
    _save_arrays(z, a)
    record, notes = RunRecord.read_checked(j)
    assert record.integrity is None and notes == [f"{j}: {LEGACY_NOTE}"]
    PerExample.read(z)
    assert RunRecord.read_with_arrays(j)[1].indices.tolist() == list(record.indices)
    a["indices"] = a["indices"][::-1].copy()   # the arrays of another run, beside an unsealed record
    _save_arrays(z, a)
    with pytest.raises(RecordError, match="belongs to another run"):
        RunRecord.read_with_arrays(j)
    code, out, err = _report(["leaderboard", "--results", str(j.parents[3]), "--dataset", "custom",
                              "--version", "custom"], capsys)
    assert code == 0 and "tiny" in out and f"{j}: {LEGACY_NOTE}" in err
    # the checks that need no seal still apply to an old record
    d["robust"]["percent"] = 99.0
    _save(j, d)
    with pytest.raises(RecordError, match=r"robust accuracy says 99.0%"):
        RunRecord.read(j)


def test_sealed_arrays_beside_an_unsealed_record_are_refused(copy):
    j, z = copy
    d = _load(j)
    del d["integrity"]
    _save(j, d)
    with pytest.raises(RecordError, match="sealed arrays beside an unsealed record"):
        PerExample.read(z)


# ---------------------------------------------------------------- zoo-eval verify


@pytest.fixture
def factory_on_path(runs, monkeypatch):
    monkeypatch.syspath_prepend(str(runs))
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(runs / "cache"))


def _verify(path, capsys) -> tuple[int, str, str]:
    with h.one_thread():
        code = eval_cli.main(["verify", str(path), "--device", "cpu"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_verify_passes_on_the_untouched_record(copy, factory_on_path, capsys):
    j, _ = copy
    code, out, err = _verify(j, capsys)
    assert code == 0 and f"{j}: verified" in out, err


def test_verify_fails_on_an_edited_x_adv(copy, factory_on_path, capsys):
    j, z = copy
    _push_out_of_ball(z)
    code, out, err = _verify(j, capsys)
    assert code == 2 and str(j) in err and "not the file this record was written with" in err


def test_verify_catches_a_consistent_forgery_the_readers_accept(copy, factory_on_path, capsys):
    """x_adv of a fooled point put back to its clean image (inside the ball), the .npz hash recomputed:
    nothing a reader checks without the model changes, but the model classifies it correctly."""
    j, z = copy
    a = _arrays(z)
    x_clean = np.load(_load(j)["data"]["path"])["x"]
    a["x_adv"][0] = x_clean[a["adv_positions"][0]]
    _save_arrays(z, a)
    _reseal(j, z)
    RunRecord.read(j)   # the readers cannot tell: this is not a signature
    code, out, err = _verify(j, capsys)
    assert code == 2 and f"{j}: verification failed" in err and "robust flags of 1 example(s)" in err, err


def test_verify_catches_one_more_fooled_point_forged_consistently(copy, factory_on_path, capsys):
    j, z = copy
    _fool_one_more(j, z)
    _reseal(j, z)
    RunRecord.read(j)
    code, out, err = _verify(j, capsys)
    assert code == 2 and "verification failed" in err and "robust flags of 1 example(s)" in err, err


def test_in_memory_module_verifies_from_python_only(tmp_path, monkeypatch, capsys):
    from zoo.evaluate import run, verify_record

    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    x, y = h.synthetic_images(4, seed=3)
    data = h.write_npz(tmp_path / "d.npz", x, y)
    with h.one_thread():
        record = run(h.train_tiny_cnn(), data=str(data), version="custom", attacks=("apgd-ce",), eps=h.TINY_EPS,
                     batch_size=4, device="cpu", results_dir=str(tmp_path / "results"), progress=False)
    (j,) = (tmp_path / "results").rglob("*.json")
    code, out, err = _verify(j, capsys)
    assert code == 2 and "in-memory module" in err and "verify_record(path, model=" in err
    with h.one_thread():
        verified = verify_record(j, model=h.train_tiny_cnn(), device="cpu")
    assert verified.record.run_id == record.run_id and verified.examples == 4


# ---------------------------------------------------------------- clean images for the eps-ball check


def _fake_record(data: dict, dataset: str, indices):
    from types import SimpleNamespace
    return SimpleNamespace(data=data, dataset=dataset, indices=tuple(indices))


def test_clean_images_from_a_torchvision_folder_only_after_its_md5(tmp_path, monkeypatch):
    import pickle

    from zoo.evaluate import integrity

    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (10, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 10).tolist()
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": raw, "labels": labels}))
    x = raw.reshape(-1, 3, 32, 32)[:6].astype(np.float32) / np.float32(255)
    data = {"source": "torchvision", "path": str(folder), "n": 6,
            "content_sha256": integrity.content_sha256(x, np.asarray(labels[:6]))}
    record = _fake_record(data, "cifar10", range(6))
    got, why = integrity._clean_images(record)
    assert got is None and "not the published cifar10 test file (md5 differs)" in why   # never unpickled
    md5 = hashlib.md5((folder / "test_batch").read_bytes()).hexdigest()
    monkeypatch.setitem(integrity.CIFAR_TEST_FILES, "cifar10", ("test_batch", md5, "labels"))
    got, why = integrity._clean_images(record)
    assert why == "" and np.array_equal(got, x)
    got, why = integrity._clean_images(_fake_record({**data, "content_sha256": "0" * 64}, "cifar10", range(6)))
    assert got is None and "content sha256 differs" in why


def test_clean_images_from_a_data_file_must_have_the_recorded_content(runs, tmp_path):
    from zoo.evaluate import integrity

    j, _ = _paths(runs / "results0")
    record = RunRecord.read(j)
    got, why = integrity._clean_images(record)
    assert why == "" and got.shape == (N, 3, 32, 32)
    other = tmp_path / "d.npz"
    x, y = h.synthetic_images(N, seed=4)
    h.write_npz(other, x, y)
    got, why = integrity._clean_images(_fake_record({**record.data, "path": str(other)}, "custom", record.indices))
    assert got is None and "content sha256 differs" in why
