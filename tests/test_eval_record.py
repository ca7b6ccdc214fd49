"""Before a record is written, its adversarial examples are checked; broken engines fail loudly."""

import numpy as np
import pytest
import torch

from tests.support import helpers as h
from zoo.evaluate import run
from zoo.evaluate.attacks.engine import ENGINES, AttackView
from zoo.evaluate.attacks.reference import ReferenceEngine
from zoo.evaluate.estimate import count_macs
from zoo.evaluate.record import PerExample
from zoo.evaluate.verify import AdversarialCheckError, check_adversarial, perturbation_norms
from zoo.evaluate.state import ShardState


def _run(tmp_path, synthetic_data_file, **kw):
    args = dict(data=synthetic_data_file, eps=h.TINY_EPS, version="custom", attacks=["apgd-ce"], batch_size=4,
                device="cpu", results_dir=tmp_path / "results", run_dir=tmp_path / "run", model_label="tiny",
                progress=False)
    args.update(kw)
    return run(h.train_tiny_cnn(), **args)


class _FarEngine(ReferenceEngine):
    """Claims 'adversarial' images far outside the eps ball (they do fool the model)."""

    def attack_batch(self, attack, x, y):
        return (x + 0.4 * torch.sign(torch.randn_like(x))).clamp(0, 1)


class _NaNEngine(ReferenceEngine):
    def attack_batch(self, attack, x, y):
        adv = x.clone()
        adv[:, :, 0, 0] = float("nan")
        return adv


def test_engine_leaving_the_eps_ball_is_caught(tmp_path, synthetic_data_file, monkeypatch):
    monkeypatch.setitem(ENGINES, "far", _FarEngine)
    with pytest.raises(AdversarialCheckError, match=r"exceed the Linf budget 0.008 \(largest norm 0.4"):
        _run(tmp_path, synthetic_data_file, engine="far")
    assert not (tmp_path / "results").exists()


def test_engine_returning_nan_is_caught(tmp_path, synthetic_data_file, monkeypatch):
    monkeypatch.setitem(ENGINES, "nan", _NaNEngine)
    with pytest.raises(AdversarialCheckError, match=r"contain NaN/inf"):
        _run(tmp_path, synthetic_data_file, engine="nan")
    assert not (tmp_path / "results").exists()


def test_flags_an_fp32_forward_does_not_reproduce_are_caught(tmp_path, synthetic_data_file):
    assert _run(tmp_path, synthetic_data_file, eps=0.001, shard=(0, 2)) is None
    path = tmp_path / "run" / "shard-000-of-002.npz"
    state = ShardState.load(path)
    robust = np.flatnonzero(state.robust)
    assert len(robust), "need a robust example to tamper with"
    p = robust[0]
    state.robust[p] = False            # claim it was fooled, with its clean image as the "adversarial" one
    state.broken_by[p] = 0
    state.adv_pred[p] = (state.clean_pred[p] + 1) % 10
    with np.load(synthetic_data_file) as d:
        state.x_adv[p] = d["x"][state.positions[p]]
    state.save(path)
    with pytest.raises(AdversarialCheckError, match=r"does not reproduce the clean/robust flags of 1 example"
                                                   r"\(s\) \(first: \[\{'position': \d+, 'index': \d+, 'margin': "
                                                   r"[-\d.e]+, 'flag': 'robust'\}\]"):
        _run(tmp_path, synthetic_data_file, eps=0.001, shard=(1, 2))
    assert not (tmp_path / "results").exists()


def test_clean_flags_an_fp32_forward_does_not_reproduce_are_caught(tmp_path, synthetic_data_file):
    assert _run(tmp_path, synthetic_data_file, eps=0.001, shard=(0, 2)) is None
    path = tmp_path / "run" / "shard-000-of-002.npz"
    state = ShardState.load(path)
    wrong = np.flatnonzero(~state.clean_correct)
    assert len(wrong), "need a misclassified example to tamper with"
    state.clean_correct[wrong[0]] = True      # claim a misclassified clean image was correct (and so robust)
    state.robust[wrong[0]] = True
    state.save(path)
    with pytest.raises(AdversarialCheckError, match=r"'flag': 'clean'"):
        _run(tmp_path, synthetic_data_file, eps=0.001, shard=(1, 2))
    assert not (tmp_path / "results").exists()


