"""Non-SCORE RobustBench names load through RobustBench, despite its packaging problems."""

import pytest
import torch

import zoo
from zoo import robustbench_compat
from zoo.errors import UnknownModelError, ZooError


def test_robustbench_imports_with_the_autoattack_alias():
    rb = robustbench_compat.import_robustbench()
    assert hasattr(rb, "load_model")
    assert robustbench_compat.is_robustbench_name("Carmon2019Unlabeled", "cifar10", "linf")
    assert not robustbench_compat.is_robustbench_name("Carmon2019Unlabeled", "cifar100", "linf")
    assert not robustbench_compat.is_robustbench_name("no-such-model", "cifar10", "linf")


def test_other_robustbench_names_go_through_robustbench(monkeypatch):
    import robustbench.utils

    calls = []

    def fake_load_model(model_name, dataset, threat_model, **kwargs):
        calls.append((model_name, dataset, threat_model))
        return torch.nn.Linear(2, 2).train()

    monkeypatch.setattr(robustbench.utils, "load_model", fake_load_model)
    model = zoo.load("Carmon2019Unlabeled", dataset="cifar10", threat="linf")
    assert calls == [("Carmon2019Unlabeled", "cifar10", "Linf")] and not model.training


def test_robustbench_download_failures_become_zoo_errors(monkeypatch):
    import robustbench.utils

    def offline(**kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(robustbench.utils, "load_model", offline)
    with pytest.raises(ZooError, match="RobustBench could not load Carmon2019Unlabeled"):
        zoo.load("Carmon2019Unlabeled")


def test_unknown_everywhere_is_still_an_unknown_model():
    with pytest.raises(UnknownModelError, match="unknown model 'Carmon2019Unlabelled'"):
        zoo.load("Carmon2019Unlabelled")
