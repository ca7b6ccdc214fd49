"""Native FAB-T / FAB against pyautoattack's FABAttack_PT: same x_adv on one batch with targets run one after
another (the reference's order), same robust flags with targets side by side and with merged batches.
Both implementations run the same reduced iteration count so the test stays quick."""

from __future__ import annotations

import pytest
import torch

from tests.support.native import (assert_flags_match, assert_merged_matches_separate, calibrated, cnn_a,
                                  correct_points, fooled, make_engine, make_reference,
                                  reference_perturb, trained_cnn)
from zoo.evaluate.attacks.native.engine import NativeOptions
from zoo.evaluate.attacks.native.fab import project_l2, project_linf

CASES = [  # model, norm, eps
    (trained_cnn, "Linf", 3 / 255),
    (trained_cnn, "L2", 0.25),
    (cnn_a, "Linf", 6 / 255),
]


@pytest.mark.parametrize("make_model,norm,eps", CASES, ids=["cnn-linf", "cnn-l2", "cnn_a-linf"])
def test_fab_t_identical_and_side_by_side_targets_agree(make_model, norm, eps):
    model = make_model()
    x, y = correct_points(model, 10)
    settings = {"fab_iter": 15, "fab_targets": 4}
    aa = make_reference(model, norm, eps, **settings)
    want = reference_perturb(aa, "fab-t", x, y)
    assert 0 < fooled(model, want, y).sum() < len(y), "the case should separate robust from fooled points"

    one_by_one = make_engine(model, norm, eps, options=NativeOptions(fab_target_group=1), **settings)
    got = one_by_one.attack_batch("fab-t", x, y)
    assert (got - want).abs().max().item() <= 1e-6

    side_by_side = make_engine(model, norm, eps, options=NativeOptions(fab_target_group=4), **settings)
    assert_flags_match(model, side_by_side.attack_batch("fab-t", x, y), want, x, y, "fab-t, 4 targets at once")
    assert_merged_matches_separate(model, side_by_side, aa, "fab-t", x, y, [4, 6])


def test_automatic_target_grouping_keeps_the_flags():
    """On a GPU the engine lets FAB-T group as many targets as fit ``max_points``; same answer."""
    from zoo.evaluate.attacks.native import fab as native_fab
    from zoo.evaluate.attacks.native._batches import ModelCalls, ReferenceBatches

    model = trained_cnn()
    x, y = correct_points(model, 8)
    aa = make_reference(model, "Linf", 3 / 255, fab_iter=10, fab_targets=5)
    want = reference_perturb(aa, "fab-t", x, y)
    s = native_fab.FabSettings.from_reference(aa.fab, targeted=True)
    layout = ReferenceBatches([8], seed=0, device=torch.device("cpu"))
    calls = ModelCalls(model, "fp32")
    got = native_fab.attack(calls, x, y, layout, s, target_group=None, max_points=20)   # 2 targets, then more
    assert_flags_match(model, got, want, x, y, "fab-t, automatic groups")
    assert calls.counts["backward"] <= 8 * 5 * 10


def test_untargeted_fab_with_random_restarts():
    """'plus' runs FAB with 5 restarts; restarts after the first start from per-batch random points."""
    model = trained_cnn()
    x, y = correct_points(model, 8)
    eps = calibrated(real=0.8 / 255, synthetic=4 / 255)
    engine = make_engine(model, "Linf", eps, version="plus", fab_iter=8)
    aa = make_reference(model, "Linf", eps, version="plus", fab_iter=8)
    want = reference_perturb(aa, "fab", x, y)
    got = engine.attack_batch("fab", x, y)
    assert (got - want).abs().max().item() <= 1e-6
    assert 0 < fooled(model, want, y).sum() < len(y)
    assert_merged_matches_separate(model, engine, aa, "fab", x, y, [3, 5])
    assert engine.counters["fab"]["backward"] % 10 == 0   # one backward per class per point and iteration


@pytest.mark.parametrize("norm,eps", [("Linf", 4 / 255), ("L2", 0.3)])
def test_random_start_run_is_the_reference_single_run(norm, eps):
    """A restart's run from a random start (reseeded generator) equals the reference's single run."""
    from zoo.evaluate.attacks.native._batches import ModelCalls
    from zoo.evaluate.attacks.native.fab import FabSettings, _random_start, run

    model = trained_cnn()
    x, y = correct_points(model, 6)
    aa = make_reference(model, norm, eps, version="plus", fab_iter=5)
    aa.fab.targeted = False
    torch.random.manual_seed(11)
    want = aa.fab.attack_single_run(x, y, use_rand_start=True)

    s = FabSettings.from_reference(aa.fab, targeted=False)
    g = torch.Generator().manual_seed(11)
    noise = torch.rand(x.shape, generator=g) if norm == "Linf" else torch.randn(x.shape, generator=g)
    found, adv = run(ModelCalls(model, "fp32"), x, y, s, start=_random_start(x, noise, s))
    got = torch.where(found.view(-1, 1, 1, 1), adv, x)
    assert found.any() and torch.equal(got, want)


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_lands_on_the_hyperplane_inside_the_box(norm):
    """The projection is the heart of FAB: <w, t + d> = b with t + d in [0, 1], and smaller than a naive step."""
    g = torch.Generator().manual_seed(3)
    t = torch.rand(64, 50, generator=g)
    w = torch.randn(64, 50, generator=g)
    b = (w * torch.rand(64, 50, generator=g)).sum(1)     # a hyperplane that meets the box
    d = (project_linf if norm == "Linf" else project_l2)(t, w, b)
    z = t + d
    assert z.min() >= -1e-5 and z.max() <= 1 + 1e-5
    assert torch.allclose((w * z).sum(1), b, atol=1e-3)
    size = d.abs().max(1)[0] if norm == "Linf" else d.norm(dim=1)
    naive = (w * t).sum(1).sub(b).abs() / (w.abs().sum(1) if norm == "Linf" else w.norm(dim=1))
    assert (size >= naive - 1e-5).all()   # never shorter than the unconstrained distance
