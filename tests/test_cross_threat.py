"""Any checkpoint under any norm: a registry checkpoint trained for one threat evaluated under another, the
record naming both (tiny registry: cifar10 linf + l2, cifar100 linf)."""

import json

import pytest

from tests.support import helpers as h
from zoo.errors import BadInputError, UnknownVariantError
from zoo.evaluate import cli
from zoo.evaluate.prepare import prepare
from zoo.evaluate.options import RunOptions


def _options(tmp_path, data_file, **kw):
    return RunOptions.build(data=str(data_file), version="custom", attacks=("apgd-ce",), batch_size=3, device="cpu",
                            results_dir=str(tmp_path / "results"), progress=False, **kw)


def test_the_only_checkpoint_of_a_dataset_is_evaluated_under_another_threat(tmp_path, monkeypatch):
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    ckpt100 = h.tiny_wrn_checkpoint(tmp_path, num_classes=100)
    setup = prepare(h.TINY_REGISTRY_MODEL, _options(tmp_path, data_file, dataset="cifar100", threat="l2",
                                                    checkpoint=str(ckpt100)))
    assert setup.opts.trained_threat == "linf" and setup.norm == "L2" and setup.eps == 0.5   # l2's default eps
    assert setup.reported == {}   # the registry's reported accuracies are for the trained threat


def test_several_checkpoints_and_none_for_the_threat_ask_which(tmp_path, monkeypatch):
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    with pytest.raises(UnknownVariantError, match="--trained-threat"):
        prepare(h.TINY_REGISTRY_MODEL, _options(tmp_path, data_file, threat="l1", checkpoint=str(ckpt)))
    with pytest.raises(BadInputError, match="trained threat"):
        prepare(h.TINY_REGISTRY_MODEL, _options(tmp_path, data_file, threat="l1", trained_threat="corruptions",
                                                checkpoint=str(ckpt)))


def test_trained_threat_picks_the_checkpoint_and_the_record_names_both(tmp_path, monkeypatch):
    ckpt, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch, n=3)
    same = prepare(h.TINY_REGISTRY_MODEL, _options(tmp_path, data_file, threat="l2", checkpoint=str(ckpt)))
    cross = prepare(h.TINY_REGISTRY_MODEL, _options(tmp_path, data_file, threat="l2", trained_threat="linf",
                                                    checkpoint=str(ckpt)))
    assert same.opts.trained_threat == "l2" and cross.opts.trained_threat == "linf"
    assert same.config_hash != cross.config_hash
    code = cli.main(["--model", h.TINY_REGISTRY_MODEL, "--checkpoint", str(ckpt), "--data", str(data_file),
                     "--threat", "l1", "--eps", "1", "--trained-threat", "linf", "--attacks", "apgd-ce",
                     "--batch-size", "3", "--device", "cpu", "--results-dir", str(tmp_path / "results"),
                     "--no-progress"])
    assert code == 0
    [path] = (tmp_path / "results").rglob("*.json")
    doc = json.loads(path.read_text())
    assert (doc["threat"], doc["norm"], doc["trained_threat"], doc["schema_version"]) == ("l1", "L1", "linf", 2)


def test_autoattack_refuses_threat_corruptions_in_prepare(tmp_path, monkeypatch):
    _, data_file, _, _ = h.tiny_registry_inputs(tmp_path, monkeypatch)
    with pytest.raises(BadInputError, match="no norm ball"):
        prepare(h.train_tiny_cnn(), _options(tmp_path, data_file, threat="corruptions"))
