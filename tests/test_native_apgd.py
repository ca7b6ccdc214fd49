"""Native APGD-CE / APGD-DLR / APGD-T against pyautoattack's objects: same x_adv on one batch, same robust
flags when several reference batches are merged into one device batch."""

from __future__ import annotations

import pytest
import torch

from tests.support.native import (assert_flags_match, assert_merged_matches_separate, cnn_a,
                                  correct_points, fooled, make_engine, make_reference,
                                  reference_perturb, trained_cnn)

CASES = [  # model, norm, eps, test-sized settings applied to both implementations
    (trained_cnn, "Linf", 4 / 255, {"apgd_targets": 3}),
    (trained_cnn, "L2", 0.3, {"apgd_targets": 3}),
]


@pytest.mark.parametrize("make_model,norm,eps,settings", CASES, ids=["cnn-linf", "cnn-l2"])
@pytest.mark.parametrize("attack", ["apgd-ce", "apgd-t"])
def test_single_batch_identical_and_merged_flags_equal(make_model, norm, eps, settings, attack):
    model = make_model()
    x, y = correct_points(model, 12)
    engine = make_engine(model, norm, eps, **settings)
    aa = make_reference(model, norm, eps, **settings)

    got = engine.attack_batch(attack, x, y)
    want = reference_perturb(aa, attack, x, y)
    assert (got - want).abs().max().item() <= 1e-6
    assert_flags_match(model, got, want, x, y, attack)
    assert 0 < fooled(model, want, y).sum() < len(y), "the case should separate robust from fooled points"

    assert_merged_matches_separate(model, engine, aa, attack, x, y, [5, 4, 3])


def test_apgd_dlr_with_restarts_draws_each_batch_its_own_random_starts():
    """'plus' runs APGD-DLR with 5 restarts: later restarts draw for fewer points, per reference batch."""
    model = trained_cnn()
    x, y = correct_points(model, 10)
    engine = make_engine(model, "Linf", 2 / 255, version="plus")
    aa = make_reference(model, "Linf", 2 / 255, version="plus")
    assert engine.autoattack.apgd.n_restarts == 5
    sizes = [4, 6]
    parts = list(zip(x.split(sizes), y.split(sizes)))
    got = engine.attack_batches("apgd-dlr", parts)
    want = [reference_perturb(aa, "apgd-dlr", xb, yb) for xb, yb in parts]
    assert torch.equal(got[0], want[0])  # one-batch group: identical
    assert_flags_match(model, torch.cat(got), torch.cat(want), x, y, "apgd-dlr merged")
    assert 0 < fooled(model, torch.cat(want), y).sum() < len(y)


def test_real_robust_net_apgd_t_breaks_what_apgd_ce_missed():
    """CNN-A-Adv at 2/255, the stages as run_standard_evaluation chains them: identical at every step.

    (Merged APGD-T is checked on the small CNN above; here it would double the test's time.)"""
    model = cnn_a()
    x, y = correct_points(model, 12)
    engine = make_engine(model, "Linf", 2 / 255)
    aa = make_reference(model, "Linf", 2 / 255)

    after_ce = engine.attack_batch("apgd-ce", x, y)
    want_ce = reference_perturb(aa, "apgd-ce", x, y)
    assert (after_ce - want_ce).abs().max().item() <= 1e-6
    assert_merged_matches_separate(model, engine, aa, "apgd-ce", x, y, [5, 4, 3])
    left = ~fooled(model, want_ce, y)
    xs, ys = x[left].contiguous(), y[left]

    after_t = engine.attack_batch("apgd-t", xs, ys)
    want_t = reference_perturb(aa, "apgd-t", xs, ys)
    assert (after_t - want_t).abs().max().item() <= 1e-6
    assert fooled(model, want_t, ys).sum() > 0, "APGD-T should break points APGD-CE missed on this model"


def test_counters_record_every_pass():
    """APGD-CE on n points none of which is fooled early: n clean forwards, then n * (n_iter + 1) each way."""
    model = trained_cnn()
    x, y = correct_points(model, 6)
    engine = make_engine(model, "Linf", 0.1 / 255)
    engine.attack_batch("apgd-ce", x, y)
    n, steps = len(y), engine.autoattack.apgd.n_iter + 1
    assert engine.counters["apgd-ce"] == {"forward": n + n * steps, "backward": n * steps, "fp32_check": 0}
    forward_bound, backward_bound = engine.cost_per_point("apgd-ce", 10)
    assert engine.counters["apgd-ce"]["forward"] <= n * forward_bound
    assert engine.counters["apgd-ce"]["backward"] <= n * backward_bound


def test_bf16_successes_hold_in_fp32():
    model = trained_cnn()
    x, y = correct_points(model, 10)
    engine = make_engine(model, "Linf", 4 / 255, precision="bf16", apgd_targets=3)
    for attack in ("apgd-ce", "apgd-t"):
        x_adv = engine.attack_batch(attack, x, y)
        changed = (x_adv != x).flatten(1).any(1)
        assert changed.any()
        assert torch.equal(fooled(model, x_adv, y), changed)   # every point returned perturbed fools in fp32
        assert (x_adv - x).abs().max() <= 4 / 255 + 1e-6
        assert engine.counters[attack]["fp32_check"] >= changed.sum()
