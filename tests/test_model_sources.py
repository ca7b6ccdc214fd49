"""Any model from the CLI: --model-factory MODULE:FUNCTION (with --checkpoint) and --model robustbench:ID."""

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from zoo.evaluate import cli
from zoo.evaluate.record import RunRecord

FACTORIES = '''
import torch
from torch import nn

def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))

def broken():
    raise RuntimeError("no GPU here")

def not_a_module():
    return 42

def wrong_shape():
    return nn.Sequential(nn.Flatten(), nn.Unflatten(1, (3, 64)))

number = 7
'''


@pytest.fixture
def env(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SCORE_ZOO_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    x = torch.rand(6, 3, 8, 8)
    data = tmp_path / "d.npz"
    np.savez(data, x=x.numpy(), y=np.zeros(6, np.int64))
    base = ["--data", str(data), "--attacks", "apgd-ce", "--eps", "1/255", "--batch-size", "3", "--device", "cpu",
            "--results-dir", str(tmp_path / "results"), "--no-progress"]
    return tmp_path, base


def _record(tmp_path):
    (path,) = (tmp_path / "results").rglob("*.json")
    return RunRecord.read(path)


def test_factory_runs_and_is_recorded(env):
    tmp_path, base = env
    assert cli.main(["--model-factory", "my_nets:tiny", *base]) == 0
    record = _record(tmp_path)
    assert record.model == "tiny" and record.checkpoint["source"].startswith("factory my_nets:tiny (")
    assert record.checkpoint["sha256"] is None


def test_factory_with_a_checkpoint_loads_it_strictly(env):
    tmp_path, base = env
    other = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    torch.save(other.state_dict(), tmp_path / "w.pt")
    assert cli.main(["--model-factory", "my_nets:tiny", "--checkpoint", str(tmp_path / "w.pt"),
                     "--model-label", "tiny-w", *base]) == 0
    record = _record(tmp_path)
    assert record.checkpoint["sha256"] and "w.pt" in record.checkpoint["path"]
    assert "+ local file" in record.checkpoint["source"]


@pytest.mark.parametrize("spec, needle", [
    ("no_such_module:tiny", "cannot import 'no_such_module'"),
    ("my_nets:missing", "has no callable 'missing'"),
    ("my_nets:number", "has no callable 'number'"),
    ("my_nets:broken", "raised RuntimeError: no GPU here"),
    ("my_nets:not_a_module", "returned int, not a torch.nn.Module"),
    ("my_nets:wrong_shape", "expected a logits tensor"),
    ("my_nets", "cannot read model factory"),
])
def test_bad_factories_exit_2_with_the_reason(env, capsys, spec, needle):
    tmp_path, base = env
    assert cli.main(["--model-factory", spec, *base]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_model_and_factory_together_are_refused(env, capsys):
    _, base = env
    assert cli.main(["--model", "score-wrn-28-10", "--model-factory", "my_nets:tiny", *base]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_robustbench_prefix_loads_through_robustbench(env, monkeypatch):
    from zoo import robustbench_compat

    robustbench_compat.import_robustbench()
    import robustbench.utils

    calls = []

    def fake_load_model(model_name, dataset, threat_model, **kwargs):
        calls.append((model_name, dataset, threat_model))
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).train()

    monkeypatch.setattr(robustbench.utils, "load_model", fake_load_model)
    tmp_path, base = env
    assert cli.main(["--model", "robustbench:Carmon2019Unlabeled", *base]) == 0
    record = _record(tmp_path)
    assert calls == [("Carmon2019Unlabeled", "cifar10", "Linf")]
    assert record.model == "Carmon2019Unlabeled" and record.checkpoint["source"].startswith("RobustBench model zoo")


def test_unknown_robustbench_id_exits_2(env, capsys):
    _, base = env
    assert cli.main(["--model", "robustbench:NoSuchModel2099", *base]) == 2
    assert "RobustBench lists no cifar10 linf model 'NoSuchModel2099'" in capsys.readouterr().err
