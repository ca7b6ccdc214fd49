"""Inputs that used to crash or pass silently: each now stops with a message naming the problem and the fix."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from zoo import cli as zoo_cli
from zoo import registry
from zoo.errors import BadInputError, RecordError, RunStateError
from zoo.evaluate import cli as eval_cli
from zoo.evaluate.options import RunOptions
from zoo.evaluate.prepare import prepare
from zoo.evaluate.record import RunRecord
from zoo.evaluate.state import ShardState


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(4, 3, 8, 8)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=np.zeros(4, np.int64))
    return model, RunOptions(data=str(data), device="cpu", results_dir=str(tmp_path / "results"), model_label="net")


def test_broken_registry_yaml_is_named_with_its_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "reg.yaml"
    bad.write_text("models:\n  a: [1, 2\n  b: 3\n")
    monkeypatch.setenv("SCORE_ZOO_REGISTRY", str(bad))
    registry._load.cache_clear()
    try:
        assert zoo_cli.main(["ls"]) == 2
    finally:
        registry._load.cache_clear()
    err = capsys.readouterr().err
    assert "is not valid YAML" in err and "line" in err and "SCORE_ZOO_REGISTRY" in err


@pytest.mark.parametrize("threat, eps", [("linf", "2"), ("linf", "1e9"), ("l2", "1e9"), ("l1", "1e9")])
def test_eps_past_the_whole_image_space_is_refused_unless_allowed(tiny, threat, eps):
    model, options = tiny
    options = dataclasses.replace(options, threat=threat, eps=eps)
    with pytest.raises(BadInputError, match="covers the whole") as info:
        prepare(model, options)
    assert "--allow-large-eps" in str(info.value)
    assert prepare(model, dataclasses.replace(options, allow_large_eps=True)).eps == float(eps)


def test_cli_large_eps_exits_2(tiny, capsys):
    model, options = tiny
    code = eval_cli.main(["--model", "score-wrn-28-10", "--eps", "2", "--data", options.data, "--device", "cpu",
                          "--results-dir", options.results_dir, "--dry-run", "--checkpoint", options.data])
    assert code == 2 and "covers the whole Linf image space" in capsys.readouterr().err


@pytest.mark.parametrize("label", ["net\n", "a" * 300, "../up", "x/y", "", "-flag"])
def test_bad_labels_fail_before_any_work(tmp_path, label):
    options = RunOptions(data=str(tmp_path / "missing.npz"), device="cpu", results_dir=str(tmp_path / "r"),
                         model_label=label)
    with pytest.raises(BadInputError, match="cannot name a results folder"):   # not the missing data file
        prepare(nn.Linear(2, 2), options)


def test_deeply_nested_record_json_is_a_record_error(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(RecordError, match="nested too deeply"):
        RunRecord.read(path)


@pytest.mark.parametrize("edit", [{"stage": -7}, {"stage": 9}, {"batches_done": -1}, {"n_stages": -2}])
def test_impossible_run_state_is_refused(tmp_path, edit):
    state = ShardState.new("h" * 64, 0, 1, np.arange(3), 2, (3, 8, 8))
    path = state.save(tmp_path / "shard-000-of-001.npz")
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta.update(edit)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    with pytest.raises(RunStateError, match="malformed"):
        ShardState.load(path)
