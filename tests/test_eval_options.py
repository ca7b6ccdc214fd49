"""RunOptions is the one list of run options: run(), plan(), the CLI, the saved invocation and the
configuration hash all derive from it, so an option cannot be added to one of them and forgotten in another."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from zoo.evaluate import cli, options as opt
from zoo.evaluate.options import RunOptions
from zoo.evaluate.prepare import prepare

FIELDS = {f.name: f for f in dataclasses.fields(RunOptions)}

# Where each option that the hash covers through what it selects shows up in the configuration.
DERIVED_KEYS = {"dataset": "dataset", "eps": "eps", "n_ex": "indices", "data": "data_sha256",
                "data_root": "data_sha256", "checkpoint": "checkpoint_sha256", "shard": "shards",
                "model_label": "model"}


@pytest.fixture
def base(tmp_path):
    """A tiny linear classifier on 8 random images it labels itself, and options that evaluate it on CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(8, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    options = RunOptions(data=str(data), version="custom", attacks=("apgd-ce",), batch_size=4, device="cpu",
                         results_dir=str(tmp_path / "results"), model_label="net", progress=False)
    return model, options, tmp_path


def test_every_option_declares_how_it_is_covered():
    for f in FIELDS.values():
        assert f.metadata["hashed"] in (opt.VALUE, opt.DERIVED, opt.NOT_HASHED), f.name
        assert f.metadata["help"], f.name
    derived = {name for name, f in FIELDS.items() if f.metadata["hashed"] == opt.DERIVED}
    assert derived == set(DERIVED_KEYS), "say where a new DERIVED option shows up in the configuration"


def test_run_and_plan_take_exactly_the_options():
    assert RunOptions.build(seed=3).seed == 3
    with pytest.raises(TypeError, match="unexpected option"):
        RunOptions.build(sed=3)
    for name in FIELDS:   # every field can be given by keyword (run and plan pass their keywords here)
        RunOptions.build(**{name: getattr(RunOptions(), name)})


def test_the_cli_has_a_flag_for_every_option_and_defaults_to_none():
    args = cli._run_parser().parse_args([])
    for name in FIELDS:
        assert hasattr(args, name), f"zoo-eval has no flag for {name}"
        assert getattr(args, name) is None, f"--{name} must default to None (given vs. saved on --resume)"
    flags = cli._run_parser().parse_args(["--n-ex", "5", "--no-channels-last", "--no-progress", "--shard", "0/2",
                                          "--torch-compile", "default", "--seed", "7"])
    assert (flags.n_ex, flags.channels_last, flags.progress, flags.shard, flags.torch_compile, flags.seed) == \
        (5, False, False, "0/2", "default", 7)


def test_saved_invocation_rebuilds_every_saved_option():
    changed = RunOptions(dataset="cifar100", threat="l2", eps="0.25", n_ex=7, data="/d.npz", data_dir="/dd",
                         data_root="/dr", version="custom", attacks=("apgd-ce", "square"), seed=3, batch_size=5,
                         device="cuda", precision="tf32", engine="native", results_dir="/r", checkpoint="/c.pt",
                         model_label="m", channels_last=False, torch_compile="default", allow_large_eps=True,
                         trained_threat="l2")
    saved = {name for name, f in FIELDS.items() if f.metadata["saved"]}
    differs = {name for name in FIELDS if getattr(changed, name) != getattr(RunOptions(), name)}
    assert saved <= differs, f"give these saved options a non-default value here: {sorted(saved - differs)}"
    rebuilt = RunOptions.from_invocation(changed.invocation())
    for name in FIELDS:
        expected = getattr(changed if name in saved else RunOptions(), name)
        assert getattr(rebuilt, name) == expected, name


def test_hashed_options_change_the_configuration_and_the_others_do_not(base):
    model, options, tmp_path = base
    reference = prepare(model, options)
    for name, f in FIELDS.items():
        if f.metadata["hashed"] == opt.VALUE:
            assert name in reference.config, name
    for key in DERIVED_KEYS.values():
        assert key in reference.config
    other_data = tmp_path / "other.npz"
    x = torch.rand(8, 3, 8, 8)
    np.savez(other_data, x=x.numpy(), y=np.zeros(8, np.int64))
    changes = {"threat": "l2", "eps": "0.004", "n_ex": 6, "data": str(other_data), "seed": 1, "batch_size": 3,
               "version": "standard", "attacks": None, "engine": "native", "shard": "0/2",
               "model_label": "other", "torch_compile": "default"}
    for name, value in changes.items():
        assert prepare(model, dataclasses.replace(options, **changes_for(name, value))).config_hash \
            != reference.config_hash, name
    same = {"results_dir": str(tmp_path / "r2"), "allow_large_eps": True, "channels_last": True,
            "run_dir": str(tmp_path / "run"), "chunk_batches": 9, "progress": True, "threads": 1}
    assert set(same) | {"data_dir", "device"} == {n for n, f in FIELDS.items()
                                                  if f.metadata["hashed"] == opt.NOT_HASHED}
    for name, value in same.items():
        assert prepare(model, dataclasses.replace(options, **{name: value})).config_hash == reference.config_hash, name
    # not varied above: dataset, data_dir, data_root, checkpoint and trained_threat need CIFAR or a registry model
    # (trained_threat: tests/test_cross_threat.py); precision and device a GPU (tests/test_gpu_paths.py runs ranks on
    # different devices into one configuration)
    assert set(FIELDS) - set(changes) - set(same) == {"dataset", "data_dir", "data_root", "checkpoint", "precision",
                                                      "device", "trained_threat"}


def changes_for(name, value):
    """The version and the attack list go together: a standard version takes no attack list."""
    return {"version": "standard", "attacks": None} if name in ("version", "attacks") else {name: value}
