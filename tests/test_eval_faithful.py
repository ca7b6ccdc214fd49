"""The runner reproduces pyautoattack's run_standard_evaluation example by example (flags and x_adv).

Both engines: the reference (pyautoattack's own attack objects) bit for bit; the native engine with the same
flags, and x_adv within a tolerance only where it merges reference batches into one device batch (a
different batch shape changes the convolutions' rounding, which the attacks' steps can amplify).
"""

import functools

import pytest
import torch

from tests.support import helpers as h
from tests.support.faithful import MERGED_X_ADV_TOLERANCE, TINY_ATTACKS
from tests.support.faithful import (assert_same_as_reference as _assert_same_as_reference, run_and_read as _run,
                                    tiny_reference as _tiny_reference)
from zoo.evaluate.attacks.native.engine import NativeEngine
from zoo.evaluate.record import RunRecord
from zoo.evaluate.state import ShardState

@pytest.mark.parametrize("engine,chunk_batches,x_adv_tolerance", [
    ("reference", 2, 0.0),
    ("native", 1, 1e-6),                      # device batch = reference batch: the same arithmetic (0.0 measured)
    ("native", 2, MERGED_X_ADV_TOLERANCE),    # two reference batches per device batch
], ids=["reference", "native-unmerged", "native-merged"])
def test_tiny_cnn_matches_reference_across_batches_and_chunks(tmp_path, engine, chunk_batches, x_adv_tolerance):
    model = h.train_tiny_cnn()
    x, y, ref = _tiny_reference()
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    attacks = list(TINY_ATTACKS)
    record, pe = _run(model, data_file, tmp_path, eps=h.TINY_EPS, version="custom", attacks=attacks, batch_size=8,
                      chunk_batches=chunk_batches, engine=engine)

    # The case that makes the schedule matter: points APGD-CE left robust that APGD-T then broke.
    assert (pe.broken_by == 0).sum() >= 3
    assert (pe.broken_by == 1).sum() >= 2
    assert pe.robust.sum() >= 1
    _assert_same_as_reference(record, pe, ref, x, x_adv_tolerance)
    assert record.engine.startswith(f"{engine} ")
    assert [s.attack for s in record.stages] == attacks
    assert record.stages[0].robust.correct == int((pe.clean_correct & (pe.broken_by != 0)).sum())
    assert record.stages[0].forward_passes > 0 and record.stages[1].backward_passes > 0
    assert record.batch_size == 8 and record.seed == 0 and record.version == "custom"
    assert record.eps == str(h.TINY_EPS) and record.eps_value == pytest.approx(h.TINY_EPS)
    # The written record reads back through the schema (the report writer's entry point).
    again = RunRecord.read(tmp_path / "results-r" / record.relative_path())
    assert again.to_dict() == record.to_dict()


@functools.lru_cache(maxsize=1)
def _standard_reference():
    x, y = h.synthetic_images(64, seed=2)
    x, y = x[:6].contiguous(), y[:6]
    return x, y, h.reference_run(h.train_tiny_cnn(), x, y, eps=h.TINY_EPS, version="standard", batch_size=3)


@pytest.mark.slow
@pytest.mark.parametrize("engine,x_adv_tolerance", [("reference", 0.0), ("native", MERGED_X_ADV_TOLERANCE)])
def test_full_standard_version_matches_reference(tmp_path, engine, x_adv_tolerance):
    """The native run merges both reference batches of 3 into one device batch (0.0 x_adv difference measured)."""
    model = h.train_tiny_cnn()
    x, y, ref = _standard_reference()
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    record, pe = _run(model, data_file, tmp_path, eps=h.TINY_EPS, batch_size=3, engine=engine)
    assert list(record.attacks) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert pe.robust.sum() >= 1  # FAB-T and Square really ran on something
    assert record.stages[3].forward_passes > 0
    _assert_same_as_reference(record, pe, ref, x, x_adv_tolerance)
    assert record.engine.startswith(f"{engine} ")


