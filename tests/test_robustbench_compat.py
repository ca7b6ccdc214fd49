"""Non-SCORE RobustBench names load through RobustBench, despite its packaging problems."""

import pytest
import torch

import zoo
from tests.support import helpers as h
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


# ---------------------------------------------------------------- fra31's AutoAttack API over pyautoattack

def test_autoattack_is_fra31s_api_over_pyautoattack(tmp_path):
    import pyautoattack

    robustbench_compat.import_robustbench()
    from autoattack import AutoAttack
    from autoattack.state import EvaluationState

    assert EvaluationState is pyautoattack.state.EvaluationState
    model = h.train_tiny_cnn()
    x, y = h.synthetic_images(6, seed=2)
    log = tmp_path / "aa.log"
    adversary = AutoAttack(model, norm="Linf", eps=h.TINY_EPS, version="custom", attacks_to_run=["apgd-ce"],
                           device="cpu", log_path=str(log))
    adversary.apgd.n_restarts = 1   # fra31-style tweaks reach pyautoattack's objects
    assert adversary.seed == 0 and adversary.attacks_to_run == ["apgd-ce"]
    x_adv = adversary.run_standard_evaluation(x, y, bs=4)
    x_adv2, y_adv = adversary.run_standard_evaluation(x, y, bs=4, return_labels=True)
    assert torch.equal(x_adv, x_adv2) and y_adv.shape == y.shape   # seed 0, not the clock: reproducible
    assert "robust accuracy" in log.read_text()
    assert 0 <= adversary.clean_accuracy(x, y, bs=4) <= 1
    with pytest.raises(ZooError, match="cannot resume"):
        state = tmp_path / "state.json"
        state.write_text("{}")
        adversary.run_standard_evaluation(x, y, bs=4, state_path=state)


def test_robustbench_benchmark_runs_and_gives_zoo_evals_numbers(tmp_path, monkeypatch):
    """RobustBench's own benchmark() (data loader pointed at local images) equals zoo-eval at its batch size."""
    robustbench_compat.import_robustbench()
    import robustbench.eval

    if h.SHARED_DATA.is_file() and h.CNN_A_ADV.is_file():   # a real PGD-trained net on real CIFAR-10
        model, (x, y), eps = h.cnn_a_adv(), h.shared_cifar(12), 2 / 255
    else:
        model, (x, y), eps = h.train_tiny_cnn(), h.synthetic_images(12, seed=2), h.TINY_EPS
    monkeypatch.setattr(robustbench.eval, "load_clean_dataset", lambda dataset, n, data_dir, prepr: (x[:n], y[:n]))
    clean, robust = robustbench.eval.benchmark(model, n_examples=12, dataset="cifar10", threat_model="Linf",
                                               eps=eps, batch_size=5, device=torch.device("cpu"))
    from zoo.evaluate import run

    record = run(model, data=h.write_npz(tmp_path / "d.npz", x, y), eps=eps, batch_size=5, device="cpu",
                 results_dir=tmp_path / "results", run_dir=tmp_path / "run", model_label="net", progress=False)
    assert clean == pytest.approx(record.clean.correct / 12) and robust == pytest.approx(record.robust.correct / 12)
    assert record.robust.correct < record.clean.correct   # the attacks had something to do