def test_same_weights_in_another_module_is_another_run(tmp_path):
    """Normalisation buffers (non-persistent) and the layer structure are part of the configuration hash."""
    from zoo.evaluate.options import RunOptions
    from zoo.evaluate.prepare import prepare
    from zoo.models import WideResNet

    x, _ = h.synthetic_images(4, seed=1)
    data = h.write_npz(tmp_path / "d.npz", x, torch.zeros(4, dtype=torch.long))
    a = WideResNet(depth=10, width=1)
    b = WideResNet(depth=10, width=1, activation="relu", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    b.load_state_dict(a.state_dict())
    options = RunOptions(data=data, version="custom", attacks=("apgd-ce",), batch_size=4, device="cpu",
                         results_dir=tmp_path / "results", chunk_batches=1, model_label="net", progress=False)
    hashes = {prepare(m, options).config_hash for m in (a, b)}
    assert len(hashes) == 2


def _per_example(x_adv, positions, n=3):
    broken = np.full(n, -1, np.int16)
    broken[positions] = 0
    clean_correct = np.ones(n, bool)
    return PerExample(indices=np.arange(n), clean_correct=clean_correct, robust=broken < 0, broken_by=broken,
                      clean_pred=np.zeros(n, np.int64), adv_pred=np.where(broken >= 0, 1, -1),
                      adv_positions=np.asarray(positions, np.int64), x_adv=np.asarray(x_adv, np.float32))


@pytest.mark.parametrize("norm,eps,delta,ok", [
    ("Linf", 8 / 255, 8 / 255, True), ("Linf", 8 / 255, 8 / 255 + 1e-5, False),
    ("L2", 0.5, 0.5 / np.sqrt(48), True), ("L2", 0.5, 0.51 / np.sqrt(48), False),
    ("L1", 12.0, 0.25, True), ("L1", 12.0, 0.2505, False),
])
def test_check_adversarial_norms(norm, eps, delta, ok):
    x = np.full((3, 3, 4, 4), 0.0, np.float32)
    pe = _per_example(np.full((1, 3, 4, 4), delta, np.float32), [1])
    if ok:
        check_adversarial(pe, x, norm, eps)
    else:
        with pytest.raises(AdversarialCheckError, match=f"exceed the {norm} budget"):
            check_adversarial(pe, x, norm, eps)


def test_check_adversarial_range():
    x = np.full((3, 3, 2, 2), 1.0, np.float32)
    pe = _per_example(np.full((1, 3, 2, 2), 1.001, np.float32), [2])
    with pytest.raises(AdversarialCheckError, match=r"leave \[0, 1\].*positions \[2\]"):
        check_adversarial(pe, x, "Linf", 0.1)


def test_perturbation_norms():
    d = np.array([[3.0, -4.0], [0.0, 0.0]])
    assert perturbation_norms(d, "Linf").tolist() == [4.0, 0.0]
    assert perturbation_norms(d, "L2").tolist() == [5.0, 0.0]
    assert perturbation_norms(d, "L1").tolist() == [7.0, 0.0]


def test_per_example_roundtrip_and_consistency(tmp_path):
    pe = _per_example(np.full((1, 3, 2, 2), 0.5, np.float32), [1])
    pe.write(tmp_path / "a.npz")
    back = PerExample.read(tmp_path / "a.npz")
    assert np.array_equal(back.x_adv, pe.x_adv) and back.robust.tolist() == [True, False, True]
    assert back.robust_after(0).tolist() == [True, False, True]
    full = back.full_x_adv(np.zeros((3, 3, 2, 2), np.float32))
    assert full[1].max() == 0.5 and full[0].max() == 0.0
    bad = PerExample(**{**pe.__dict__, "robust": np.ones(3, bool)})
    with pytest.raises(Exception, match="robust flags disagree"):
        bad.check()


def test_count_macs_and_pass_counter():
    model = h.TinyCNN()
    cost = count_macs(model, (3, 32, 32))
    assert cost.macs_per_image == 2048 * 48 + 1024 * 128 + 10 * 1024
    assert cost.parameters == sum(p.numel() for p in model.parameters())
    view = AttackView(model)
    x = torch.rand(5, 3, 32, 32, requires_grad=True)
    torch.autograd.grad(view(x).sum(), x)
    with torch.no_grad():
        view(x[:2])
    assert view.take_counts() == (7, 5) and view.take_counts() == (0, 0)


def test_progress_bar_on_a_terminal_and_log_lines_otherwise(monkeypatch, caplog):
    import io
    import logging
    import sys

    from zoo.evaluate.progress import StageProgress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = StageProgress(True, "apgd-t", 1, 4, points=20, points_done=5, per_point=1)
    bar.start_chunk(10)
    bar.end_chunk(10, robust=7, n=40)
    bar.close()
    assert "[2/4] apgd-t" in term.getvalue() and "robust 17.50%" in term.getvalue()
    assert "75%" in term.getvalue() and "15.0/20.0" in term.getvalue()   # the bar advanced by the chunk
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="zoo.evaluate"):
        bar = StageProgress(True, "square", 3, 4, points=20, points_done=0, per_point=1)
        bar.start_chunk(5)
        bar.end_chunk(5, robust=3, n=40)
        quiet = StageProgress(False, "square", 3, 4, points=20, points_done=0, per_point=1)   # ranks > 0: silent
        quiet.start_chunk(5)
        quiet.end_chunk(5, robust=3, n=40)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("square: 5/20 points, 25% of the stage's model passes")
    assert "robust 7.50% so far, ETA at most" in lines[0]


@pytest.mark.parametrize("field,value,message", [
    ("eps_value", "8/255", "eps_value must be a number"),
    ("complete", "yes", "complete must be true or false"),
    ("seed", True, "seed must be an integer"),
    ("created", 20250101, "created must be a string"),
    ("created", "yesterday", "not an ISO 8601 time"),
    ("stages", {"apgd-ce": 1}, "stages must be a list"),
    ("clean", {"correct": 5}, "malformed record"),
])
def test_record_schema_rejects_wrong_types(field, value, message):
    from tests.support.reports import make_record
    from zoo.errors import BadInputError
    from zoo.evaluate.record import RunRecord

    data = make_record(n=100, clean=80, robust=50).to_dict()
    assert RunRecord.from_dict(data).to_dict() == data
    data[field] = value
    with pytest.raises(BadInputError, match=message):
        RunRecord.from_dict(data, origin="r.json")


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["stages"][1]["robust"].update(correct=d["stages"][0]["robust"]["correct"] + 1), "counts rise"),
    (lambda d: d["robust"].update(correct=d["robust"]["correct"] - 1), "last stage's robust count differs"),
])
def test_record_with_inconsistent_stage_counts_is_refused(mutate, message):
    from tests.support.reports import make_record
    from zoo.errors import BadInputError
    from zoo.evaluate.record import RunRecord

    data = make_record(n=100, clean=80, robust=50).to_dict()
    mutate(data)
    with pytest.raises(BadInputError, match=message):
        RunRecord.from_dict(data, origin="r.json")