def test_native_run_crashed_in_second_stage_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    """Crash in APGD-T's second batch, resume: finished work is not redone and the result is the reference's
    bit for bit, as the uninterrupted native run's is (``native-unmerged`` above; one batch per chunk here too)."""
    model = h.train_tiny_cnn()
    x, y, ref = _tiny_reference()
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    kw = dict(eps=h.TINY_EPS, version="custom", attacks=list(TINY_ATTACKS), batch_size=8, chunk_batches=1,
              engine="native")
    calls = {"apgd-ce": 0, "apgd-t": 0}
    crash = {"at_apgd_t_call": 2}
    original = NativeEngine.attack_batches

    def counting(self, attack, batches):
        calls[attack] += 1
        if attack == "apgd-t" and calls["apgd-t"] == crash["at_apgd_t_call"]:
            raise KeyboardInterrupt("simulated crash")
        return original(self, attack, batches)

    monkeypatch.setattr(NativeEngine, "attack_batches", counting)
    with pytest.raises(KeyboardInterrupt):
        _run(model, data_file, tmp_path, **kw)
    state = ShardState.load(tmp_path / "run-r" / "shard-000-of-001.npz")
    assert (state.stage, state.batches_done) == (1, 1)
    stage_1_batches = -(-int(state.stage_start_robust.sum()) // 8)
    assert stage_1_batches >= 2

    calls.update({"apgd-ce": 0, "apgd-t": 0})
    crash["at_apgd_t_call"] = None
    record, pe = _run(model, data_file, tmp_path, **kw)
    assert calls == {"apgd-ce": 0, "apgd-t": stage_1_batches - 1}   # only what the crash left undone
    _assert_same_as_reference(record, pe, ref, x, 1e-6)


def test_channels_last_model_runs_apgd_t_and_fab_t(tmp_path):
    """channels_last weights with contiguous NCHW inputs: APGD-T's and FAB's .view() calls must not break."""
    model = h.train_tiny_cnn()
    x, y = h.synthetic_images(8, seed=3)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    attacks = ["apgd-t", "fab-t"]
    record, pe = _run(model, data_file, tmp_path, eps=h.TINY_EPS, version="custom", attacks=attacks, batch_size=8,
                      channels_last=True)
    assert record.extra["channels_last"] is True
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    ref = h.reference_run(model, x, y, eps=h.TINY_EPS, attacks=attacks, batch_size=8)
    _assert_same_as_reference(record, pe, ref, x)


@pytest.mark.skipif(not (h.CNN_A_ADV.exists() and h.SHARED_DATA.exists()),
                    reason="../shared/models/cifar10_cnn_a_adv_at2px_sdpfo.pth or ../shared/data not present")
@pytest.mark.slow
def test_real_pgd_trained_cnn_matches_reference_and_published_counts(tmp_path):
    """CNN-A-Adv, first 100 CIFAR-10 test images, 2/255: 70 clean and 48 after APGD-T as in MODELS.md.

    (MODELS.md ran version 'standard', whose APGD-CE uses 1 restart and leaves 53; 'custom' keeps
    pyautoattack's constructor default of 5 restarts, which leaves 52. APGD-T ends at 48 either way.)
    """
    model = h.cnn_a_adv()
    x, y = h.shared_cifar(100)
    data_file = h.write_npz(tmp_path / "d.npz", x, y)
    attacks = ["apgd-ce", "apgd-t"]
    record, pe = _run(model, data_file, tmp_path, eps="2/255", version="custom", attacks=attacks, batch_size=100)
    assert (record.clean.correct, record.stages[1].robust.correct) == (70, 48)
    ref = h.reference_run(model, x, y, eps=2 / 255, attacks=attacks, batch_size=100)
    _assert_same_as_reference(record, pe, ref, x)
    assert (pe.broken_by == 1).sum() >= 4  # APGD-T breaks points APGD-CE missed
