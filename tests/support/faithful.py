"""Oracles of the faithfulness tests (tests/test_eval_faithful.py, tests/test_eval_compile.py): a runner run on the
tiny CNN read back with its per-example file, and the comparison with pyautoattack's own run of the same data."""

import functools

import numpy as np

from tests.support import helpers as h
from zoo.evaluate import run

TINY_ATTACKS = ("apgd-ce", "apgd-t")
MERGED_X_ADV_TOLERANCE = 1e-3   # measured 5.8e-4 (7 of 32 points) on the tiny case; eps is 8e-3


def run_and_read(model, data_file, tmp_path, name="r", **kwargs):
    kwargs.setdefault("device", "cpu")
    record = run(model, data=data_file, results_dir=tmp_path / f"results-{name}", run_dir=tmp_path / f"run-{name}",
                 model_label="tiny", progress=False, **kwargs)
    return record, h.per_example(record, tmp_path / f"results-{name}")


def assert_same_as_reference(record, per_example, ref, x, x_adv_tolerance=0.0):
    assert np.array_equal(per_example.robust, ref["robust"].numpy())
    assert np.array_equal(per_example.clean_correct, ref["clean_correct"].numpy())
    if x_adv_tolerance == 0.0:
        assert np.array_equal(per_example.full_x_adv(x.numpy()), ref["x_adv"].numpy())  # bit for bit
    else:
        assert np.abs(per_example.full_x_adv(x.numpy()) - ref["x_adv"].numpy()).max() <= x_adv_tolerance
    fooled = per_example.broken_by >= 0
    assert np.array_equal(per_example.adv_pred[fooled], ref["y_adv"].numpy()[fooled])
    assert record.robust.correct == int(ref["robust"].sum())


@functools.lru_cache(maxsize=1)
def tiny_reference():
    """32 synthetic images and pyautoattack's run on them at B=8 (computed once, shared by the engines)."""
    x, y = h.synthetic_images(32, seed=2)
    return x, y, h.reference_run(h.train_tiny_cnn(), x, y, eps=h.TINY_EPS, attacks=list(TINY_ATTACKS), batch_size=8)
