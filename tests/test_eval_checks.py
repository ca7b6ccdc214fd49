"""Reliability checks: each problem model raises its check with both engines; a clean model raises none."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.support import helpers as h
from zoo.evaluate import checks, cli, run
from zoo.evaluate.record import RunRecord

ENGINES = ["reference", "native"]


class Quantised(nn.Module):
    """Rounds its input to quarter steps before a linear layer: the gradient is exactly zero everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc((torch.round(x * 4) / 4).flatten(1)) * 10


class Noisy(nn.Module):
    """Adds the same random number to every logit of a row: repeated forwards differ, predictions do not."""

    def __init__(self):
        super().__init__()
        self.net = h.train_tiny_cnn()

    def forward(self, x):
        out = self.net(x)
        return out + torch.randn(out.shape[0], 1, device=out.device)


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = h.train_tiny_cnn()

    def forward(self, x):
        return F.softmax(self.net(x) / 30, dim=1)


class StaysTraining(nn.Module):
    """Ignores eval(): keeps training mode and updates a running mean of its input (like a BatchNorm left in
    training mode), while returning its input unchanged, so predictions stay deterministic."""

    def __init__(self):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(3))

    def train(self, mode: bool = True):
        return super().train(True)

    def forward(self, x):
        if self.training:
            self.running_mean.mul_(0.9).add_(0.1 * x.detach().mean(dim=(0, 2, 3)))
        return x


class Dynamic(nn.Module):
    def __init__(self):
        super().__init__()
        self.track = StaysTraining()
        self.net = h.train_tiny_cnn()

    def forward(self, x):
        return self.net(self.track(x))


def _run(tmp_path, model, engine, attacks, eps=h.TINY_EPS, n=8, labels_from_model=False):
    x, y = h.synthetic_images(n, seed=2)
    if labels_from_model:   # every point correct, so every attack has work to do
        with torch.no_grad():
            y = model.eval()(x).argmax(1)
    data = h.write_npz(tmp_path / f"d-{engine}.npz", x, y)
    with h.one_thread():
        return run(model, data=str(data), eps=eps, version="custom", attacks=attacks, batch_size=8, device="cpu",
                   results_dir=str(tmp_path / f"res-{engine}"), run_dir=str(tmp_path / f"run-{engine}"),
                   model_label="m", progress=False, engine=engine)


def _fired(record):
    return {name for name, r in record.checks["results"].items() if r["status"] == checks.WARNING}


@pytest.mark.parametrize("engine", ENGINES)
def test_clean_model_raises_no_check(tmp_path, engine):
    record = _run(tmp_path, h.train_tiny_cnn(), engine, ["apgd-dlr", "square"])
    assert _fired(record) == set()
    assert record.unreliable is False
    results = record.checks["results"]
    assert results["zero_gradients"]["per_attack"] == {"apgd-dlr": 0}
    assert results["square"]["status"] == "ok" and results["fp32_rejected"]["status"] == "skipped"
    again = RunRecord.read(tmp_path / f"res-{engine}" / record.relative_path())   # written and read back
    assert again.checks == json.loads(json.dumps(record.checks))


def test_zero_gradients_counted_alike_by_both_engines(tmp_path):
    records = {e: _run(tmp_path, Quantised(), e, ["apgd-dlr", "apgd-t", "square"], eps=0.1,
                       labels_from_model=True) for e in ENGINES}
    counts = {e: r.checks["results"]["zero_gradients"]["per_attack"] for e, r in records.items()}
    assert counts["reference"] == counts["native"]
    # every attacked point, once per APGD run (per restart): all 8 in the first restart, then the survivors
    assert counts["reference"]["apgd-dlr"] > 8 and counts["reference"]["apgd-t"] > 0
    for record in records.values():
        assert {"zero_gradients", "square"} <= _fired(record)
        assert record.unreliable and "zero_gradients" in record.unreliable_because
        assert record.checks["results"]["square"]["broken_by_square"] > 0


@pytest.mark.parametrize("engine", ENGINES)
def test_randomized_model(tmp_path, engine):
    record = _run(tmp_path, Noisy(), engine, ["apgd-ce"])
    assert _fired(record) == {"randomized"}
    assert record.unreliable_because == ["randomized"]


@pytest.mark.parametrize("engine", ENGINES)
def test_probability_outputs(tmp_path, engine):
    record = _run(tmp_path, Softmaxed(), engine, ["apgd-ce"])
    assert "probabilities" in _fired(record)
    assert record.unreliable


