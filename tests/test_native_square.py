"""Native Square Attack against pyautoattack's SquareAttack: same x_adv on one batch, same robust flags when
reference batches are merged (each keeps its own random stream and square positions). Both run the same
reduced query budget so the test stays quick."""

from __future__ import annotations

import pytest
import torch

from tests.support.native import (assert_flags_match, assert_merged_matches_separate, calibrated, cnn_a,
                                  correct_points, fooled, make_engine, make_reference,
                                  reference_perturb, trained_cnn)
from zoo.evaluate.attacks.native.engine import NativeOptions

CASES = [  # model, norm, eps, queries
    (trained_cnn, "Linf", 4 / 255, 150),
    (trained_cnn, "L2", calibrated(real=0.3, synthetic=2.0), 150),
    (cnn_a, "Linf", 8 / 255, 100),
    (cnn_a, "L2", 0.5, 100),
]


@pytest.mark.parametrize("make_model,norm,eps,queries", CASES, ids=["cnn-linf", "cnn-l2", "cnn_a-linf", "cnn_a-l2"])
def test_single_batch_identical_and_merged_flags_equal(make_model, norm, eps, queries):
    model = make_model()
    x, y = correct_points(model, 12)
    engine = make_engine(model, norm, eps, n_queries=queries)
    aa = make_reference(model, norm, eps, n_queries=queries)

    got = engine.attack_batch("square", x, y)
    want = reference_perturb(aa, "square", x, y)
    assert (got - want).abs().max().item() <= 1e-6
    assert_flags_match(model, got, want, x, y, "square")
    assert 0 < fooled(model, want, y).sum() < len(y), "the case should separate robust from fooled points"

    assert_merged_matches_separate(model, engine, aa, "square", x, y, [5, 4, 3])


def test_linf_compaction_interval_does_not_change_results():
    """Finished points riding along masked between compactions (the GPU default) change nothing."""
    model = trained_cnn()
    x, y = correct_points(model, 12)
    aa = make_reference(model, "Linf", 4 / 255, n_queries=150)
    sparse = make_engine(model, "Linf", 4 / 255, n_queries=150, options=NativeOptions(square_compact_every=7))
    merged = assert_merged_matches_separate(model, sparse, aa, "square", x, y, [6, 6])
    assert merged.shape == x.shape


def test_counters_count_every_query():
    """Nothing fooled at a tiny eps: clean pass, start, one query per point per iteration, final check."""
    model = trained_cnn()
    x, y = correct_points(model, 5)
    engine = make_engine(model, "Linf", 0.01 / 255, n_queries=20)
    x_adv = engine.attack_batch("square", x, y)
    assert torch.equal(x_adv, x)
    assert engine.counters["square"] == {"forward": 5 * (1 + 1 + 20 + 1), "backward": 0, "fp32_check": 0}


def test_bf16_successes_hold_in_fp32():
    model = trained_cnn()
    x, y = correct_points(model, 10)
    engine = make_engine(model, "Linf", 6 / 255, precision="bf16", n_queries=100)
    x_adv = engine.attack_batch("square", x, y)
    changed = (x_adv != x).flatten(1).any(1)
    assert changed.any()
    assert torch.equal(fooled(model, x_adv, y), changed)
    assert engine.counters["square"]["fp32_check"] == len(y)   # the final check runs in fp32