@pytest.mark.parametrize("engine", ENGINES)
def test_model_that_stays_in_training_mode(tmp_path, engine):
    record = _run(tmp_path, Dynamic(), engine, ["apgd-ce"])
    assert _fired(record) == {"dynamic"}
    dynamic = record.checks["results"]["dynamic"]
    assert dynamic["training_modules"] == ["track"] and dynamic["buffers_changed"] == ["track.running_mean"]


def test_autograd_inside_forward_is_dynamic():
    class Grads(nn.Module):
        def forward(self, x):
            with torch.enable_grad():   # a test-time-optimising defence computes gradients inside forward()
                x = x.detach().requires_grad_(True)
                (g,) = torch.autograd.grad((x ** 2).sum(), [x])
            return (x + g).flatten(1)[:, :10]

    facts = checks.measure_model(Grads().eval(), torch.rand(2, 3, 4, 4), torch.zeros(2, dtype=torch.long))
    assert facts["autograd_calls"] > 0
    assert checks.check_dynamic([facts]).fired


def test_class_count_check():
    assert checks.check_classes(3, ["apgd-ce", "apgd-t"], 9, 9).fired
    assert checks.check_classes(2, ["apgd-dlr"], 9, 9).fired
    assert not checks.check_classes(3, ["apgd-dlr"], 9, 9).fired
    assert checks.check_classes(5, ["apgd-t"], 9, 9).fired       # 9 targets, 4 possible
    assert not checks.check_classes(10, ["apgd-ce", "apgd-t", "fab-t", "square"], 9, 9).fired


def test_cli_prints_warning_and_reliability_block(tmp_path, capsys, caplog):
    record = _run(tmp_path, Noisy(), "native", ["apgd-ce"])
    text = cli._summary(record)
    assert "reliability: UNRELIABLE (randomized)" in text
    assert "randomized      warning" in text
    assert any("reliability check randomized" in r.getMessage() for r in caplog.records)


def test_version1_record_still_reads(tmp_path):
    record = _run(tmp_path, h.train_tiny_cnn(), "native", ["apgd-ce"])
    doc = record.to_dict()
    doc["schema_version"] = 1
    for field in ("checks", "kind", "trained_threat", "corruptions", "integrity"):   # what schema 2 added
        del doc[field]
    old = RunRecord.from_dict(doc)
    assert old.checks is None and old.unreliable is False
    assert "not checked" in cli._summary(old)


def test_fp32_rejections_and_ties_are_reported_but_do_not_decide():
    # bf16 needs a GPU, so the runner's bf16 path is exercised in test_eval_devices; the judgement is here
    rejected = checks.check_fp32_rejected("bf16", ["apgd-ce", "square"], [2, 0])
    assert rejected.fired and rejected.details["per_attack"] == {"apgd-ce": 2, "square": 0}
    assert checks.check_fp32_rejected("fp32", ["apgd-ce"], [0]).status == checks.SKIPPED
    ties = checks.check_ties([{"position": 0, "index": 0, "margin": 0.0, "flag": "robust"}])
    section = checks.section([rejected, ties])
    assert not section["unreliable"] and section["because"] == []


@pytest.mark.skipif(not (h.SHARED_DATA.is_file() and h.CNN_A_ADV.is_file()),
                    reason="../shared (real CIFAR-10 images and the PGD-trained CNN-A-Adv) not present")
@pytest.mark.slow
@pytest.mark.parametrize("engine", ["reference", "native"])
def test_a_real_robust_net_on_real_images_raises_no_check(tmp_path, engine):
    """CNN-A-Adv (PGD-trained) on 16 real CIFAR-10 test images at its 2/255 budget: a sound evaluation."""
    x, y = h.shared_cifar(16)
    data = h.write_npz(tmp_path / "real.npz", x, y)
    with h.one_thread():
        record = run(h.cnn_a_adv(), data=str(data), eps="2/255", version="custom",
                     attacks=["apgd-ce", "apgd-t", "square"], batch_size=16, device="cpu",
                     results_dir=str(tmp_path / "res"), run_dir=str(tmp_path / "run"), model_label="cnn-a-adv",
                     progress=False, engine=engine)
    assert _fired(record) == set() and record.unreliable is False
    assert record.robust.correct < record.clean.correct   # the attacks broke something: a real evaluation
